"""The Optuna side of the trials, at module level so Ray can pickle the searcher into its experiment checkpoints.

Imports ray and optuna at the top: `tune.py` reaches it only through a lazy proxy, when a search starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from nas_minitron.arch import ArchConfig
from nas_minitron.search.proposals import DECISION_ORDER, decode, param_name
from nas_minitron.search.protocol import FAILED_KEY, FATAL_KEY, FINAL_KEY

__all__ = ["CandidateSpace", "StudySearch"]


class CandidateSpace:
    """Define-by-run space: one u in [0, 1) per axis, decoded onto the in-budget candidates (proposals.py)."""

    def __init__(self, archs: Sequence[ArchConfig]) -> None:
        self.archs = list(archs)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        for axis in DECISION_ORDER:
            trial.suggest_float(param_name(axis), 0.0, 1.0)
        return {"arch": decode(self.archs, trial.params).name}


class StudySearch(OptunaSearch):
    """OptunaSearch that records the Ray trial id on each Optuna trial and tells FAIL for errored or NaN trials.

    Stock OptunaSearch tells COMPLETE for an errored trial that already reported its metric, so a crashed trial
    could win; here it is FAIL, as is a trial that reported `failed` (a non-finite loss) or a non-finite objective.
    """

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def _finite(self, result: dict[str, Any]) -> bool:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(m) for m in metrics]
        return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        # Optuna refuses None (a NaN serialized by the trial) and non-finite values would skew its statistics.
        if result.get(FAILED_KEY) or trial_id in self._completed_trials or not self._finite(result):
            return
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            # The study in storage may already hold this trial as finished; storage wins.
            self._completed_trials.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if result is not None and result.get(FATAL_KEY) and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("fatal", True)  # asked again on --resume (tune.reopen_unfinished)
        if error or result is None or result.get(FAILED_KEY) or not self._finite(result):
            result, error = None, True
        elif not result.get(FINAL_KEY):  # stopped early by the scheduler (ASHA): PRUNED, as Optuna's pruners say
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)
