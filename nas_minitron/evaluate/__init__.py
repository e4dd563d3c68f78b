"""Evaluation: benchmark scores through lm-eval (`harness`) and prefill/decode speed and memory (`speed`).

`harness` scores a model on lm-eval tasks (the bundled offline tasks in `tasks/` first) and saves the teacher and
its students side by side under a run's `eval/`; `speed` times a model at a batch and sequence length.
Imports project modules and, lazily (`nas_minitron._lazy`), torch, transformers, lm_eval and pandas: importing this
package loads none of them.
"""

from nas_minitron.evaluate.harness import (
    DEFAULT_TASKS,
    MINITRON_PRESET,
    EvalResult,
    eval_table,
    evaluate_model,
    load_model,
    read_eval,
    save_eval,
    wide_table,
)
from nas_minitron.evaluate.speed import SpeedResult, kv_cache_bytes, measure_speed

__all__ = [
    "DEFAULT_TASKS",
    "MINITRON_PRESET",
    "EvalResult",
    "SpeedResult",
    "eval_table",
    "evaluate_model",
    "kv_cache_bytes",
    "load_model",
    "measure_speed",
    "read_eval",
    "save_eval",
    "wide_table",
]
