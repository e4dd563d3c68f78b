"""Reading what a run consumes: every failed read becomes one `UserError` naming the file and what is wrong.

- `reading(path, what, hint)`: a context manager around any read of `path`. It turns the errors of a damaged or
  missing file (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError, KeyError, pyarrow's
  ArrowException, and the `extra` types a call site names) into `UserError("cannot read {what} {path!r}:
  {reason}; {hint}.")`, the reason in words: truncated, not a safetensors file, bad header, not JSON, missing key,
  not UTF-8 at byte N, corrupt parquet, no such file. A `UserError` raised inside passes through unchanged.
- `read_safetensors`: a whole safetensors file, with required tensors and optionally finite values;
  `safetensors_shapes`: its header only (optionally streaming each tensor through the finite check).
- `load_pretrained`: a `from_pretrained` directory (model + tokenizer), every weight file's header checked first so
  that a corrupt shard is named, and every floating parameter checked finite after loading.
- `require_finite`: the NaN/Inf check, naming the first bad tensor.

A low-level leaf: it imports only errors and _lazy (safetensors, torch and transformers lazily). Errors of
safetensors and pyarrow are recognised through `sys.modules`: a library that was never imported cannot have raised.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from nas_minitron._lazy import lazy_import
from nas_minitron.errors import UserError, first_line

if TYPE_CHECKING:
    import safetensors
    import safetensors.torch as st
    import torch
    import transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
else:
    safetensors = lazy_import("safetensors")
    st = lazy_import("safetensors.torch")
    torch = lazy_import("torch")
    transformers = lazy_import("transformers")

__all__ = [
    "artifact_error",
    "load_pretrained",
    "read_safetensors",
    "reading",
    "require_finite",
    "safetensors_shapes",
    "utf8_error_offset",
]

PathLike = str | os.PathLike[str]
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError)
# safetensors' messages (after "Error while deserializing header: ") -> what they mean for the user
_SAFETENSORS_KINDS = (
    (("header too small", "incomplete metadata", "file not fully covered"), "truncated"),
    (("header too large", "invalid header length", "invalid header start"), "not a safetensors file"),
)


def artifact_error(path: PathLike, what: str, reason: str, hint: str = "") -> UserError:
    """The one message shape: `cannot read {what} {path!r}: {reason}; {hint}.`"""
    text = f"cannot read {what} {str(path)!r}: {reason.rstrip('.')}"
    return UserError(f"{text}; {hint}." if hint else f"{text}.")


def utf8_error_offset(path: PathLike) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence in a file (read in 1 MiB chunks), None if it is valid."""
    offset, tail = 0, b""
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            buffer = tail + chunk
            try:
                _text, used = codecs.utf_8_decode(buffer, "strict", not chunk)  # final only at the end
            except UnicodeDecodeError as err:
                return offset + err.start
            if not chunk:
                return None
            offset, tail = offset + used, buffer[used:]


def _is_library_error(err: BaseException, module: str, name: str) -> bool:
    """Whether `err` is `module.name`; a library that was never imported cannot have raised, so none is imported."""
    loaded = sys.modules.get(module)
    kind = getattr(loaded, name, None) if loaded is not None else None
    return isinstance(kind, type) and isinstance(err, kind)


def _reason(err: BaseException, path: Path) -> str:
    """What is wrong, in words, with the library's own first line where it helps."""
    if isinstance(err, UnicodeDecodeError):
        offset = utf8_error_offset(path) if path.is_file() and err.encoding.replace("-", "") == "utf8" else None
        return f"not UTF-8 at byte {err.start if offset is None else offset}"
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    if isinstance(err, KeyError):
        return f"missing key {err.args[0]!r}" if err.args else "missing key"
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, IsADirectoryError):
        return "it is a directory, not a file"
    if isinstance(err, PermissionError):
        return "permission denied"
    if _is_library_error(err, "safetensors", "SafetensorError"):
        detail = first_line(err).removeprefix("Error while deserializing header: ")
        kind = next((kind for needles, kind in _SAFETENSORS_KINDS if any(n in detail for n in needles)),
                    "bad safetensors header")
        return f"{kind} ({detail})"
    if _is_library_error(err, "pyarrow", "ArrowException"):
        return f"corrupt or not a parquet file ({first_line(err, 200)})"
    return first_line(err, 300)


def _is_read_error(err: BaseException, extra: tuple[type[BaseException], ...]) -> bool:
    if isinstance(err, UserError):
        return False
    return (isinstance(err, _READ_ERRORS + extra) or _is_library_error(err, "safetensors", "SafetensorError")
            or _is_library_error(err, "pyarrow", "ArrowException"))


@contextlib.contextmanager
def reading(
    path: PathLike, what: str, hint: str = "", extra: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Turn the read errors raised inside into `artifact_error(path, what, reason, hint)`; others pass through.

    `what` names the artifact kind ("teacher", "importance scores", "data file"); `hint` says what to do;
    `extra` adds exception types that mean a bad file at this call site (e.g. ValueError from `from_pretrained`).
    """
    try:
        yield
    except Exception as err:
        if not _is_read_error(err, extra):
            raise
        raise artifact_error(path, what, _reason(err, Path(path)), hint) from None


# ---- safetensors -------------------------------------------------------------------------------------------------
def read_safetensors(
    path: PathLike, what: str, *, hint: str = "", require: Iterable[str] = (), finite: bool = False
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; UserError when it is unreadable, lacks a `require`d tensor, or (with
    `finite`) holds NaN/Inf."""
    with reading(path, what, hint):
        tensors = st.load_file(str(path))
    missing = [name for name in require if name not in tensors]
    if missing:
        raise artifact_error(path, what, f"missing tensor(s) {', '.join(map(repr, missing))} "
                                         f"(it holds {', '.join(sorted(tensors)) or 'none'})", hint)
    if finite:
        require_finite(tensors.items(), what, path, hint)
    return tensors


def safetensors_shapes(
    path: PathLike, what: str, *, hint: str = "", finite: bool = False
) -> dict[str, list[int]]:
    """Each tensor's shape, from the header alone (cheap); with `finite`, each tensor is also read, one at a time
    (memory-mapped), and checked for NaN/Inf."""
    shapes: dict[str, list[int]] = {}
    with reading(path, what, hint), safetensors.safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            shapes[name] = list(handle.get_slice(name).get_shape())
            if finite:
                require_finite([(name, handle.get_tensor(name))], what, path, hint)
    return shapes


def require_finite(
    tensors: Iterable[tuple[str, torch.Tensor]], what: str, path: PathLike, hint: str = ""
) -> None:
    """UserError naming the first floating tensor that holds NaN or Inf.

    One float32 sum per tensor (NaN and Inf propagate into it; no temporary the size of the tensor), and an
    element-wise check only when that sum is not finite, which also clears a sum that merely overflowed.
    """
    for name, tensor in tensors:
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = tensor.numel() - int(finite.sum())
            raise artifact_error(path, what, f"tensor {name!r} holds {bad:,} NaN/Inf value(s) of "
                                             f"{tensor.numel():,}", hint)


# ---- from_pretrained directories ---------------------------------------------------------------------------------
def load_pretrained(
    where: str,
    what: str,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    hint: str = "",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer of a `from_pretrained` location (a local directory or a hub id), on the CPU.

    A local directory's safetensors headers are checked first (naming a truncated or corrupt file, which
    `from_pretrained`'s own error does not), and every floating parameter is checked finite after loading.
    """
    local = Path(where)
    if local.is_dir():
        for file in sorted(local.glob("*.safetensors")):
            safetensors_shapes(file, what, hint=hint)
    with reading(where, what, hint, extra=(ValueError,)):
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
        )
    require_finite(model.named_parameters(), what, where, hint)
    return model, tokenizer
