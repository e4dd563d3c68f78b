"""Heads axis only: Minitron attn_output norm vs o_proj contribution norm (16x256 calib, 4x256 val)."""
from nas_minitron.arch import ArchConfig
from nas_minitron.data import take_sequences
from nas_minitron.families import describe_model
from nas_minitron.prune.importance import compute_importance
from nas_minitron.prune.keep import keep_from_scores
from nas_minitron.prune.lm_loss import lm_loss
from nas_minitron.prune.surgery import materialize
from nas_minitron.teacher import load_teacher

t, tok = load_teacher("smollm2-135m")
_, arch = describe_model(t)
calib = take_sequences("builtin", tok, "calibration", 256, 64)[:16]
val = take_sequences("builtin", tok, "validation", 256, 4)
target = ArchConfig.parse("L30-H576-I1536-A6-KV3", 64)
for metric in ("contribution", "attn_output"):
    s = compute_importance(t, calib, layer_metrics=False, head_metric=metric)
    print(metric, lm_loss(materialize(t, target, keep_from_scores(s, arch, target)), val), flush=True)
