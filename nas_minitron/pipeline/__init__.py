"""`nas-minitron search` end to end: settings, the run directory (its one owner), pre-flight, the stages in run order.

- `settings`: `SearchSettings` (defaults, YAML, flags) and what `--resume` may change.
- `run_dir`: the stage order, every file of a run directory, the resolved-run record, the live `Run`.
- `stages`: one function per stage, from the run directory to the run directory.
- `runner`: pre-flight, the lock, the stages in order, resume.

May import every other package; nothing but `commands/` imports `runner` or `stages`. This `__init__` re-exports
only the light records (report/ reads run directories through `run_dir`).
"""

from nas_minitron.pipeline.run_dir import CURVE_COLUMNS, STAGES, TRIAL_COLUMNS, WINNER_COLUMNS, Resolved, Run
from nas_minitron.pipeline.settings import SearchSettings, differences, resolve_settings

__all__ = ["CURVE_COLUMNS", "STAGES", "TRIAL_COLUMNS", "WINNER_COLUMNS", "Resolved", "Run", "SearchSettings",
           "differences", "resolve_settings"]
