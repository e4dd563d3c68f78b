"""Teacher-logit cache: one teacher pass, shared by every trial of a search, so workers need not hold the teacher.

Layout of a cache directory (written atomically):
  manifest.json            format_version, num_sequences, seq_len, topk, vocab_size, the teacher's and the
                           tokenizer's fingerprints (`nas_minitron.teacher.weights_fingerprint` and
                           `tokenizer_fingerprint`), and for every file its shape, dtype, size and sha256
  tokens.npy               int32 [N, T]: the sequences the cache was built over (lookups go by their content)
  logprobs-00000.npy ...   float16 [n, T, k]: the teacher's top-k log-probabilities at temperature 1, sorted
  indices-00000.npy ...    int32 [n, T, k]: their token ids
Shards hold `shard_sequences` sequences each and are memory-mapped on open. How the tail mass outside the top-k
enters the loss is described in `nas_minitron.distill.losses` (an explicit "rest" bucket). The manifest also records
how it was built: dtype ("bf16" or "float32"), workers, device, build_seconds, resumed_shards, tokens_sha256.

Building (`CacheBuild`): in `<cache>.partial/` beside the final directory, tokens.npy first, then each shard's two
files under hidden names, renamed once complete, then `shard-XXXXX.json` (their size and sha256, read back once while
in page cache). A killed build keeps its completed shards and a rerun of the same build (sequences, teacher,
top-k, shard size, dtype) computes only the rest; anything else starts again. The last step writes the manifest and
renames the directory into place; a rerun finding that very cache complete keeps it. `build_logit_cache` runs the
shards in this process; `distill.ray_cache.build_logit_cache_ray` spreads them over Ray workers (GPUs in bf16).
The teacher's output head and log-softmax run over `LOGIT_CHUNK_TOKENS` positions at a time (`teacher_topk`).

Integrity: the sha256 are computed by reading the shards back once they are written; `open` checks every file's
size (free), `open(verify=True)` (`--verify`) every sha256 as well (a full read of the cache: at 8B scale tens of GB,
see benchmarks/bench_integrity.py), so that each of a search's trials does not re-hash the whole cache. A manifest
written before sizes were recorded is checked in full.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.artifacts import artifact_error, reading
from nas_minitron.atomic import check_output_dir, replace_directory, write_json_atomic
from nas_minitron.distill.losses import topk_targets
from nas_minitron.errors import UserError
from nas_minitron.integrity import check_file, file_entry
from nas_minitron.runtime import bf16_autocast
from nas_minitron.teacher import tokenizer_fingerprint, weights_fingerprint

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
else:
    np = lazy_import("numpy")
    torch = lazy_import("torch")

__all__ = ["FORMAT_VERSION", "LOGIT_CHUNK_TOKENS", "MANIFEST", "CacheBuild", "LogitCache", "build_logit_cache",
           "shard_bounds", "teacher_topk", "write_shard"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOGIT_CHUNK_TOKENS = 1024  # positions whose fp32 logits the teacher pass holds at once (`teacher_topk`)
_FIX = "rebuild the cache (delete the directory and rerun)"
# What `open` and the properties read from a manifest; checked up front so that a damaged one fails in one place.
_MANIFEST_KEYS = ("format_version", "num_sequences", "seq_len", "topk", "vocab_size", "shard_sequences", "shards",
                  "files")


def _row_key(row: np.ndarray) -> bytes:
    return hashlib.sha1(row.astype("<i4").tobytes()).digest()


@dataclass
class LogitCache:
    """An opened cache: memory-mapped shards and a content index of its sequences."""

    directory: Path
    manifest: dict[str, Any]
    tokens: np.memmap  # int32 [N, T]
    logprobs: list[np.memmap]  # float16 [n, T, k] per shard
    indices: list[np.memmap]  # int32 [n, T, k] per shard
    _rows: dict[bytes, int] = field(default_factory=dict, repr=False)

    @property
    def topk(self) -> int:
        return int(self.manifest["topk"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def num_sequences(self) -> int:
        return int(self.manifest["num_sequences"])

    @classmethod
    def open(cls, directory: str | os.PathLike[str], verify: bool = False) -> LogitCache:
        """Open a cache, refusing a missing or truncated file (by its size); `verify` also checks every file's sha256
        (refusing an altered one: a full read)."""
        root = Path(directory)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{str(root)!r} is not a logit cache (no {MANIFEST}).")
        with reading(manifest_path, "logit-cache manifest", _FIX):
            manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise artifact_error(manifest_path, "logit-cache manifest", "not a JSON object", _FIX)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"logit cache {str(root)!r} has format_version {manifest.get('format_version')!r}, "
                            f"expected {FORMAT_VERSION}.")
        missing = [key for key in _MANIFEST_KEYS if key not in manifest]
        if missing:
            raise artifact_error(manifest_path, "logit-cache manifest", f"missing key(s) {', '.join(missing)}", _FIX)
        with reading(manifest_path, "logit-cache manifest", _FIX, extra=(TypeError, AttributeError)):
            shards = range(len(manifest["shards"]))  # a KeyError or TypeError below: a damaged entry
            files = {name: (str(entry["file"]), {"sha256": str(entry["sha256"]), "size": entry.get("size")})
                     for name, entry in manifest["files"].items()}
            for name in ("tokens", *(f"{kind}-{i}" for i in shards for kind in ("logprobs", "indices"))):
                files[name]  # noqa: B018 - its KeyError names the missing entry
        for file, entry in files.values():
            check_file(root / file, entry, "logit-cache file", _FIX, full=verify)

        def load(name: str) -> np.memmap:
            with reading(root / files[name][0], "logit-cache file", _FIX, extra=(ValueError,)):
                loaded: np.memmap = np.load(root / files[name][0], mmap_mode="r")
            return loaded

        cache = cls(root, manifest, load("tokens"), [load(f"logprobs-{i}") for i in shards],
                    [load(f"indices-{i}") for i in shards])
        cache._rows = {_row_key(np.asarray(row)): i for i, row in enumerate(cache.tokens)}
        return cache

    def rows_for(self, tokens: torch.Tensor) -> list[int]:
        """Cache row of each sequence in tokens [B, T]; UserError for a sequence the cache was not built over."""
        rows = []
        for row in tokens.detach().cpu().numpy():
            index = self._rows.get(_row_key(row))
            if index is None:
                raise UserError(f"a sequence is not in logit cache {str(self.directory)!r}: build the cache over "
                                f"the same data, seq_len and split (train + validation) as the run.")
            rows.append(index)
        return rows

    def lookup(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher top-k log-probs float32 [B, T, k] and indices int64 [B, T, k] for tokens [B, T]."""
        shard_size = int(self.manifest["shard_sequences"])
        logprobs, indices = [], []
        for row in self.rows_for(tokens):
            shard, offset = divmod(row, shard_size)
            logprobs.append(np.asarray(self.logprobs[shard][offset], dtype=np.float32))  # [T, k]
            indices.append(np.asarray(self.indices[shard][offset], dtype=np.int64))  # [T, k]
        return torch.from_numpy(np.stack(logprobs)), torch.from_numpy(np.stack(indices))


def teacher_topk(teacher: PreTrainedModel, input_ids: torch.Tensor, topk: int,
                 chunk_tokens: int = LOGIT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities float32 [B, T, k] and ids [B, T, k] for input_ids [B, T].

    The decoder runs over the whole batch; the output head and the log-softmax over at most `chunk_tokens` positions
    at a time, so a large batch of an 8B teacher (128k vocabulary: 0.5 MB of fp32 logits per position) never holds
    [B, T, V] logits. Equal to `topk_targets(teacher(input_ids).logits, k)` (tests/distill/test_cache_build.py)."""
    decoder, head = teacher.get_decoder(), teacher.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, H]; no KV cache kept
    flat = hidden.reshape(-1, hidden.shape[-1])  # [B*T, H]
    values, ids = [], []
    for lo in range(0, flat.shape[0], chunk_tokens):
        logp, idx = topk_targets(head(flat[lo : lo + chunk_tokens]), topk)  # [c, k] each
        values.append(logp)
        ids.append(idx)
    shape = (*input_ids.shape, topk)
    return torch.cat(values).reshape(shape), torch.cat(ids).reshape(shape)


def shard_bounds(num_sequences: int, shard_sequences: int) -> list[tuple[int, int]]:
    """(start, stop) of each shard's rows."""
    return [(lo, min(num_sequences, lo + shard_sequences)) for lo in range(0, num_sequences, shard_sequences)]


def _shard_names(shard: int) -> tuple[str, str, str]:
    return f"logprobs-{shard:05d}.npy", f"indices-{shard:05d}.npy", f"shard-{shard:05d}.json"


def write_shard(teacher: PreTrainedModel, sequences: np.ndarray | torch.Tensor, folder: str | os.PathLike[str],
                shard: int, topk: int, batch_size: int, *, autocast: bool = False) -> dict[str, Any]:
    """Run the teacher over one shard's sequences [n, T] and write its two files into `folder`, then
    `shard-XXXXX.json` (their shape, dtype, size and sha256: the mark that the shard is complete); returns that
    record. The files are written under hidden names and renamed, so a killed writer leaves no partial shard a
    restart could take for done. `autocast`: bf16 autocast over float32 weights (a bf16 teacher needs none)."""
    root = Path(folder)
    rows = torch.from_numpy(np.array(sequences, dtype=np.int64))  # a copy: the caller's may be a read-only map
    n, seq_len = rows.shape
    device = next(teacher.parameters()).device
    names = _shard_names(shard)
    hidden = [root / f".{name}.tmp" for name in names[:2]]
    values = np.lib.format.open_memmap(hidden[0], "w+", np.float16, (n, seq_len, topk))
    ids = np.lib.format.open_memmap(hidden[1], "w+", np.int32, (n, seq_len, topk))
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        with torch.no_grad(), bf16_autocast(device, autocast):
            logp, idx = teacher_topk(teacher, rows[lo:hi].to(device), topk)
        values[lo:hi] = logp.cpu().numpy().astype(np.float16)
        ids[lo:hi] = idx.cpu().numpy().astype(np.int32)
    values.flush()
    ids.flush()
    del values, ids
    record: dict[str, Any] = {"shard": shard, "files": {}}
    for kind, name, tmp in zip(("logprobs", "indices"), names[:2], hidden, strict=True):
        os.replace(tmp, root / name)
        record["files"][f"{kind}-{shard}"] = {"file": name, "shape": [n, seq_len, topk],
                                              "dtype": "float16" if kind == "logprobs" else "int32",
                                              **file_entry(root / name)}  # read back once, while in page cache
    write_json_atomic(root / names[2], record)
    return record


@dataclass
class CacheBuild:
    """A cache being built in `partial` (`<out_dir>.partial/`, beside its final place): tokens.npy, build.json (what
    the cache is of) and the shards completed so far. A restarted build over the same sequences, teacher, top-k and
    shard size keeps those shards and computes only `pending`; anything else starts it again."""

    out_dir: Path
    partial: Path
    identity: dict[str, Any]
    pending: list[int]
    complete: bool = False  # `out_dir` already holds this very cache: nothing to compute, `finish` opens it

    @property
    def tokens_path(self) -> Path:
        return self.partial / "tokens.npy"

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return shard_bounds(int(self.identity["num_sequences"]), int(self.identity["shard_sequences"]))

    @classmethod
    def begin(cls, out_dir: str | os.PathLike[str], sequences: np.ndarray | torch.Tensor, *, topk: int,
              vocab_size: int, shard_sequences: int, dtype: str, teacher_fingerprint: str,
              tokenizer_fingerprint: str | None, overwrite: bool = True) -> CacheBuild:
        final = Path(out_dir)
        check_output_dir(final, overwrite)
        tokens = np.ascontiguousarray(np.asarray(sequences), dtype=np.int32)
        if tokens.ndim != 2 or tokens.shape[0] < 1:
            raise UserError(f"logit cache sequences must be a non-empty [N, T] array but got {list(tokens.shape)}.")
        if not 1 <= topk <= vocab_size:
            raise UserError(f"topk must be in [1, {vocab_size}] but got {topk!r}.")
        identity = {"format_version": FORMAT_VERSION, "num_sequences": int(tokens.shape[0]),
                    "seq_len": int(tokens.shape[1]), "topk": topk, "vocab_size": vocab_size,
                    "shard_sequences": shard_sequences, "temperature": 1.0, "dtype": dtype,
                    "teacher_fingerprint": teacher_fingerprint, "tokenizer_fingerprint": tokenizer_fingerprint,
                    "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
        partial = final.with_name(final.name + ".partial")
        build = cls(final, partial, identity, [])
        if _holds(final / MANIFEST, identity):  # finished, then a crash before its stage's marker: kept
            build.complete = True
            return build
        saved = partial / "build.json"
        if not (_holds(saved, identity) and (partial / "tokens.npy").is_file()):
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            np.save(partial / ".tokens.npy", tokens)  # np.save appends .npy to a name without it
            os.replace(partial / ".tokens.npy", build.tokens_path)
            write_json_atomic(saved, identity)
        build.pending = [i for i in range(len(build.bounds)) if build._shard_record(i) is None]
        return build

    def _shard_record(self, shard: int) -> dict[str, Any] | None:
        """The completed shard's record, or None when it is missing or a file of it is not as recorded (size)."""
        path = self.partial / _shard_names(shard)[2]
        try:
            record = json.loads(path.read_text())
            for entry in record["files"].values():
                if (self.partial / entry["file"]).stat().st_size != int(entry["size"]):
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return dict(record)

    def finish(self, extra: dict[str, Any] | None = None) -> LogitCache:
        """Write the manifest from the shards' records and move the cache to `out_dir` in one rename."""
        if self.complete:
            return LogitCache.open(self.out_dir, verify=False)
        missing = [i for i in range(len(self.bounds)) if self._shard_record(i) is None]
        if missing:
            raise RuntimeError(f"logit cache shards {missing} are not complete in {self.partial}")
        manifest = {**self.identity, **(extra or {})}
        num, seq_len = manifest["num_sequences"], manifest["seq_len"]
        manifest["shards"] = [{"start": lo, "stop": hi} for lo, hi in self.bounds]
        manifest["files"] = {"tokens": {"file": "tokens.npy", "shape": [num, seq_len], "dtype": "int32",
                                        **file_entry(self.tokens_path)}}
        for shard in range(len(self.bounds)):
            manifest["files"].update(self._shard_record(shard)["files"])  # type: ignore[index]
        for path in [self.partial / "build.json", *self.partial.glob("shard-*.json")]:
            path.unlink()
        write_json_atomic(self.partial / MANIFEST, manifest)
        replace_directory(self.partial, self.out_dir)
        return LogitCache.open(self.out_dir, verify=False)


def _holds(record: Path, identity: dict[str, Any]) -> bool:
    """Whether the JSON file `record` (a build's build.json, a finished cache's manifest) has every key of
    `identity` at its value."""
    try:
        found = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and all(found.get(k) == v for k, v in json.loads(json.dumps(identity)).items())


def build_logit_cache(
    teacher: PreTrainedModel,
    sequences: torch.Tensor,
    out_dir: str | os.PathLike[str],
    topk: int,
    batch_size: int,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    shard_sequences: int = 1024,
    overwrite: bool = False,
    dtype: str = "float32",
) -> LogitCache:
    """Run the teacher once over sequences [N, T] in this process and write its top-k log-probs; return the opened
    cache. Resumable shard by shard (`CacheBuild`); `dtype` "bf16" runs float32 weights under bf16 autocast, and a
    bf16 teacher computes in bf16 whatever `dtype` says. `distill.ray_cache` spreads the shards over Ray workers."""
    started = time.monotonic()
    param_dtype = next(teacher.parameters()).dtype
    recorded = "bf16" if dtype == "bf16" or param_dtype == torch.bfloat16 else "float32"
    teacher.eval()
    build = CacheBuild.begin(out_dir, sequences.cpu().numpy(), topk=topk, vocab_size=int(teacher.config.vocab_size),
                             shard_sequences=shard_sequences, dtype=recorded,
                             teacher_fingerprint=weights_fingerprint(teacher),
                             tokenizer_fingerprint=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
                             overwrite=overwrite)
    if build.complete:
        return build.finish()
    tokens = np.load(build.tokens_path, mmap_mode="r")
    for shard in build.pending:
        lo, hi = build.bounds[shard]
        write_shard(teacher, tokens[lo:hi], build.partial, shard, topk, batch_size,
                    autocast=dtype == "bf16" and param_dtype != torch.bfloat16)
    del tokens
    return build.finish({"workers": 1, "build_seconds": round(time.monotonic() - started, 3),
                         "resumed_shards": len(build.bounds) - len(build.pending)})
