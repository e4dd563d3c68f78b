from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _subprocess_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI (`python -m nas_minitron`) in a subprocess."""
    path = os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "nas_minitron", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """The CLI in this process (seconds faster than a subprocess): returns (exit code, stdout, stderr)."""
    import nas_minitron.cli as cli_module

    def run(*args: str) -> tuple[int, str, str]:
        code = cli_module.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local text corpus (CPython's pydoc topics) with train and validation documents."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "topics.txt"
    path.write_text("\n\n".join(topics.values()))
    return path


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer student with the teacher's tokenizer and a pruning.json naming kept teacher layers 0 and 2."""
    path = tmp_path_factory.mktemp("student") / "s"
    tiny_model("llama", seed=1, num_hidden_layers=2, hidden_size=48, intermediate_size=64).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    (path / "pruning.json").write_text(json.dumps({"keep": {"layers": [0, 2]}}))
    return path


def _common(corpus: Path, out: Path) -> list[str]:
    return ["--data", str(corpus), "--tokens", str(4 * 32 * 3), "--seq-len", "32", "--batch-size", "4",
            "--val-sequences", "4", "--out", str(out), "--device", "cpu"]


def test_distill_cli_writes_a_loadable_student(tiny_teacher_dir: Path, student_dir: Path, corpus: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "distilled"
    done = _subprocess_cli("distill", "--teacher", str(tiny_teacher_dir), "--student", str(student_dir),
                           "--is-loss", "cosine",
                "--lm-weight", "0.5", *_common(corpus, out))
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "distill.json").read_text())
    assert record["num_steps"] == 3 and [p["step"] for p in record["curve"]] == [0, 1, 2, 3]  # default: every tenth
    assert (out / "pruning.json").is_file() and (out / "config.json").is_file()
    assert "tok/s" in done.stderr and "val_kl" in done.stdout
    assert not (tmp_path / "distilled.ckpt").exists()  # removed after success
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    again = _subprocess_cli("distill", "--teacher", str(tiny_teacher_dir), "--student", str(student_dir),
                            *_common(corpus, out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_distill_cli_builds_then_reuses_a_logit_cache(cli, tiny_teacher_dir: Path, student_dir: Path,  # type: ignore[no-untyped-def]
                                                      corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code, _out, err = cli("distill", "--teacher", str(tiny_teacher_dir), "--student", str(student_dir), "--logit-cache",
                 str(cache), "--topk", "16", *_common(corpus, tmp_path / "a"))
    assert code == 0, err
    assert json.loads((cache / "manifest.json").read_text())["topk"] == 16
    # no --teacher at all: the cache stands in for it
    code, _out, err = cli("distill", "--student", str(student_dir), "--logit-cache", str(cache), "--topk", "16",
                  *_common(corpus, tmp_path / "b"))
    assert code == 0, err
    a, b = (json.loads((tmp_path / n / "distill.json").read_text()) for n in ("a", "b"))
    assert a["val_kl"] == pytest.approx(b["val_kl"], rel=1e-5)


def test_distill_cli_refuses_a_student_with_another_tokenizer(cli, tiny_teacher_dir: Path, corpus: Path,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    other = tmp_path / "other"
    tiny_model("llama", seed=1, num_hidden_layers=2).save_pretrained(other)
    tiny_tokenizer(vocab_size=900).save_pretrained(other)
    code, _out, err = cli("distill", "--teacher", str(tiny_teacher_dir), "--student", str(other),
                          *_common(corpus, tmp_path / "o"))
    assert code == 2 and "tokenizers differ" in err, err
    assert not (tmp_path / "o").exists()


def test_distill_cli_data_smaller_than_one_batch(cli, tiny_teacher_dir: Path, student_dir: Path, corpus: Path,  # type: ignore[no-untyped-def]
                                                 tmp_path: Path) -> None:
    args = _common(corpus, tmp_path / "o")
    args[args.index("--batch-size") + 1] = "100000"
    code, _out, err = cli("distill", "--teacher", str(tiny_teacher_dir), "--student", str(student_dir), *args)
    assert code == 2 and "fewer than one batch" in err, err


def test_correct_teacher_cli_writes_a_loadable_teacher(cli, tiny_teacher_dir: Path, corpus: Path,  # type: ignore[no-untyped-def]
                                                       tmp_path: Path) -> None:
    out = tmp_path / "corrected"
    code, _out, err = cli("correct-teacher", "--teacher", str(tiny_teacher_dir), "--lr", "1e-3",
                          *_common(corpus, out))
    assert code == 0, err
    record = json.loads((out / "correction.json").read_text())
    assert record["val_loss"] < record["curve"][0]["val_loss"]
    from nas_minitron.teacher import load_teacher

    model, _tok = load_teacher(str(out))
    assert model.config.num_hidden_layers == 3
