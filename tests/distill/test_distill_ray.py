"""The Ray Train path: DDP or FSDP with 2 gloo workers on CPU equals one process over the same global batches."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from nas_minitron.distill.ray_train import distill_ray, ray_env
from nas_minitron.distill.trainer import DistillConfig, distill
from tiny_models import tiny_model

SEQ_LEN = 16


@pytest.fixture(scope="module")
def ray_cluster():  # type: ignore[no-untyped-def]
    os.environ.update(ray_env())  # before `import ray`: loopback only, no usage stats
    import ray

    repo = str(Path(__file__).parents[2])
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: unix socket paths are limited to ~107 bytes
    env = {k: os.environ[k] for k in ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             runtime_env={"env_vars": {**env, **ray_env(), "PYTHONPATH": repo}})
    yield
    ray.shutdown()


def _save_models(tmp_path: Path) -> PreTrainedModel:
    """Save a tiny teacher and a 2-layer student under tmp_path; return the teacher."""
    teacher = tiny_model("llama", seed=0)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_model("llama", seed=1, num_hidden_layers=2).save_pretrained(tmp_path / "student")
    return teacher


def _run_two_workers(tmp_path: Path, strategy: str) -> None:
    """(2 gloo workers with batch_size 2, one process with batch_size 4 over the same global batches)."""
    teacher = _save_models(tmp_path)
    data = torch.randint(0, 1024, (16, SEQ_LEN), generator=torch.Generator().manual_seed(0))  # [N, T]
    val = data[:4]
    # each step: 2 workers x 2 sequences = the same 4 sequences one process sees with batch_size 4
    two_config = DistillConfig(num_tokens=4 * SEQ_LEN * 4, seq_len=SEQ_LEN, batch_size=2, lr=3e-3,
                               eval_every_tokens=4 * SEQ_LEN * 2, num_val_sequences=4)
    result = distill_ray(tmp_path / "student", data, val, two_config, storage_path=tmp_path / "ray", num_workers=2,
                         strategy=strategy, teacher_dir=tmp_path / "teacher", out_dir=tmp_path / "out")
    assert [p.step for p in result.curve] == [0, 2, 4] and result.num_tokens == 4 * SEQ_LEN * 4

    single_config = dataclasses.replace(two_config, batch_size=4)
    order = torch.cat([torch.stack([data[0::2][2 * k : 2 * k + 2], data[1::2][2 * k : 2 * k + 2]]).reshape(4, -1)
                       for k in range(4)])  # [16, T]: global batch k = rank 0's batch k then rank 1's
    single = distill(tiny_model("llama", seed=1, num_hidden_layers=2), order, val, single_config, teacher=teacher)
    for ours, theirs in zip(result.curve, single.curve, strict=True):
        assert ours.val_kl == pytest.approx(theirs.val_kl, rel=1e-4)
        assert ours.val_loss == pytest.approx(theirs.val_loss, rel=1e-5)
    assert json.loads((tmp_path / "out" / "distill.json").read_text())["num_steps"] == 4


def test_ddp_with_two_gloo_workers_matches_one_process(ray_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _run_two_workers(tmp_path, "ddp")


def test_fsdp_with_two_gloo_workers_matches_one_process_and_saves_the_whole_student(  # type: ignore[no-untyped-def]
    ray_cluster, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    _run_two_workers(tmp_path, "fsdp")
    num_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "student").parameters())
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # stock loading: the gathered, unsharded student
    assert type(saved).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in saved.parameters()) == num_params
    # rank 0's last reported checkpoint holds the whole student and the full optimizer state, keyed by name
    last = max((tmp_path / "ray").rglob("state.json"), key=lambda f: json.loads(f.read_text())["step"]).parent
    assert json.loads((last / "state.json").read_text())["step"] == 4
    restored = AutoModelForCausalLM.from_pretrained(last / "student")
    assert all(torch.equal(a, b) for a, b in zip(restored.parameters(), saved.parameters(), strict=True))
    optimizer = torch.load(last / "trainer.pt", weights_only=True)["optimizer"]
    exp_avg = optimizer["state"]["student.model.embed_tokens.weight"]["exp_avg"]
    assert exp_avg.shape == saved.model.embed_tokens.weight.shape
