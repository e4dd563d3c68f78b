"""A retrofitted model on disk: a stock `save_pretrained` directory plus `dmc.json`, and the loader that re-applies DMC.

Why not `auto_map` remote code: DMC attention owns exactly the stock module's weights under the same names, so the
directory *is* a stock checkpoint; shipping code would demand `trust_remote_code` for nothing the weights need.
`load_dmc_model(dir)` loads it with the stock class and swaps DMC attention back in (checking that layers, KV heads
and head_dim are the ones `dmc.json` was written for). The fallback: `AutoModelForCausalLM.from_pretrained(dir)`
loads and runs *uncompressed* stock attention. It is not the retrofitted model's function: stock attention also
reads the two decision channels (q[-1], k[-1]) that DMC attention zeroes, and never merges.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nas_minitron._lazy import lazy_import
from nas_minitron.artifacts import reading
from nas_minitron.dmc.settings import DMCRecord
from nas_minitron.errors import UserError

if TYPE_CHECKING:
    import torch
    import transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from nas_minitron.dmc import attention
else:
    torch = lazy_import("torch")
    transformers = lazy_import("transformers")
    attention = lazy_import("nas_minitron.dmc.attention")

__all__ = ["check_record_fits", "load_dmc_model", "record_for", "save_dmc_model"]


def _shape(model: PreTrainedModel) -> tuple[str, int, int, int]:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return str(c.model_type), int(c.num_hidden_layers), int(c.num_key_value_heads), int(head_dim)


def record_for(model: PreTrainedModel, record: DMCRecord | None = None, **fields: object) -> DMCRecord:
    """A DMCRecord of this model's shape; `fields` are the other DMCRecord fields (settings, target_cr, ...)."""
    model_type, layers, kv_heads, head_dim = _shape(model)
    return DMCRecord(model_type=model_type, num_layers=layers, num_key_value_heads=kv_heads, head_dim=head_dim,
                     **fields)  # type: ignore[arg-type]


def check_record_fits(record: DMCRecord, model: PreTrainedModel, where: str) -> None:
    """UserError unless the model has the family, layer count, KV head count and head_dim of the record."""
    have = _shape(model)
    want = (record.model_type, record.num_layers, record.num_key_value_heads, record.head_dim)
    if have != want:
        names = ("model_type", "layers", "KV heads", "head_dim")
        diff = ", ".join(f"{n} {w!r} in dmc.json vs {h!r} in the model" for n, w, h in zip(names, want, have)
                         if w != h)
        raise UserError(f"{where}: the DMC state does not fit the model ({diff}); retrofit this model again.")


def save_dmc_model(directory: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
                   record: DMCRecord) -> None:
    """Write into an existing (temporary) directory: weights + config (stock), tokenizer, dmc.json last."""
    check_record_fits(record, model, str(directory))
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    record.write(directory)


def load_dmc_model(directory: str | Path, *, dtype: torch.dtype | None = None,
                   device: str = "cpu") -> tuple[PreTrainedModel, DMCRecord]:
    """(model with DMC attention, in eval mode with hard decisions, on `device`; its record) of a directory written
    by `nas-minitron dmc`. Decode with `generate(..., cache=nas_minitron.dmc.DMCCache())`."""
    directory = Path(directory)
    record = DMCRecord.read(directory)
    with reading(directory, "DMC model", "write it again with `nas-minitron dmc`", extra=(ValueError,)):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
    check_record_fits(record, model, str(directory))
    attention.apply_dmc(model, record.settings)
    attention.set_dmc_state(model, mode="dmc", channel_scale=0.0, force_append=False, relaxed=None)
    model.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    return model.eval(), record
