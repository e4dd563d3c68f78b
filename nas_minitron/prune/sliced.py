"""Cut a student straight out of the teacher's safetensors files, never loading the teacher.

`slice_student(teacher_dir, target, keep)` builds the very model `surgery.materialize` builds from a loaded
teacher (bit for bit: the same `copy_plan` rules, the same gathers and casts), but reads, tensor by tensor, only
what the student keeps: `safe_open(...).get_slice` over windows of at most `_CHUNK_BYTES` of teacher rows that
cover nearby kept rows (then `index_select` of the kept ones), over the span of the kept columns only; casts
them to the student's dtype and scatters them into the student's parameters on the student's device. Peak memory
is the student plus one window, not the teacher: what lets a trial on a GPU node cut a 4B student from an 8B
teacher without 16 GB of host RAM.

Each file is reopened for every window, so the pages its memory map touched are released after every window instead
of accumulating in the process's resident set. Every window read is checked finite, and a tensor the rules need but
the files lack is a UserError naming the file and the key.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import ArchConfig
from nas_minitron.artifacts import artifact_error, reading, require_finite
from nas_minitron.errors import UserError
from nas_minitron.families import describe
from nas_minitron.prune.keep import KeepIndices
from nas_minitron.prune.surgery import TensorCopy, check_count, check_target, copy_plan, empty_student
from nas_minitron.teacher import read_teacher_config

if TYPE_CHECKING:
    import safetensors
    import torch
    from transformers import PreTrainedModel
else:
    safetensors = lazy_import("safetensors")
    torch = lazy_import("torch")

__all__ = ["INDEX_FILE", "TeacherFiles", "is_safetensors_dir", "slice_student"]

INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_WHAT = "teacher"
_HINT = "if its files are damaged, download, convert or copy the model again"
_CHUNK_BYTES = 16 << 20  # teacher rows read at once: bounds the transient on top of the student (a 128k-vocab
# embedding in bf16 is 1 GB; read whole, it would dominate the peak of a small student)
_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}


def is_safetensors_dir(where: str | os.PathLike[str]) -> bool:
    """Whether `where` is a local model directory whose weights are safetensors (a single file or an index)."""
    path = Path(where)
    return path.is_dir() and ((path / INDEX_FILE).is_file() or (path / _SINGLE_FILE).is_file())


class TeacherFiles:
    """The tensor names of a teacher directory and the file holding each (from the index when sharded)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            self.source = index  # what a missing key is reported against
            with reading(index, "teacher index", _HINT):
                weight_map = json.loads(index.read_text())["weight_map"]
            self.files: dict[str, Path] = {str(k): self.directory / str(v) for k, v in weight_map.items()}
        elif (self.directory / _SINGLE_FILE).is_file():
            self.source = self.directory / _SINGLE_FILE
            with reading(self.source, _WHAT, _HINT), safetensors.safe_open(str(self.source), framework="pt") as f:
                self.files = {name: self.source for name in f.keys()}  # noqa: SIM118 (a safetensors handle)
        else:
            raise UserError(f"teacher directory {str(self.directory)!r} has neither {_SINGLE_FILE} nor {INDEX_FILE}; "
                            f"expected a Hugging Face model directory with safetensors weights.")

    def file_of(self, name: str) -> Path:
        if name not in self.files:
            raise artifact_error(self.source, _WHAT, f"missing tensor {name!r}", _HINT)
        return self.files[name]

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor `name` (header only)."""
        path = self.file_of(name)
        with reading(path, _WHAT, _HINT), safetensors.safe_open(str(path), framework="pt") as handle:
            stored = handle.get_slice(name).get_dtype()
        if stored not in _DTYPES:
            raise artifact_error(path, _WHAT, f"tensor {name!r} is {stored}, expected one of {', '.join(_DTYPES)}",
                                 _HINT)
        dtype: torch.dtype = getattr(torch, _DTYPES[stored][0])
        return dtype

    def read_into(self, dst: torch.Tensor, copy: TensorCopy) -> None:
        """Fill `dst` with `copy.source`'s kept rows and columns in kept order (`copy.scale` applied), window by window.

        Each window is cast to `dst.dtype` and checked finite on the CPU, then scaled there (so the rounding is the
        one `materialize` does on a CPU teacher) and moved to `dst.device`. The file is reopened for every window:
        closing it unmaps the pages the window touched, which would otherwise stay in the resident set (a whole
        embedding's worth) until the tensor is done.
        """
        path = self.file_of(copy.source)
        with self._open(path) as handle:
            if copy.source not in handle.keys():  # noqa: SIM118 (a safetensors handle)
                raise artifact_error(path, _WHAT, f"missing tensor {copy.source!r}", _HINT)
            part = handle.get_slice(copy.source)
            shape, stored = [int(v) for v in part.get_shape()], part.get_dtype()
        _check_shape(path, copy, shape, list(dst.shape))
        cols = copy.cols
        col_span = (min(cols), max(cols) + 1) if cols else (0, shape[1] if len(shape) > 1 else 1)
        row_bytes = (shape[1] if len(shape) > 1 else 1) * _DTYPES.get(stored, ("", 8))[1]  # pages a row touches
        max_rows = max(1, _CHUNK_BYTES // row_bytes)
        col_index = None if cols is None else torch.tensor(cols, dtype=torch.long) - col_span[0]  # [C']
        for positions, start, stop, within in _row_windows(copy.rows, shape[0], max_rows):
            with self._open(path) as handle:
                part = handle.get_slice(copy.source)
                block = part[start:stop] if len(shape) == 1 else part[start:stop, col_span[0]:col_span[1]]
            if within is not None:
                block = block.index_select(0, within)  # [n kept, span]
            if col_index is not None:
                block = block.index_select(1, col_index)  # [n, C'] in kept column order
            block = block.to(dst.dtype)
            require_finite([(copy.source, block)], _WHAT, path, _HINT)
            if copy.scale != 1.0:
                block = block * copy.scale
            dst.index_copy_(0, positions.to(dst.device), block.to(dst.device))

    @staticmethod
    @contextlib.contextmanager
    def _open(path: Path) -> Iterator[safetensors.safe_open]:
        """A safetensors handle on `path`; read errors become one UserError naming the file."""
        with reading(path, _WHAT, _HINT), safetensors.safe_open(str(path), framework="pt") as handle:
            yield handle


def _check_shape(path: Path, copy: TensorCopy, shape: list[int], dst_shape: list[int]) -> None:
    """The stored tensor has the student tensor's rank, its full extent on unpruned dims, and every kept index."""
    ok = len(shape) == len(dst_shape)
    for dim, indices in enumerate((copy.rows, copy.cols)[: len(shape)] if ok else ()):
        ok = ok and (shape[dim] == dst_shape[dim] if indices is None else max(indices, default=-1) < shape[dim])
    if not ok:
        raise artifact_error(path, _WHAT, f"tensor {copy.source!r} has shape {shape}, which does not fit the "
                                          f"teacher's config (student tensor {copy.name!r} is {dst_shape})", _HINT)


def _row_windows(
    rows: Sequence[int] | None, total: int, max_rows: int
) -> Iterator[tuple[torch.Tensor, int, int, torch.Tensor | None]]:
    """(student positions, teacher start, teacher stop, kept rows within [start, stop)) per read.

    Kept rows may be in any order: they are read sorted, in windows of at most `max_rows` teacher rows that cover
    as many kept rows as fit (one `get_slice` call instead of one per run of consecutive rows: a random keep set
    has runs of 2-4 rows), and each window's kept rows go to the positions the kept order gives them, so the
    student's rows come out exactly in `rows` order. The within-window index is None when all rows are kept.
    """
    if rows is None:
        for start in range(0, total, max_rows):
            stop = min(total, start + max_rows)
            yield torch.arange(start, stop), start, stop, None
        return
    order = sorted(range(len(rows)), key=rows.__getitem__)  # student positions by increasing teacher row
    begin = 0
    for k in range(1, len(order) + 1):
        if k < len(order) and rows[order[k]] - rows[order[begin]] < max_rows:
            continue
        start, stop = rows[order[begin]], rows[order[k - 1]] + 1
        within = torch.tensor([rows[j] - start for j in order[begin:k]], dtype=torch.long)  # [n kept]
        yield torch.tensor(order[begin:k], dtype=torch.long), start, stop, (
            None if stop - start == k - begin else within)
        begin = k


def slice_student(
    teacher_dir: str | os.PathLike[str],
    target: ArchConfig,
    keep: KeepIndices,
    rescale_norms: bool = True,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    teacher_config: Mapping[str, Any] | None = None,
) -> PreTrainedModel:
    """`materialize` from the files of `teacher_dir`: the same student, in `dtype` (default: the dtype of the
    teacher's stored embedding) on `device`, holding no more of the teacher than one window of one tensor.

    `teacher_config` saves re-reading config.json when the caller has it. UserError when the directory, a file
    or a needed tensor is missing or unreadable, a tensor's shape contradicts the config, or a read holds NaN/Inf.
    """
    config = dict(teacher_config) if teacher_config is not None else read_teacher_config(str(teacher_dir))
    family, t_arch = describe(config)
    check_target(family, t_arch, target)
    keep.validate(t_arch, target)
    files = TeacherFiles(teacher_dir)
    probe = empty_student(family, config, target, keep, torch.float32, "meta")  # names only, no memory
    if dtype is None:
        dtype = files.dtype(f"{_module_name(probe, family.embed_tokens(probe))}.weight")
    copies = copy_plan(family, probe, t_arch, target, keep, rescale_norms)
    for copy in copies:  # every key before any reading: a missing tensor fails in milliseconds
        files.file_of(copy.source)
    del probe
    student = empty_student(family, config, target, keep, dtype, device)
    with torch.no_grad():
        for copy in copies:
            files.read_into(student.get_parameter(copy.name), copy)
    check_count(family, config, target, student)
    return student


def _module_name(model: PreTrainedModel, module: Any) -> str:
    name: str = next(name for name, candidate in model.named_modules() if candidate is module)
    return name
