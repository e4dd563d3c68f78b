"""Checksums of what the project writes: one record per directory, written after the files, checked when read.

`checksums.json` in a written directory lists, for each file (path relative to the directory), its size in bytes
and sha256:
  {"format_version": 1, "files": {"model.safetensors": {"size": 1234, "sha256": "..."}, ...}}
It is written by `write_checksums` once the files are complete, by reading them back (the one full read after
writing), and checked by `verify_checksums`:
  full=False   every listed file exists with its listed size (a stat per file: free at any size)
  full=True    and its sha256 matches (a full read: see benchmarks/bench_integrity.py for the cost)
A mismatch is one `UserError` naming the file: "altered or truncated since it was written (sha256 mismatch)".
A directory without `checksums.json` (written before this record existed, or a user's own Hugging Face model) is
accepted unchecked; files not listed (added later, e.g. evaluation results) are ignored.

Which artifacts carry it and when each is verified: importance scores (small: in full on every read), token files
(sizes on every read, in full on `--verify`), saved students (the same). The logit cache and trainer checkpoints
keep their own manifests (`manifest.json`, `state.json`) and check each entry with `check_file`.
`checksums.json` is an extra JSON file that stock `from_pretrained` ignores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nas_minitron.artifacts import artifact_error, reading
from nas_minitron.atomic import file_sha256, write_json_atomic
from nas_minitron.errors import UserError

__all__ = ["CHECKSUMS", "check_file", "file_entry", "has_checksums", "verify_checksums", "write_checksums"]

CHECKSUMS = "checksums.json"
FORMAT_VERSION = 1
_CHANGED = "altered or truncated since it was written"
ALTERED = f"{_CHANGED} (sha256 mismatch)"

PathLike = str | os.PathLike[str]


def file_entry(path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of a file as it is on disk now."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _listed(directory: Path) -> list[str]:
    """Every file under `directory` but the record itself and hidden (temporary) files, relative, sorted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS and not p.name.startswith("."))


def write_checksums(directory: PathLike, names: Iterable[str] | None = None) -> None:
    """Record size + sha256 of `names` (default: every file under `directory`) in `directory/checksums.json`.

    Entries already recorded for other files are kept, so that files written one at a time (token files) can each
    add their own. Written through a rename: a hard-linked record is replaced, never written through.
    """
    root = Path(directory)
    files: dict[str, Any] = dict(_read_record(root)["files"]) if (root / CHECKSUMS).is_file() else {}
    for name in _listed(root) if names is None else names:
        files[name] = file_entry(root / name)
    write_json_atomic(root / CHECKSUMS, {"format_version": FORMAT_VERSION, "files": dict(sorted(files.items()))})


def has_checksums(directory: PathLike) -> bool:
    return (Path(directory) / CHECKSUMS).is_file()


def _read_record(root: Path) -> dict[str, Any]:
    path = root / CHECKSUMS
    hint = f"delete {CHECKSUMS} to accept the directory unchecked, or rewrite it"
    with reading(path, "checksum record", hint, extra=(TypeError, AttributeError)):
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record["files"], dict):
            raise artifact_error(path, "checksum record", "not a JSON object with a 'files' object", hint)
        for entry in record["files"].values():  # a KeyError or TypeError here: a damaged entry
            entry.update(size=int(entry["size"]), sha256=str(entry["sha256"]))
    if record.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checksum record {str(path)!r} has format_version {record.get('format_version')!r}, "
                        f"expected {FORMAT_VERSION}.")
    return record


def check_file(path: Path, entry: Mapping[str, Any], what: str, hint: str, *, full: bool) -> None:
    """UserError naming `path` when it is missing, its size differs from `entry["size"]` (when recorded), or (with
    `full`, or when no size is recorded) its sha256 differs from `entry["sha256"]`."""
    if not path.is_file():
        raise artifact_error(path, what, "no such file (it is listed in the manifest written with it)", hint)
    size = entry.get("size")
    if size is not None and path.stat().st_size != int(size):
        raise artifact_error(path, what, f"{_CHANGED} (size {path.stat().st_size:,} bytes, "
                                         f"{int(size):,} when written)", hint)
    if (full or size is None) and file_sha256(path) != entry["sha256"]:
        raise artifact_error(path, what, ALTERED, hint)


def verify_checksums(directory: PathLike, what: str, hint: str, *, full: bool,
                     names: Iterable[str] | None = None) -> bool:
    """Check the files `checksums.json` lists (only `names` of them, when given) against it: sizes always, sha256
    with `full`. False when the directory has no record (accepted unchecked), True when every file matched."""
    root = Path(directory)
    if not (root / CHECKSUMS).is_file():
        return False
    files = _read_record(root)["files"]
    for name in files if names is None else [n for n in names if n in files]:
        check_file(root / name, files[name], what, hint, full=full)
    return True
