"""The run report: one self-contained HTML page (plotly.js inlined) with its tables as CSV beside it.

`page.write_report` renders whatever a run directory holds (an unfinished run as far as it got); `plots` builds
each figure together with the table behind it. Imports project modules and, lazily (`nas_minitron._lazy`), pandas,
numpy and plotly: importing this package loads none of them.
"""

from nas_minitron.report.page import Section, default_report_path, write_report
from nas_minitron.report.plots import pareto_mask, spearman

__all__ = ["Section", "default_report_path", "pareto_mask", "spearman", "write_report"]
