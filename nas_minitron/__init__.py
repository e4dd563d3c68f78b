"""nas-minitron: turn a large Hugging Face LLM into the best smaller one at a given size.

Importing this package stays light (no torch, ray, optuna, lm_eval or plotly): heavy libraries are imported
inside the functions that use them.
"""

from nas_minitron.arch import ArchConfig, Budget, Invariants, count_params
from nas_minitron.errors import UserError

__all__ = ["ArchConfig", "Budget", "Invariants", "UserError", "count_params", "__version__"]
__version__ = "0.1.0"
