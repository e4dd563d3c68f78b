"""nas-minitron: turn a large Hugging Face LLM into the best smaller one at a given size.

Importing this package stays light (no torch, ray, optuna, lm_eval or plotly): every module imports its heavy
libraries at module scope through `nas_minitron._lazy.lazy_import`, which loads them on first use. The layout
(one subpackage per domain, data flowing one way) is in README.md ("Layout").
"""

from nas_minitron.arch import ArchConfig, Budget, Invariants, count_params
from nas_minitron.errors import UserError

__all__ = ["ArchConfig", "Budget", "Invariants", "UserError", "count_params", "__version__"]
__version__ = "0.1.0"
