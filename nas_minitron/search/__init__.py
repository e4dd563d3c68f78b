"""The search: Optuna (inside Ray Tune) proposes in-budget candidates; each Ray trial prunes one, distills it briefly.

Modules, in the order data flows through them:
- `protocol`: the trial contract (`TrialSpec`, the report keys, `TrialRecord`); no third-party import.
- `proposals`: Optuna parameters <-> candidates (one u in [0, 1) per axis; every proposal is in budget).
- `worker`: one trial without Ray in it (build the student, distill it, report), or one candidate at one rung.
- `rungs`: the successive-halving rules (ladder, promotion with bootstrap ties, Pareto sorting, rank statistics);
  pure Python.
- `halving`: the driver's rung loop (one Ray Tune experiment per rung, promotions, the Optuna record).
- `searcher`: the Optuna searcher Ray pickles (imports ray and optuna at module top: reached lazily).
- `callbacks`: the driver-side Tune hooks (trial log names, checkpoint cleanup, trial weights kept only for possible
  winners, the stop on a fatal trial); imports ray at module top, reached lazily.
- `tune`: the Ray Tune side (cluster, sampler, Tuner, records of finished trials).
- `winners`: the top K, or the Pareto set over several objectives.

May import: leaf modules, `space`, `prune`, `distill`. Only this package (and `distill.ray_train`) imports ray and
optuna. Imported here: the light modules; `worker` and `tune` are imported by path (they load the trainer).
"""

from nas_minitron.search.proposals import DECISION_ORDER, decode, encode
from nas_minitron.search.protocol import (
    FAILED_KEY,
    FATAL_KEY,
    FINAL_KEY,
    PLACEMENT_KEYS,
    SAMPLERS,
    Report,
    TrialRecord,
    TrialSpec,
    trial_log_path,
    trial_result_path,
    trial_scratch_dir,
    trial_weights_path,
)
from nas_minitron.search.winners import OBJECTIVES, pareto_front, select_winners

__all__ = ["DECISION_ORDER", "FAILED_KEY", "FATAL_KEY", "FINAL_KEY", "OBJECTIVES", "PLACEMENT_KEYS", "SAMPLERS",
           "Report", "TrialRecord", "TrialSpec", "decode", "encode", "pareto_front", "select_winners", "trial_log_path",
           "trial_result_path", "trial_scratch_dir", "trial_weights_path"]
