"""`nas-minitron candidates` end to end in a subprocess: formats, teacher kinds, spaces and exit-code-2 errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nas_minitron.space.candidates import CANDIDATE_COLUMNS, default_space, enumerate_candidates
from nas_minitron.space.presets import load_preset

HEADER = ("name,num_hidden_layers,hidden_size,intermediate_size,num_attention_heads,num_key_value_heads,head_dim,"
          "params,kv_bytes_per_token,flops_per_token")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas_minitron", "candidates", *args], capture_output=True,
                          text=True, timeout=300)


def _rows(stdout: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(stdout)))


def test_csv_lists_the_minitron_students_exactly() -> None:
    result = cli("--teacher", "llama-3.1-8b", "--budget", "4.5B", "--tolerance", "0.01", "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == HEADER == ",".join(CANDIDATE_COLUMNS)
    rows = {row["name"]: row for row in _rows(result.stdout)}
    assert rows["L32-H3072-I9216-A32-KV8"]["params"] == "4512746496"
    assert rows["L16-H4096-I14336-A32-KV8"]["params"] == "4540469248"
    assert rows["L16-H4096-I14336-A32-KV8"]["kv_bytes_per_token"] == str(2 * 16 * 8 * 128 * 2)
    distances = [abs(int(row["params"]) - 4_500_000_000) for row in _rows(result.stdout)]
    assert distances == sorted(distances)


def test_mistral_nemo_with_its_space_file() -> None:
    result = cli("--teacher", "mistral-nemo-12b", "--budget", "8.4B", "--space", "mistral-nemo-12b",
                 "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in _rows(result.stdout)}
    assert rows["L40-H4096-I11520-A32-KV8"]["params"] == "8414105600"


def test_json_and_table_and_max() -> None:
    result = cli("--teacher", "smollm2-135m", "--budget", "90M", "--format", "json", "--max", "4")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    config = load_preset("smollm2-135m")
    expected = enumerate_candidates(default_space(config), config, 90_000_000, max_count=4)
    assert [row["name"] for row in data["candidates"]] == [c.name for c in expected]
    assert data["teacher_params"] == 134_515_008 and data["budget_params"] == 90_000_000
    assert list(data["candidates"][0]) == list(CANDIDATE_COLUMNS)

    table = cli("--teacher", "smollm2-135m", "--budget", "0.67x", "--max", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == list(CANDIDATE_COLUMNS) and len(lines) == 3
    assert "2 candidate(s)" in table.stderr


def test_teacher_as_config_file_and_model_directory(tmp_path: Path) -> None:
    """A bare config.json and a directory holding only config.json: no weights are needed."""
    directory = tmp_path / "teacher"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(load_preset("tiny")))
    by_preset = cli("--teacher", "tiny", "--budget", "0.6x", "--space", "tiny", "--format", "csv")
    assert by_preset.returncode == 0, by_preset.stderr
    assert len(_rows(by_preset.stdout)) > 1
    for spec in (str(directory / "config.json"), str(directory)):
        result = cli("--teacher", spec, "--budget", "0.6x", "--space", "tiny", "--format", "csv")
        assert result.returncode == 0, result.stderr
        assert result.stdout == by_preset.stdout


def test_space_file_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("axes:\n  num_hidden_layers: [1, 2]\n  intermediate_size: {multiple_of: 32}\n")
    result = cli("--teacher", "tiny", "--budget", "0.8x", "--space", str(path), "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert rows and {row["hidden_size"] for row in rows} == {"64"}
    assert {row["intermediate_size"] for row in rows} <= {"32", "64", "96"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--teacher", "llama-3.1-8b", "--budget", "8.1B"), "below the teacher's 8,030,261,248"),
        (("--teacher", "llama-3.1-8b", "--budget", "500M"), "smallest candidate of search space 'default': "
                                                            "L16-H2048-I3584-A16-KV4 with 1,045,497,856"),
        (("--teacher", "tiny", "--budget", "0.95x", "--tolerance", "0.0001"), "nearest: L"),
        (("--teacher", "tiny", "--budget", "four"), "but got 'four'"),
        (("--teacher", "tiny", "--budget", "0.5x", "--space", "nope"), "unknown search space 'nope'"),
        (("--teacher", "tiny", "--budget", "0.5x", "--max", "0"), "argument --max: must be an integer >= 1, but got 0"),
        (("--teacher", "tiny", "--budget", "0.5x", "--tolerance", "2"),
         "argument --tolerance: must be a number in [0, 1), but got '2'"),
        (("--teacher", "no-such-model", "--budget", "0.5x"), "not found"),
        (("--teacher", "missing/config.json", "--budget", "0.5x"), "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: tuple[str, ...], message: str) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("nas-minitron candidates: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_bad_space_file_names_file_field_and_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("axes:\n  hidden_size: {multiple_of: -16}\n")
    result = cli("--teacher", "tiny", "--budget", "0.5x", "--space", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr and "axes.hidden_size.multiple_of" in result.stderr and "-16" in result.stderr
