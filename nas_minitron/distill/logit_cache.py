"""Teacher-logit cache: one teacher pass, shared by every trial of a search, so workers need not hold the teacher.

Layout of a cache directory (written atomically):
  manifest.json            format_version, num_sequences, seq_len, topk, vocab_size, the teacher's and the
                           tokenizer's fingerprints (`nas_minitron.teacher.weights_fingerprint` and
                           `tokenizer_fingerprint`), and for every file its shape, dtype, size and sha256
  tokens.npy               int32 [N, T]: the sequences the cache was built over (lookups go by their content)
  logprobs-00000.npy ...   float16 [n, T, k]: the teacher's top-k log-probabilities at temperature 1, sorted
  indices-00000.npy ...    int32 [n, T, k]: their token ids
Shards hold `shard_sequences` sequences each and are memory-mapped on open. How the tail mass outside the top-k
enters the loss is described in `nas_minitron.distill.losses` (an explicit "rest" bucket).

Integrity: the sha256 are computed by reading the shards back once they are written; `open` checks every file's
size (free), `open(verify=True)` (`--verify`) every sha256 as well (a full read of the cache: at 8B scale tens of GB,
see benchmarks/bench_integrity.py), so that each of a search's trials does not re-hash the whole cache. A manifest
written before sizes were recorded is checked in full.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.artifacts import artifact_error, reading
from nas_minitron.atomic import atomic_directory
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

__all__ = ["FORMAT_VERSION", "MANIFEST", "LogitCache", "build_logit_cache"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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
    """Run the teacher once over sequences [N, T] and write its top-k log-probs; return the opened cache."""
    vocab = int(teacher.config.vocab_size)
    if sequences.dim() != 2 or sequences.shape[0] < 1:
        raise UserError(f"logit cache sequences must be a non-empty [N, T] tensor but got {list(sequences.shape)}.")
    if not 1 <= topk <= vocab:
        raise UserError(f"topk must be in [1, {vocab}] but got {topk!r}.")
    num, seq_len = sequences.shape
    device = next(teacher.parameters()).device
    teacher.eval()
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "num_sequences": num, "seq_len": seq_len, "topk": topk,
        "vocab_size": vocab, "shard_sequences": shard_sequences, "temperature": 1.0, "dtype": dtype,
        "teacher_fingerprint": weights_fingerprint(teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "shards": [], "files": {},
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        np.save(tmp / "tokens.npy", sequences.cpu().numpy().astype(np.int32))
        manifest["files"]["tokens"] = {"file": "tokens.npy", "shape": [num, seq_len], "dtype": "int32"}
        for shard, start in enumerate(range(0, num, shard_sequences)):
            stop = min(num, start + shard_sequences)
            names = (f"logprobs-{shard:05d}.npy", f"indices-{shard:05d}.npy")
            values = np.lib.format.open_memmap(tmp / names[0], "w+", np.float16, (stop - start, seq_len, topk))
            ids = np.lib.format.open_memmap(tmp / names[1], "w+", np.int32, (stop - start, seq_len, topk))
            for lo in range(start, stop, batch_size):
                hi = min(stop, lo + batch_size)
                with torch.no_grad(), bf16_autocast(device, dtype == "bf16"):
                    logits = teacher(input_ids=sequences[lo:hi].to(device)).logits  # [b, T, V]
                logp, idx = topk_targets(logits, topk)  # [b, T, k] each
                values[lo - start : hi - start] = logp.cpu().numpy().astype(np.float16)
                ids[lo - start : hi - start] = idx.cpu().numpy().astype(np.int32)
            values.flush()
            ids.flush()
            del values, ids
            manifest["shards"].append({"start": start, "stop": stop})
            for kind, name in zip(("logprobs", "indices"), names, strict=True):
                dtype_name = "float16" if kind == "logprobs" else "int32"
                manifest["files"][f"{kind}-{shard}"] = {"file": name, "shape": [stop - start, seq_len, topk],
                                                       "dtype": dtype_name}
        for entry in manifest["files"].values():  # read back once written: the one full read after writing
            entry.update(file_entry(tmp / entry["file"]))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return LogitCache.open(out_dir, verify=False)
