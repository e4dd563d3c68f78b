"""Atomic outputs: every stage writes into a temporary sibling directory and renames it into place.

A crash or a bad input therefore never leaves a half-written output where a later run would trust it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nas_minitron.errors import UserError

__all__ = ["atomic_directory", "check_output_dir", "check_output_file", "check_writable_dir",
           "file_sha256", "nearest_existing", "replace_directory", "write_json_atomic"]


def nearest_existing(path: Path) -> Path | None:
    """`path` or its nearest existing ancestor: where creating `path` would start."""
    return next((p for p in (path, *path.parents) if p.exists()), None)


def check_writable_dir(path: str | os.PathLike[str], flag: str) -> None:
    """UserError unless `path` is a writable directory or can be created as one (its nearest existing ancestor is a
    directory this process may write); the message names `flag` and the path."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a file, not a directory; choose another {flag}.")
    _check_creatable(target, flag, path)


def _check_creatable(target: Path, flag: str, shown: str | os.PathLike[str]) -> None:
    ancestor = nearest_existing(target.resolve())
    if ancestor is None or not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(shown)!r} is not writable: {str(ancestor)!r} is not a writable directory; "
                        f"choose another {flag}.")


def check_output_dir(path: str | os.PathLike[str], overwrite: bool, flag: str = "--out") -> None:
    """Refuse an output directory that `atomic_directory` could not write: a file, an existing directory unless
    `overwrite`, or one whose parent cannot be created or written. Call it before any expensive work."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a file, not a directory; choose another {flag}.")
    if target.exists() and not overwrite:
        raise UserError(f"output directory {str(path)!r} already exists; pass --overwrite to replace it.")
    _check_creatable(target.absolute().parent, flag, path)  # the temporary sibling and the rename go there


def check_output_file(path: str | os.PathLike[str], flag: str, expected: str = "a file name") -> None:
    """Refuse an output file that could not be written: a directory, or one whose directory cannot be created or
    written (a temporary file there is renamed onto it)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a directory; expected {expected}.")
    _check_creatable(target.absolute().parent, flag, path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path`; on success it replaces `path` in one rename."""
    final = Path(path)
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, final)


def replace_directory(source: Path, final: Path) -> None:
    """Rename the complete directory `source` to `final`, replacing what is there (moved aside first, so that
    `final` is never missing a complete directory for long)."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(source, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, final)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checksums in checkpoint and cache manifests)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
