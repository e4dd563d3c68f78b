"""Text sources → packed token sequences: streamed, deterministic under a seed, with disjoint splits.

`data` strings:
  builtin                         CPython's `pydoc_data.topics` (one document per help topic) plus the standard
                                  library's own `.py` sources (one document per file; tests and site-packages left out)
  PATH                            a `.txt`, `.jsonl`, `.json` or `.parquet` file, or a folder searched recursively
                                  for them; rows take their text from `text_column` (default "text")
  hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]  a `datasets` hub dataset, streamed (needs network or the local HF cache);
                                  SPLIT defaults to "train", COLUMN to `text_column`; "-" leaves a field at its default

Local files must be UTF-8 (the builtin sources are read leniently). A file that is not, a JSON line that does not
parse or a corrupt parquet file is refused with one line naming the file (and the byte offset of bad UTF-8).

Documents: a `.txt` file is cut at blank lines into documents of whole paragraphs of at least 4 KiB of text (so one
big text file still spreads over every split); each `.jsonl`/`.json`/`.parquet` row and each hub row is one document.

Split rule (documented, tested): every document has a stable id (source-relative path, plus `#row` or `#chunk`);
`sha256("nas-minitron-split:" + id)` read as a fraction in [0, 1) puts it in calibration below 0.15, validation
below 0.20 and train otherwise. The rule ignores the seed, so the three splits are disjoint for every seed and never
move when files are added elsewhere.

Order: the source's files (shards) are shuffled under `seed`, then documents pass through a seeded shuffle buffer of
`SHUFFLE_BUFFER_DOCS` documents, so memory stays bounded by that buffer however large the corpus is. Each document
is tokenized on its own (no special tokens), followed by the tokenizer's EOS, and the token stream is cut into
`seq_len` chunks; a last partial chunk is dropped.

Packed sequences are saved as a safetensors file holding one int64 tensor `tokens` [N, T] (`save_sequences`,
`load_sequences`): the files of `nas-minitron distill`/benchmarks and of run directories made before the search's
token streams (`nas_minitron.tokens`: uint16/uint32 shards, tokenized in parallel, resumable). Each file's size and
sha256 go into its folder's `checksums.json` (`nas_minitron.integrity`) as it is written; a read checks its size
(free), `verify=True` (`--verify`) its sha256 too. A file without a recorded checksum (an older run) is read
unchecked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics as _PYDOC_TOPICS
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.artifacts import read_safetensors, reading
from nas_minitron.errors import UserError
from nas_minitron.integrity import verify_checksums, write_checksums
from nas_minitron.teacher import tokenizer_fingerprint

if TYPE_CHECKING:
    import datasets
    import pyarrow.parquet as pq
    import safetensors.torch as st
    import torch
    from transformers import PreTrainedTokenizerBase
else:
    datasets = lazy_import("datasets")
    pq = lazy_import("pyarrow.parquet")
    st = lazy_import("safetensors.torch")
    torch = lazy_import("torch")

__all__ = [
    "BUILTIN",
    "SPLITS",
    "SPLIT_BOUNDS",
    "data_fingerprint",
    "iter_documents",
    "iter_sequences",
    "load_sequences",
    "save_sequences",
    "separator_ids",
    "split_of",
    "take_sequences",
]

BUILTIN = "builtin"
SPLITS = ("calibration", "train", "validation")
# Upper bounds of each split's share of the hash range [0, 1): calibration [0, .15), validation [.15, .20), train rest.
SPLIT_BOUNDS = (("calibration", 0.15), ("validation", 0.20), ("train", 1.0))
SPLIT_RULE_VERSION = 1
SHUFFLE_BUFFER_DOCS = 256
TXT_DOC_MIN_CHARS = 4096
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_FIX_DATA = "fix the file (local data must be UTF-8 text, JSON Lines, JSON or parquet) or remove it"


@dataclass(frozen=True)
class _Shard:
    """A unit of reading (a file, or the pydoc topics): its name and a function yielding (doc_id, text)."""

    name: str
    read: Callable[[], Iterator[tuple[str, str]]]


def split_of(doc_id: str) -> str:
    """The split a document belongs to, from a stable hash of its id alone (seed-independent)."""
    digest = hashlib.sha256(f"nas-minitron-split:{doc_id}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return next(name for name, bound in SPLIT_BOUNDS if fraction < bound)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, but got {split!r}.")


# ---- sources -----------------------------------------------------------------------------------------------------
def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = _stdlib_root()
    files = [
        p for p in root.rglob("*.py") if not _SKIPPED_STDLIB_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _builtin_shards() -> list[_Shard]:
    def pydoc_topics() -> Iterator[tuple[str, str]]:
        for name in sorted(_PYDOC_TOPICS):
            yield f"pydoc/{name}", _PYDOC_TOPICS[name]

    root = _stdlib_root()
    shards = [_Shard("pydoc", pydoc_topics)]
    for path in _stdlib_files():
        rel = path.relative_to(root).as_posix()
        shards.append(_Shard(rel, functools.partial(_stdlib_document, path, rel)))
    return shards


def _stdlib_document(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    yield f"stdlib/{rel}", _read_text(path)


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _iter_txt(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    """Documents of whole paragraphs, at least TXT_DOC_MIN_CHARS each, read line by line (never the whole file)."""
    chunk: list[str] = []
    size, index = 0, 0
    with reading(path, "data file", _FIX_DATA), path.open(encoding="utf-8") as handle:
        for line in handle:
            chunk.append(line)
            size += len(line)
            if size >= TXT_DOC_MIN_CHARS and not line.strip():
                yield f"{rel}#{index}", "".join(chunk)
                chunk, size, index = [], 0, index + 1
    if "".join(chunk).strip():
        yield f"{rel}#{index}", "".join(chunk)


def _row_text(row: Any, column: str, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if column not in row:
            raise UserError(f"{where}: row has no text column {column!r}; its columns: {sorted(row)}.")
        value = row[column]
        return "" if value is None else str(value)
    raise UserError(f"{where}: expected an object with a {column!r} field or a string, but got {type(row).__name__}.")


def _iter_jsonl(path: Path, rel: str, column: str) -> Iterator[tuple[str, str]]:
    with reading(path, "data file", _FIX_DATA), path.open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{rel}: line {index + 1} is not JSON ({err.msg}).") from None
            yield f"{rel}#{index}", _row_text(row, column, f"{rel}:{index + 1}")


def _iter_json(path: Path, rel: str, column: str) -> Iterator[tuple[str, str]]:
    try:
        with reading(path, "data file", _FIX_DATA):
            text = path.read_text(encoding="utf-8")
        rows = json.loads(text)
    except json.JSONDecodeError:
        yield from _iter_jsonl(path, rel, column)  # JSON Lines saved as .json
        return
    if isinstance(rows, dict):
        rows = rows.get("data", rows.get("rows"))
    if not isinstance(rows, list):
        raise UserError(
            f"{rel}: expected a JSON list of rows (or {{'data': [...]}}) of objects with a {column!r} field."
        )
    for index, row in enumerate(rows):
        yield f"{rel}#{index}", _row_text(row, column, f"{rel}[{index}]")


def _iter_parquet(path: Path, rel: str, column: str) -> Iterator[tuple[str, str]]:
    with reading(path, "data file", _FIX_DATA):
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if column not in names:
            raise UserError(f"{rel}: parquet file has no text column {column!r}; its columns: {names}.")
        index = 0
        for batch in parquet.iter_batches(columns=[column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield f"{rel}#{index}", "" if value is None else str(value)
                index += 1


def _local_files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix not in FILE_SUFFIXES:
            raise UserError(f"data file {str(root)!r} has suffix {root.suffix!r}; valid: {', '.join(FILE_SUFFIXES)}.")
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise UserError(f"data folder {str(root)!r} holds no {', '.join(FILE_SUFFIXES)} files.")
    return files


def _local_shards(root: Path, column: str) -> list[_Shard]:
    readers: dict[str, Callable[..., Iterator[tuple[str, str]]]] = {
        ".txt": _iter_txt, ".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet,
    }
    shards = []
    for path in _local_files(root):
        rel = path.name if root.is_file() else path.relative_to(root).as_posix()
        reader = readers[path.suffix]
        args = (path, rel) if path.suffix == ".txt" else (path, rel, column)
        shards.append(_Shard(rel, functools.partial(reader, *args)))
    return shards


@dataclass(frozen=True)
class _HubSpec:
    name: str
    config: str | None
    split: str
    column: str


def _parse_hub(data: str, column: str) -> _HubSpec:
    fields = data[len("hf:") :].split(":")
    if not fields[0] or len(fields) > 4:
        raise UserError(f"hub data must look like hf:NAME[:CONFIG[:SPLIT[:COLUMN]]], but got {data!r}.")
    fields += ["-"] * (4 - len(fields))
    name, config, split, col = (None if f in ("", "-") else f for f in fields)
    assert name is not None
    return _HubSpec(name, config, split or "train", col or column)


def _hub_shards(spec: _HubSpec) -> list[_Shard]:
    def rows() -> Iterator[tuple[str, str]]:
        load_dataset = datasets.load_dataset  # outside the try: a missing `datasets` is not a data-spec error
        try:
            stream = load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
        except Exception as err:  # noqa: BLE001 - any hub/cache failure is the user's data spec
            raise UserError(f"could not open hub dataset {spec.name!r} ({type(err).__name__}: {err}).") from None
        # Row ids are positions in the unshuffled stream, so the split rule stays stable; order comes from our buffer.
        for index, row in enumerate(stream):
            yield f"{spec.name}/{spec.config}/{spec.split}#{index}", _row_text(row, spec.column, spec.name)

    return [_Shard(spec.name, rows)]


def _shards(data: str, text_column: str, seed: int) -> list[_Shard]:
    if data == BUILTIN:
        return _builtin_shards()
    if data.startswith("hf:"):
        return _hub_shards(_parse_hub(data, text_column))
    path = Path(data).expanduser()
    if not path.exists():
        raise UserError(
            f"data {data!r} not found: expected {BUILTIN!r}, a .txt/.jsonl/.json/.parquet file or folder, "
            f"or hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]."
        )
    return _local_shards(path, text_column)


# ---- documents → sequences ---------------------------------------------------------------------------------------
def _buffer_shuffle(items: Iterable[tuple[str, str]], rng: random.Random, size: int) -> Iterator[tuple[str, str]]:
    """A seeded shuffle buffer: emits a random buffered item per new item, then the rest shuffled."""
    buffer: list[tuple[str, str]] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def iter_documents(data: str, split: str, seed: int = 0, text_column: str = "text") -> Iterator[tuple[str, str]]:
    """(doc_id, text) of one split, in a seeded order; empty documents skipped."""
    _check_split(split)
    shards = _shards(data, text_column, seed)
    rng = random.Random(f"nas-minitron-order:{seed}")
    rng.shuffle(shards)

    def in_split() -> Iterator[tuple[str, str]]:
        for shard in shards:
            for doc_id, text in shard.read():
                if text.strip() and split_of(doc_id) == split:
                    yield doc_id, text

    yield from _buffer_shuffle(in_split(), rng, SHUFFLE_BUFFER_DOCS)


def separator_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The id that follows every document (EOS, else BOS, else none)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


def iter_sequences(
    data: str,
    tokenizer: PreTrainedTokenizerBase,
    split: str,
    seq_len: int,
    seed: int = 0,
    text_column: str = "text",
) -> Iterator[torch.Tensor]:
    """int64 tensors of shape [seq_len]: documents tokenized one at a time, EOS-separated, packed, streamed."""
    if seq_len < 1:
        raise UserError(f"seq_len must be at least 1, but got {seq_len}.")
    separator = separator_ids(tokenizer)
    pending: list[int] = []
    for _doc_id, text in iter_documents(data, split, seed, text_column):
        pending.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        pending.extend(separator)
        start = 0
        while len(pending) - start >= seq_len:
            yield torch.tensor(pending[start : start + seq_len], dtype=torch.int64)  # [seq_len]
            start += seq_len
        del pending[:start]


def take_sequences(
    data: str,
    tokenizer: PreTrainedTokenizerBase,
    split: str,
    seq_len: int,
    num_sequences: int,
    seed: int = 0,
    text_column: str = "text",
) -> torch.Tensor:
    """The first `num_sequences` packed sequences of a split: [num_sequences, seq_len] int64."""
    if num_sequences < 1:
        raise UserError(f"the number of sequences must be at least 1, but got {num_sequences}.")
    rows: list[torch.Tensor] = []
    for row in iter_sequences(data, tokenizer, split, seq_len, seed, text_column):
        rows.append(row)
        if len(rows) == num_sequences:
            return torch.stack(rows)  # [num_sequences, seq_len]
    raise UserError(
        f"too little data: the {split} split of {data!r} holds {len(rows)} sequences of {seq_len} tokens "
        f"(about {len(rows) * seq_len:,} tokens once packed), but {num_sequences} sequences "
        f"({num_sequences * seq_len:,} tokens) were asked for; use fewer --num-samples, a shorter --seq-len "
        f"or more data."
    )


# ---- sequence files ----------------------------------------------------------------------------------------------
def save_sequences(path: str | os.PathLike[str], tokens: torch.Tensor) -> None:
    """Write token ids [N, T] as the `tokens` tensor of a safetensors file, and its checksum next to it."""
    file = Path(path)
    st.save_file({"tokens": tokens.contiguous()}, str(file))
    write_checksums(file.parent, [file.name])


def load_sequences(path: str | os.PathLike[str], verify: bool = False) -> torch.Tensor:
    """The token ids [N, T] a `save_sequences` file holds; UserError naming a damaged file (one whose size differs
    from the recorded one, or with `verify` its sha256)."""
    file = Path(path)
    hint = "it is damaged: start a new run (or rerun the stage that wrote it)"
    tokens = read_safetensors(file, "token file", hint=hint, require=("tokens",))["tokens"]
    verify_checksums(file.parent, "token file", hint, full=verify, names=[file.name])  # last: the reasons above first
    return tokens


# ---- fingerprint -------------------------------------------------------------------------------------------------
def _source_fingerprint(data: str, text_column: str) -> dict[str, Any]:
    """What identifies a source's content cheaply: file names, sizes and modification times (no full read)."""
    if data == BUILTIN:
        root = _stdlib_root()
        files = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in _stdlib_files()]
        return {"builtin": sys.version.split()[0], "files": _digest(files)}
    if data.startswith("hf:"):
        return {"hub": _parse_hub(data, text_column).__dict__}
    path = Path(data).expanduser()
    if not path.exists():
        _shards(data, text_column, 0)  # raises the UserError
    listing = [(p.name if path.is_file() else p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
               for p in _local_files(path)]
    return {"local": str(path.resolve()), "files": _digest(listing), "text_column": text_column}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(
    data: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    split: str | None = None,
    seq_len: int | None = None,
    num_sequences: int | None = None,
    seed: int = 0,
    text_column: str = "text",
) -> str:
    """A short hash of everything that decides the token batches: source, split rule, tokenizer and sizes."""
    parts = {
        "source": _source_fingerprint(data, text_column),
        "split_rule": SPLIT_RULE_VERSION,
        "bounds": SPLIT_BOUNDS,
        "tokenizer": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        "split": split,
        "seq_len": seq_len,
        "num_sequences": num_sequences,
        "seed": seed,
    }
    return _digest(parts)
