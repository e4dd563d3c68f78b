"""Loader for the `pydoc_next_sentence` lm-eval task: reads the JSONL beside this file, whatever the cwd."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import

if TYPE_CHECKING:
    import datasets
else:
    datasets = lazy_import("datasets")

_ROWS_FILE = Path(__file__).with_name("pydoc_next_sentence.jsonl")


def load(**_metadata: Any) -> datasets.DatasetDict:
    """A DatasetDict with `train` (few-shot examples) and `test` splits; lm-eval passes task metadata as kwargs."""
    rows = [json.loads(line) for line in _ROWS_FILE.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list([r for r in rows if r["split"] == split]) for split in ("train", "test")}
    )
