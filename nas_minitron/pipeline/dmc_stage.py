"""The `dmc` stage of `nas-minitron search`: every fully distilled winner retrofitted with Dynamic Memory Compression
at each ratio of --dmc-cr (`nas_minitron.dmc`), after the distill stage and before eval.

Per (winner, ratio): the winner's distilled weights, `apply_dmc`, `retrofit` for --dmc-tokens with KD from the run's
teacher on the winners' train stream (data/train_full, as the distill stage), validated on the run's validation
stream, saved as dmc/<winner>-cr<ratio>/ (`save_dmc_model`: a stock directory + dmc.json) in one rename. Its
dmc.json is the completion marker: --resume never retrains a finished (winner, ratio) and continues an unfinished
one from its newest checkpoint in checkpoints/<winner>-cr<ratio>/ (a finished one made with other retrofit settings is
refused, as a checkpoint is). dmc.csv (`run_dir.DMC_COLUMNS`) has a row per
(winner, ratio). With --dmc-cr none the stage writes only its marker ({"ratios": []}), so run directories made
before it resume unchanged. The eval stage lm-evaluates the variants after the winners (`stages.evaluate`).
"""

from __future__ import annotations

import gc
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.atomic import atomic_directory
from nas_minitron.distill.checkpoint import latest_checkpoint
from nas_minitron.dmc.export import record_for, save_dmc_model
from nas_minitron.dmc.schedule import RetrofitConfig
from nas_minitron.dmc.settings import DMC_FILE, DMCRecord
from nas_minitron.dmc.train import retrofit
from nas_minitron.errors import UserError
from nas_minitron.integrity import write_checksums
from nas_minitron.pipeline.run_dir import DMC_COLUMNS, DMC_CSV, Run, dmc_name, write_csv
from nas_minitron.pipeline.settings import dmc_ratios
from nas_minitron.pipeline.stages import full_split, load_student

if TYPE_CHECKING:
    from nas_minitron.dmc import attention
else:
    attention = lazy_import("nas_minitron.dmc.attention")

__all__ = ["dmc"]


def _config(run: Run, target_cr: float) -> RetrofitConfig:
    """The retrofit of one ratio: the search's sequence length, batch, learning rate and seed; bf16 compute on a GPU
    (as the driver's other stages), float32 on CPU; the paper's stage split and DMC settings, the decision rows'
    learning rate scaled by --dmc-decision-lr-scale, and those rows zeroed when stage 2 begins (every head starts
    appending: a pretrained channel can sit above the threshold, a quarter of some SmolLM2 layers' keys do)."""
    s = run.settings
    return RetrofitConfig(target_cr=target_cr, num_tokens=s.dmc_tokens, seq_len=s.seq_len, batch_size=s.batch_size,
                          lr=s.lr, decision_lr_scale=s.dmc_decision_lr_scale, reset_decision_rows=True,
                          seed=s.seed, loss="kd",
                          dtype="bf16" if run.device().startswith("cuda") else "float32")


def _row(winner: dict[str, str], record: DMCRecord, kv_bytes: float | None) -> dict[str, Any]:
    achieved = float(record.achieved_cr or 1.0)
    training = record.training
    return {"winner": winner["name"], "target_cr": record.target_cr, "achieved_cr": achieved,
            "val_loss": training.get("val_loss"), "val_kl": training.get("val_kl"),
            "kv_bytes_per_token": kv_bytes if kv_bytes is not None else "",
            "kv_bytes_per_token_compressed": kv_bytes / achieved if kv_bytes is not None else "",
            "tokens": training.get("num_tokens"), "wall_s": training.get("wall_s"),
            "path": f"dmc/{dmc_name(winner['name'], record.target_cr)}"}


def _retrofit_one(run: Run, winner: dict[str, str], target_cr: float) -> DMCRecord:
    """Retrofit one winner at one ratio and write dmc/<winner>-cr<ratio>/; its record."""
    s, name = run.settings, dmc_name(winner["name"], target_cr)
    config = _config(run, target_cr)
    device = run.device()
    teacher, tokenizer = run.teacher()
    student = load_student(run, run.path(winner["path"]), device)  # float32, checked against its checksums
    attention.apply_dmc(student, config.settings)
    student.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    checkpoints = run.path("checkpoints", name)
    found = latest_checkpoint(checkpoints) if run.resume else None
    if found is not None:
        run.log(f"  {name}: continuing from its checkpoint {found.relative_to(run.dir)}")
    stream = run.tokens(full_split(run))
    rows = min(stream.num_sequences, max(s.batch_size, math.ceil(s.dmc_tokens / s.seq_len)))
    train = stream.rows(0, rows)  # [rows, T]: the first --dmc-tokens of the stream (epochs over it if it is shorter)
    result = retrofit(student, train, run.tokens("validation").tensor(), config, teacher=teacher,
                      checkpoint_dir=checkpoints, resume=run.resume)
    m = result.metrics
    training = {"source_model": winner["path"], "teacher": s.teacher, "data": s.data, "split": full_split(run),
                "train_sequences": rows, "num_tokens": result.num_tokens, "num_steps": result.num_steps,
                "stage_steps": list(config.stage_steps()), "config": config.to_dict(),
                "config_fingerprint": config.fingerprint(), "val_loss": m["val_loss"],
                "val_kl": m["val_kl"], "per_head_cr": m["per_head_cr"], "wall_s": round(result.wall_s, 3)}
    record = record_for(student, settings=config.settings, target_cr=target_cr, achieved_cr=m["achieved_cr"],
                        per_layer_cr=m["per_layer_cr"], training=training)
    with atomic_directory(run.path("dmc", name), overwrite=True) as tmp:
        save_dmc_model(tmp, student, tokenizer, record)  # dmc.json written last
        write_checksums(tmp)
    shutil.rmtree(checkpoints, ignore_errors=True)
    if run.path("checkpoints").is_dir() and not any(run.path("checkpoints").iterdir()):
        run.path("checkpoints").rmdir()
    del student
    gc.collect()
    return record


def _finished(run: Run, folder: Path, target_cr: float) -> DMCRecord:
    """The record of a finished retrofit; UserError when it was made with other retrofit settings (--dmc-tokens,
    --seq-len, ... may change on --resume until the dmc stage has finished, but not under a finished retrofit)."""
    record = DMCRecord.read(folder)
    made = record.training.get("config_fingerprint")
    if made is not None and made != _config(run, target_cr).fingerprint():
        raise UserError(f"{str(folder)!r} was retrofitted with other settings ({record.training.get('config')}); "
                        f"resume with the settings it was made with, or delete it to retrofit it again.")
    return record


def dmc(run: Run) -> dict[str, Any]:
    """Retrofit every winner at every --dmc-cr ratio (winners in rank order, ratios as given); dmc.csv."""
    ratios = dmc_ratios(run.settings)
    if not ratios:
        return {"ratios": []}
    kv_bytes = {row["name"]: float(row["kv_bytes_per_token"]) for row in run.candidate_rows()
                if row.get("kv_bytes_per_token") not in (None, "")}
    rows, retrained = [], []
    for winner in run.winner_rows():
        for target_cr in ratios:
            name = dmc_name(winner["name"], target_cr)
            folder = run.path("dmc", name)
            if (folder / DMC_FILE).is_file():
                record, done = _finished(run, folder, target_cr), True
            else:
                record, done = _retrofit_one(run, winner, target_cr), False
                retrained.append(name)
            row = _row(winner, record, kv_bytes.get(winner["name"]))
            rows.append(row)
            kl = "" if row["val_kl"] is None else f", val KL {float(row['val_kl']):.4f}"
            run.log(f"  {name}: retrofitted earlier, skipped" if done else
                    f"  {name}: achieved CR {row['achieved_cr']:.2f} (target {target_cr:g}), val loss "
                    f"{float(row['val_loss']):.4f}{kl}, {int(row['tokens']):,} tokens in {float(row['wall_s']):.1f} s "
                    f"-> {row['path']}")
    write_csv(run.path(DMC_CSV), rows, DMC_COLUMNS)
    return {"ratios": list(ratios), "models": [r["path"] for r in rows], "retrofitted": retrained}
