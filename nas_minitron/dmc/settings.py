"""DMC settings and the `dmc.json` record that travels with a retrofitted model (stdlib only).

`DMCSettings` holds what changes the attention's arithmetic (window, logit offset, temperature); `DMCRecord` is what
`dmc.json` stores next to a stock-loadable model: the settings, the shape the DMC state belongs to (layers, KV heads,
head_dim: a model whose KV head count changed is refused), the target and the measured compression ratio.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nas_minitron.errors import UserError

__all__ = ["DMC_FILE", "FORMAT_VERSION", "MIN_HEAD_DIM", "DMCRecord", "DMCSettings", "check_target_cr"]

DMC_FILE = "dmc.json"
FORMAT_VERSION = 1
# The decision uses the last key/query channel; with head_dim >= 4 at least one full rotary pair stays untouched.
MIN_HEAD_DIM = 4


def check_target_cr(target_cr: float) -> float:
    """A target compression ratio is >= 1 (1 = no compression) and finite."""
    if not (target_cr >= 1.0 and target_cr != float("inf")):
        raise UserError(f"target compression ratio {target_cr!r} is invalid: it must be a finite number >= 1 "
                        f"(e.g. 2 or 4).")
    return float(target_cr)


@dataclass(frozen=True)
class DMCSettings:
    """The arithmetic of DMC attention (paper defaults)."""

    window: int = 12
    """How many trailing tokens of a run a merged entry averages (the training relaxation's sliding window)."""
    logit_offset: float = 5.0
    """decision logit = k[-1] - offset and merge-weight logit = mean q[-1] + offset: a fresh model mostly appends."""
    temperature: float = 0.1
    """Temperature of the Gumbel-sigmoid relaxation of the decisions in training."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise UserError(f"DMC window {self.window!r} is invalid: it must be an integer >= 1.")
        if not self.temperature > 0:
            raise UserError(f"DMC temperature {self.temperature!r} is invalid: it must be > 0.")


@dataclass(frozen=True)
class DMCRecord:
    """Contents of `dmc.json`: enough to re-apply DMC to the stock-loaded weights and to check they fit."""

    settings: DMCSettings
    model_type: str
    num_layers: int
    num_key_value_heads: int
    head_dim: int
    target_cr: float
    achieved_cr: float | None = None
    """Measured on held-out data with hard decisions: tokens / cache entries, over all layers and KV heads."""
    per_layer_cr: list[float] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    """Free-form description of the retrofit (tokens, stages, teacher, losses); not read back."""

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> DMCRecord:
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{where} is not a DMC record of format_version {FORMAT_VERSION}.")
        try:
            fields = {k: v for k, v in data.items() if k != "format_version"}
            settings = DMCSettings(**fields.pop("settings"))
            return cls(settings=settings, **fields)
        except (TypeError, KeyError) as err:
            raise UserError(f"{where} is not a valid DMC record: {err}.") from None

    def write(self, directory: Path) -> None:
        (Path(directory) / DMC_FILE).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def read(cls, directory: Path) -> DMCRecord:
        path = Path(directory) / DMC_FILE
        if not path.is_file():
            raise UserError(f"{str(directory)!r} holds no {DMC_FILE}: it is not a DMC model directory "
                            f"(write one with `nas-minitron dmc`).")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read {str(path)!r}: {err}.") from None
        return cls.from_json(data, repr(str(path)))
