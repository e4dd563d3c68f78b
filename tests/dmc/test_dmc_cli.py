"""`nas-minitron dmc` end to end on a tiny model, both loaders of its output, and the refusals (exit 2, no output)."""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import nas_minitron.cli as cli_module
from nas_minitron.dmc import DMCCache, cache_stats, load_dmc_model
from nas_minitron.dmc.attention import dmc_modules
from nas_minitron.dmc.export import record_for, save_dmc_model
from nas_minitron.dmc.settings import DMCSettings
from nas_minitron.errors import UserError
from tiny_models import save_tiny_teacher, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "topics.txt"
    path.write_text("\n\n".join(topics.values()))
    return path


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own setup printed (transformers' progress bars)
    code = cli_module.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _args(model: Path, out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["dmc", "--model", str(model), "--target-cr", "2", "--data", str(corpus), "--tokens", str(30 * 2 * 32),
            "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", "--val-sequences", "2", "--out", str(out),
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("model") / "qwen3", "qwen3")


def test_retrofit_writes_a_model_both_loaders_read(tmp_path: Path, qwen3_dir: Path, corpus: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, stdout, _err = _run(capsys, *_args(qwen3_dir, out, corpus))
    assert code == 0 and "achieved CR" in stdout
    assert not (tmp_path / "out.ckpt").exists()  # checkpoints removed after success
    record = json.loads((out / "dmc.json").read_text())
    assert record["target_cr"] == 2 and record["num_key_value_heads"] == 2 and record["achieved_cr"] >= 1.0
    model, loaded = load_dmc_model(out)
    assert len(dmc_modules(model)) == 3 and loaded.achieved_cr == record["achieved_cr"]
    prompt = torch.randint(4, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    cache = DMCCache()
    generated = model.generate(prompt, cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=3)
    assert generated.shape == (1, 16) and cache_stats(cache)["tokens"] > 0
    stock = AutoModelForCausalLM.from_pretrained(out)  # the fallback: stock attention, uncompressed
    assert stock.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=3).shape == (1, 12)


def test_a_changed_kv_head_count_is_refused_on_load(tmp_path: Path, qwen3_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    save_dmc_model(tmp_path, model, None, record_for(model, target_cr=2.0, settings=DMCSettings()))
    data = json.loads((tmp_path / "dmc.json").read_text())
    (tmp_path / "dmc.json").write_text(json.dumps({**data, "num_key_value_heads": 4}))
    with pytest.raises(UserError, match="KV heads 4 in dmc.json vs 2 in the model"):
        load_dmc_model(tmp_path)


def _gpt2_dir(path: Path) -> Path:
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=1024, bos_token_id=1,
                                eos_token_id=2)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["cr_below_1", "unsupported_family", "tiny_head_dim", "already_dmc",
                                  "too_few_tokens", "no_model"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path, corpus: Path,
                                                         qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, extra = qwen3_dir, []
    expected = {"cr_below_1": "target compression ratio 0.5", "unsupported_family": "'gpt2' has no DMC support",
                "tiny_head_dim": "head_dim 2 is too small", "already_dmc": "already a DMC model",
                "too_few_tokens": "less than one optimizer step", "no_model": "not a Hugging Face model directory"}
    if case == "unsupported_family":
        model = _gpt2_dir(tmp_path / "gpt2")
    elif case == "tiny_head_dim":
        model = save_tiny_teacher(tmp_path / "tiny", "llama", head_dim=2)
    elif case == "already_dmc":
        model = save_tiny_teacher(tmp_path / "dmc", "llama")
        (model / "dmc.json").write_text("{}")
    elif case == "no_model":
        model = tmp_path / "missing"
    args = _args(model, tmp_path / "out", corpus, *extra)
    if case == "cr_below_1":
        args[args.index("--target-cr") + 1] = "0.5"
    if case == "too_few_tokens":
        args[args.index("--tokens") + 1] = "10"
    code, _out, err = _run(capsys, *args)
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]  # transformers' loading bar aside
    assert code == 2 and len(lines) == 1 and expected[case] in lines[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()
