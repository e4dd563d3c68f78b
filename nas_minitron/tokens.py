"""Token streams on disk: packed sequences in memory-mapped shards, tokenized in parallel, resumable shard by shard.

A stream is a directory (a run's data/train_short/, data/train_full/, data/validation/):
  manifest.json     {"format_version": 1, "dtype": "uint16" | "uint32", "seq_len": T, "shard_sequences": S,
                     "num_sequences": N, "split", "data": data_fingerprint(...), "tokenizer": tokenizer_fingerprint,
                     "start": [doc, offset], "shards": [{"name", "num_sequences", "end": [doc, offset]}, ...]}
  shard-00000.npy   the rows [S, T] of shard 0 (the last shard holds the rest), a plain .npy array of `dtype`
  checksums.json    size + sha256 of every shard (`nas_minitron.integrity`), each added as its shard is written
The dtype is uint16 when every id of the tokenizer fits (vocabulary of at most 65,536), else uint32: 2 or 4 bytes a
token on disk instead of int64's 8. A reader memory-maps the shards and hands out int64 rows, so no process holds
a whole stream in memory; a Ray Train worker reads only its own rows.

Sequences are exactly `data.take_sequences`'s: the documents of `data.iter_documents` in its seeded order, each
tokenized on its own and followed by the separator (EOS), packed into rows of T tokens. A cursor (doc, offset) names
the token `offset` of document `doc` (counted in that order, separator included): each shard records where the next
one starts, so a restarted writer keeps the complete shards and continues from there (documents before the cursor
are read but not tokenized), and a stream may start where another one of the same split ended (the winners'
stream continues the trials' without tokenizing it again).

Tokenization of a fast tokenizer runs over chunks of documents, in order: by default in the caller, batched, where
the Rust backend spreads each batch over every CPU (its threads); with `num_proc` > 1 in that many processes of one
thread each, with their own copy of the backend. On 2 loaded CPUs the default was 1.8x `take_sequences` and 2
processes 1.0x (benchmarks/bench_tokenize.py). A slow tokenizer tokenizes in the caller, one document at a time. The
ids equal the tokenizer's own `tokenizer(text, add_special_tokens=False)` (tests/test_tokens.py).
A `.safetensors` token file of an older run (`data.save_sequences`) opens as a stream too (`open_tokens`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.artifacts import reading
from nas_minitron.atomic import write_json_atomic
from nas_minitron.data import data_fingerprint, iter_documents, load_sequences, separator_ids
from nas_minitron.errors import UserError
from nas_minitron.integrity import CHECKSUMS, verify_checksums, write_checksums
from nas_minitron.teacher import tokenizer_fingerprint

if TYPE_CHECKING:
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase
else:
    np = lazy_import("numpy")
    torch = lazy_import("torch")

__all__ = ["MANIFEST", "TokenBatches", "TokenStream", "open_tokens", "token_dtype", "write_stream"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_BYTES = 2**26  # 64 MiB a shard by default: 2B tokens of uint16 in ~60 files
CHUNK_CHARS = 2**20  # text per task of a tokenizing process
FAULT_ENV = "NAS_MINITRON_FAULT_TOKEN_SHARD"  # test hook: SIGKILL the writer once it has written this shard index
_HINT = "it is damaged: rerun the stage that wrote it (delete the folder, then --resume)"
_IDENTITY = ("format_version", "dtype", "seq_len", "shard_sequences", "num_sequences", "split", "data", "tokenizer",
             "start")

Cursor = tuple[int, int]  # (document index, token offset in it)


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every id below `vocab_size`."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    return max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


# ---- reading ---------------------------------------------------------------------------------------------------
class TokenStream:
    """Packed sequences [N, T] read through memory maps (or, for an older run's file, held in memory)."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int, end: Cursor | None = None,
                 where: str = "") -> None:
        self._arrays = arrays  # [n_i, T] each
        self._starts = np.cumsum([0] + [a.shape[0] for a in arrays])
        self.seq_len, self.end, self.where = seq_len, end, where

    @property
    def num_sequences(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_sequences, self.seq_len

    @classmethod
    def open(cls, directory: str | os.PathLike[str], verify: bool = False) -> TokenStream:
        """A complete stream directory; UserError naming what is damaged or missing (sizes always checked, sha256
        with `verify`)."""
        root = Path(directory)
        manifest = _read_manifest(root)
        if manifest is None:
            raise UserError(f"token stream {str(root)!r} has no {MANIFEST}: rerun the stage that writes it "
                            f"(--resume), or pass a stream directory.")
        if not _complete(manifest):
            raise UserError(f"token stream {str(root)!r} is incomplete ({len(manifest['shards'])} shards written): "
                            f"continue the stage that writes it with --resume.")
        names = [entry["name"] for entry in manifest["shards"]]
        verify_checksums(root, "token shard", _HINT, full=verify, names=names)
        arrays = []
        for entry in manifest["shards"]:
            path = root / entry["name"]
            with reading(path, "token shard", _HINT):
                array = np.load(path, mmap_mode="r")
            if array.shape != (entry["num_sequences"], manifest["seq_len"]) or array.dtype != manifest["dtype"]:
                raise UserError(f"token shard {str(path)!r} holds {array.dtype} {list(array.shape)}, but its manifest "
                                f"says {manifest['dtype']} [{entry['num_sequences']}, {manifest['seq_len']}]; "
                                f"{_HINT}.")
            arrays.append(array)
        end = tuple(manifest["shards"][-1]["end"])
        return cls(arrays, int(manifest["seq_len"]), (int(end[0]), int(end[1])), str(root))

    @classmethod
    def from_tensor(cls, tokens: torch.Tensor, where: str = "") -> TokenStream:
        return cls([tokens.numpy()], int(tokens.shape[1]), None, where)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as int64 [stop - start, T]; reads only the shards they lie in."""
        start, stop = max(0, start), min(stop, self.num_sequences)
        parts = []
        for index, array in enumerate(self._arrays):
            lo, hi = int(self._starts[index]), int(self._starts[index + 1])
            if hi > start and lo < stop:
                parts.append(array[max(start, lo) - lo : min(stop, hi) - lo])
        if not parts:
            return torch.empty(0, self.seq_len, dtype=torch.int64)
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))  # [stop - start, T]

    def take(self, indices: Iterable[int]) -> torch.Tensor:
        """The rows at `indices` (in that order) as int64 [len(indices), T]."""
        wanted = np.asarray(list(indices), dtype=np.int64)
        shard = np.searchsorted(self._starts, wanted, side="right") - 1
        out = np.empty((len(wanted), self.seq_len), dtype=np.int64)
        for index in np.unique(shard):
            mask = shard == index
            out[mask] = self._arrays[index][wanted[mask] - self._starts[index]]
        return torch.from_numpy(out)

    def tensor(self) -> torch.Tensor:
        """Every row, int64 [N, T] (for the small streams: validation, the logit cache's)."""
        return self.rows(0, self.num_sequences)

    def batches(self, batch_size: int, rank: int = 0, world: int = 1) -> TokenBatches:
        """The micro-batches `distill()` takes from the tensor `self.tensor()[rank::world]`, read as they are used."""
        return TokenBatches(self, batch_size, rank, world)


class TokenBatches:
    """Re-iterable micro-batches [B, T] of rows rank, rank + world, ... of a stream: whole batches in order, as
    `distill()` cuts a tensor of sequences (so a run on either gets the same batches)."""

    def __init__(self, stream: TokenStream, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.stream, self.batch_size, self.rank, self.world = stream, batch_size, rank, world
        num_rows = len(range(rank, stream.num_sequences, world))
        if num_rows < batch_size:
            raise UserError(f"training data has {num_rows} sequences, fewer than one batch of {batch_size}.")
        self.num_batches = num_rows // batch_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        b = self.batch_size
        for index in range(self.num_batches):
            if self.world == 1:
                yield self.stream.rows(index * b, (index + 1) * b)  # [B, T]
            else:
                yield self.stream.take(range(self.rank + index * b * self.world,
                                             self.rank + (index + 1) * b * self.world, self.world))  # [B, T]


def open_tokens(path: str | os.PathLike[str], verify: bool = False) -> TokenStream:
    """A stream directory, or the `.safetensors` token file of an older run (read whole, as it was)."""
    where = Path(path)
    if where.suffix == ".safetensors":
        return TokenStream.from_tensor(load_sequences(where, verify=verify), str(where))
    return TokenStream.open(where, verify=verify)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    with reading(path, "token stream manifest", _HINT, extra=(TypeError,)):
        manifest: dict[str, Any] = json.loads(path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION or not isinstance(manifest.get("shards"), list):
            raise UserError(f"token stream {str(root)!r} was made by an older version; rerun in a new --run-dir.")
    return manifest


def _complete(manifest: dict[str, Any]) -> bool:
    return sum(int(e["num_sequences"]) for e in manifest["shards"]) == int(manifest["num_sequences"])


# ---- tokenizing ------------------------------------------------------------------------------------------------
_WORKER: Tokenizer | None = None  # a tokenizing process's own backend


def _backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """A copy of a fast tokenizer's Rust backend as `tokenizer(text)` runs it (no truncation, no padding)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _init_worker(backend_json: str) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes are the parallelism
    from tokenizers import Tokenizer

    _WORKER = Tokenizer.from_str(backend_json)
    _WORKER.no_truncation()
    _WORKER.no_padding()


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _WORKER is not None
    return [e.ids for e in _WORKER.encode_batch(texts, add_special_tokens=False)]


def _chunks(docs: Iterator[tuple[int, str]]) -> Iterator[tuple[list[int], list[str]]]:
    """(indices, texts) of consecutive documents, about CHUNK_CHARS of text each."""
    indices: list[int] = []
    texts: list[str] = []
    size = 0
    for index, text in docs:
        indices.append(index)
        texts.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield indices, texts
            indices, texts, size = [], [], 0
    if texts:
        yield indices, texts


def _encoded(docs: Iterator[tuple[int, str]], tokenizer: PreTrainedTokenizerBase,
             num_proc: int) -> Iterator[tuple[int, list[int]]]:
    """(document index, ids) in document order, tokenized in `num_proc` processes (in this one when 1)."""
    backend = _backend(tokenizer)
    if backend is None:  # a slow tokenizer: one document at a time, as `iter_sequences`
        for index, text in docs:
            yield index, tokenizer(text, add_special_tokens=False)["input_ids"]
        return
    if num_proc <= 1:
        for indices, texts in _chunks(docs):
            yield from zip(indices, (e.ids for e in backend.encode_batch(texts, add_special_tokens=False)))
        return
    context = multiprocessing.get_context("spawn")  # the driver holds threads (torch): no fork
    with concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker,
                                                initargs=(backend.to_str(),)) as pool:
        pending: collections.deque[tuple[list[int], concurrent.futures.Future[list[list[int]]]]] = (
            collections.deque())
        for indices, texts in _chunks(docs):
            pending.append((indices, pool.submit(_encode_chunk, texts)))
            if len(pending) >= 2 * num_proc:  # bounded: a few chunks in flight per process
                done_indices, future = pending.popleft()
                yield from zip(done_indices, future.result())
        while pending:
            done_indices, future = pending.popleft()
            yield from zip(done_indices, future.result())


def _documents_from(data: str, split: str, seed: int, text_column: str, start: Cursor) -> Iterator[tuple[int, str]]:
    """(index, text) of the split's documents from document `start[0]` on (those before it read, not tokenized)."""
    for index, (_doc_id, text) in enumerate(iter_documents(data, split, seed, text_column)):
        if index >= start[0]:
            yield index, text


# ---- writing ---------------------------------------------------------------------------------------------------
def write_stream(
    directory: str | os.PathLike[str],
    data: str,
    tokenizer: PreTrainedTokenizerBase,
    split: str,
    seq_len: int,
    num_sequences: int,
    *,
    seed: int = 0,
    text_column: str = "text",
    start: Cursor = (0, 0),
    shard_sequences: int | None = None,
    num_proc: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TokenStream:
    """Tokenize the first `num_sequences` packed sequences of `split` from cursor `start` into a stream directory
    and open it. Shards already complete there (same manifest identity, sizes as recorded) are kept and writing
    continues after them; a directory of another identity is written anew. UserError when the split runs out."""
    if seq_len < 1 or num_sequences < 1:
        raise UserError(f"seq_len and the number of sequences must be at least 1, but got {seq_len} and "
                        f"{num_sequences}.")
    root = Path(directory)
    dtype = token_dtype(_vocab_size(tokenizer))
    per_shard = shard_sequences or max(1, SHARD_BYTES // (seq_len * np.dtype(dtype).itemsize))
    identity = {"format_version": FORMAT_VERSION, "dtype": dtype, "seq_len": seq_len, "shard_sequences": per_shard,
                "num_sequences": num_sequences, "split": split,
                "data": data_fingerprint(data, tokenizer, split, seq_len, None, seed, text_column),
                "tokenizer": tokenizer_fingerprint(tokenizer), "start": list(start)}
    shards = _kept_shards(root, identity)
    manifest: dict[str, Any] = {**identity, "shards": shards}
    if _complete(manifest):
        return TokenStream.open(root)
    write_json_atomic(root / MANIFEST, manifest)
    cursor: Cursor = (int(shards[-1]["end"][0]), int(shards[-1]["end"][1])) if shards else start
    done = sum(e["num_sequences"] for e in shards)
    if log is not None:
        where = f"continuing after shard {len(shards) - 1}" if shards else "from the start"
        log(f"  tokenizing {num_sequences - done:,} {split} sequences of {seq_len} into {root.name}/ "
            f"({dtype}, {math.ceil(num_sequences / per_shard)} shard(s), {where})")
    rows = _packed_rows(data, tokenizer, split, seq_len, seed, text_column, cursor, num_proc or 1)
    for index in range(len(shards), math.ceil(num_sequences / per_shard)):
        count = min(per_shard, num_sequences - index * per_shard)
        block, end = _take_rows(rows, count, seq_len, dtype)
        if block.shape[0] < count:
            raise UserError(
                f"too little data: the {split} split of {data!r} holds {done + block.shape[0]} sequences of "
                f"{seq_len} tokens after document {start[0]}, but {num_sequences} were asked for; use fewer "
                f"tokens, a shorter --seq-len or more data.")
        _write_shard(root, index, block)
        manifest["shards"].append({"name": _shard_name(index), "num_sequences": count, "end": list(end)})
        write_json_atomic(root / MANIFEST, manifest)
        done += count
        if os.environ.get(FAULT_ENV) == str(index):
            os.kill(os.getpid(), signal.SIGKILL)
    return TokenStream.open(root)


def _kept_shards(root: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """The complete shards of an earlier writer of the same stream, in order, up to the first missing or damaged
    one; none (and the directory emptied) when the manifest there describes another stream."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _read_manifest(root)
    except UserError:
        manifest = None
    if manifest is None or any(manifest.get(k) != identity[k] for k in _IDENTITY):
        for item in root.iterdir():
            if item.is_file() and (item.name in (MANIFEST, CHECKSUMS) or item.suffix == ".npy"):
                item.unlink()
        return []
    kept = []
    for entry in manifest["shards"]:
        try:
            verify_checksums(root, "token shard", _HINT, full=False, names=[entry["name"]])
        except UserError:
            break
        if not (root / entry["name"]).is_file():
            break
        kept.append(entry)
    return kept


def _packed_rows(data: str, tokenizer: PreTrainedTokenizerBase, split: str, seq_len: int, seed: int,
                 text_column: str, start: Cursor, num_proc: int) -> Iterator[tuple[np.ndarray, Cursor]]:
    """(row [T], the cursor just after it) from cursor `start`, packed exactly as `data.iter_sequences` packs."""
    separator = separator_ids(tokenizer)
    tail: list[int] = []
    for index, ids in _encoded(_documents_from(data, split, seed, text_column, start), tokenizer, num_proc):
        skipped = start[1] if index == start[0] else 0  # the first document's tokens before the cursor
        before = len(tail)
        buffer = tail + (list(ids) + separator)[skipped:]
        num_rows = len(buffer) // seq_len
        for row in range(num_rows):
            # the next row starts at buffer position (row + 1) * T: token (row + 1) * T - before (+ skipped) of this
            # document
            after = (index, skipped + (row + 1) * seq_len - before)
            yield np.asarray(buffer[row * seq_len : (row + 1) * seq_len]), after
        tail = buffer[num_rows * seq_len :]


def _take_rows(rows: Iterator[tuple[np.ndarray, Cursor]], count: int, seq_len: int,
               dtype: str) -> tuple[np.ndarray, Cursor]:
    """Up to `count` rows as one [n, T] array of `dtype`, and the cursor after the last."""
    block = np.empty((count, seq_len), dtype=dtype)
    end: Cursor = (0, 0)
    filled = 0
    for row, after in rows:
        if int(row.max(initial=0)) > np.iinfo(block.dtype).max:
            raise UserError(f"token id {int(row.max())} does not fit {dtype}: the tokenizer's vocabulary is larger "
                            f"than it says.")
        block[filled], end = row, after
        filled += 1
        if filled == count:
            break
    return block[:filled], end


def _write_shard(root: Path, index: int, block: np.ndarray) -> None:
    """One shard, whole or not at all (a hidden temporary renamed into place), then its checksum."""
    name = _shard_name(index)
    tmp = root / f".{name}.tmp"
    with tmp.open("wb") as handle:
        np.save(handle, block)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(root / name)
    write_checksums(root, [name])
