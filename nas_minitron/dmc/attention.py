"""DMC attention: a drop-in replacement of `layer.self_attn` for Llama, Mistral, Qwen2 and Qwen3.

Shapes: B batch, T new positions, Hq query heads, H KV heads, G = Hq / H, D head_dim, S cache entries.

What it computes (the paper's method, written from its description; decisions per KV head and token):
- decision logit  l_t = k_t[-1] - offset, from the *pre-RoPE* key (after Qwen3's k_norm); alpha_t = 1 means "merge
  token t into the last entry", 0 "append". Merge weight w_t = sigmoid(mean over the KV head's query group of
  q_t[-1] + offset) (+ eps, so a weight is never 0).
- merge: the entry a token ends in is the w-weighted mean of the last <= `window` tokens of its run, taken on the
  *pre-RoPE* keys and on the values; RoPE is applied to the merged key at the position of the run's latest token
  (as NVIDIA's reference does: pool first, rotate the pooled key at its own position). Queries are rotated as usual.
- the decision channels (q[-1], k[-1]) are multiplied by `channel_scale` before and after RoPE (RoPE mixes channel
  D-1 with D/2-1): stage 1 fades them out of attention (scale 1 -> 0), DMC proper runs with scale 0.
- training ("relaxed"): alpha = sigmoid((l + g1 - g2) / tau); every partial accumulation is a key, and key i gets the
  additive bias log(1 - alpha_{i+1}) for every later query (the diagonal is unbiased: a query always sees its own
  partial entry). g1 - g2 of two standard Gumbels is a standard logistic, sampled as log(u) - log(1 - u).
- inference ("hard"): alpha = [sigmoid(l) > 0.5] (straight-through for gradients); a merged-over key is masked
  entirely, which is exactly the set of entries a compressed cache keeps (`nas_minitron.dmc.cache`).

The module owns the stock module's projections (and norms) under the same names, so the state dict, and therefore
`save_pretrained`, is the stock model's. Imports torch at module top (it subclasses `nn.Module`): reach it through
`nas_minitron._lazy.lazy_import` from light code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from nas_minitron._lazy import lazy_import
from nas_minitron.dmc.settings import DMCSettings
from nas_minitron.dmc.support import check_supported_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from nas_minitron.dmc import cache as dmc_cache
else:
    dmc_cache = lazy_import("nas_minitron.dmc.cache")  # imports transformers' cache_utils


__all__ = [
    "DMCAttention",
    "apply_dmc",
    "check_supported",
    "collect_decisions",
    "decision_rows",
    "dmc_modules",
    "rotate",
    "set_dmc_state",
    "windowed_pool",
]

MODES = ("dmc", "fade")
_MASKED = -1e30  # added to a score: exp() gives exactly 0 in float32, and two of them cannot overflow
_EPS = 1e-6


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, channel_scale: float) -> torch.Tensor:
    """RoPE of x [B, H, T, D] with cos/sin [B, T, D] (transformers' rotate_half convention), the last channel scaled
    by `channel_scale` before and after (1: untouched, 0: the channel takes no part in attention)."""
    if channel_scale != 1.0:
        x = torch.cat([x[..., :-1], x[..., -1:] * channel_scale], dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    out = x * cos + rotated * sin
    if channel_scale != 1.0:
        out = torch.cat([out[..., :-1], out[..., -1:] * channel_scale], dim=-1)
    return out


def windowed_pool(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, window: int) -> torch.Tensor:
    """Partial accumulations: out_i = sum_d c_{i,d} w_{i-d} x_{i-d} / sum_d c_{i,d} w_{i-d} over d < window, with
    c_{i,0} = 1 and c_{i,d} = c_{i,d-1} * b_{i-d+1}. x [B, H, T, C], w and b [B, H, T] (b_0 is never used).

    With b in {0, 1} this is the weighted mean of the last <= window tokens of each position's run. Float32."""
    x, w, b = x.float(), w.float(), b.float()
    T = x.shape[-2]
    wx = w.unsqueeze(-1) * x  # [B, H, T, C]
    acc, z = wx, w
    coeff = torch.ones_like(w)  # [B, H, T]
    for d in range(1, min(window, T)):
        coeff = coeff * F.pad(b[..., : T - d + 1], (d - 1, 0))  # b_{i-d+1}
        acc = acc + coeff.unsqueeze(-1) * F.pad(wx[..., : T - d, :], (0, 0, d, 0))  # wx_{i-d}
        z = z + coeff * F.pad(w[..., : T - d], (d, 0))
    return acc / z.unsqueeze(-1)


def _straight_through(probs: torch.Tensor) -> torch.Tensor:
    """Hard 0/1 decisions in the forward pass, the gradient of `probs` in the backward pass."""
    hard = (probs > 0.5).to(probs.dtype)
    return hard - probs.detach() + probs


class DMCAttention(nn.Module):
    """The attention of one decoder layer with Dynamic Memory Compression (see the module docstring).

    State a trainer sets (`set_dmc_state`): `mode` ("dmc" merges; "fade" is stock attention with the decision
    channels scaled, stage 1), `channel_scale`, `force_append` (decisions all 0: for tests and CR = 1), `relaxed`
    (None: relaxed in training mode, hard in eval). After a "dmc" forward, `last_decisions` [B, H, T] holds the
    straight-through hard decisions (alpha_0 = 0), for the compression penalty and the achieved ratio.
    """

    def __init__(self, stock: nn.Module, settings: DMCSettings) -> None:
        super().__init__()
        self.config = stock.config
        self.layer_idx = int(stock.layer_idx)  # type: ignore[arg-type]
        self.head_dim = int(stock.head_dim)  # type: ignore[arg-type]
        self.num_key_value_groups = int(stock.num_key_value_groups)  # type: ignore[arg-type]
        self.scaling = float(stock.scaling)  # type: ignore[arg-type]
        self.q_proj = cast(nn.Linear, stock.q_proj)
        self.k_proj = cast(nn.Linear, stock.k_proj)
        self.v_proj = cast(nn.Linear, stock.v_proj)
        self.o_proj = cast(nn.Linear, stock.o_proj)
        self.q_norm = cast("nn.Module | None", getattr(stock, "q_norm", None))  # Qwen3: per-head RMSNorm before RoPE
        self.k_norm = cast("nn.Module | None", getattr(stock, "k_norm", None))
        self.settings = settings
        self.mode = "dmc"
        self.channel_scale = 0.0
        self.force_append = False
        self.relaxed: bool | None = None
        self.last_decisions: torch.Tensor | None = None

    # ---- projections and decisions ------------------------------------------------------------------------------
    def _project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = hidden.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden).view(shape)
        k = self.k_proj(hidden).view(shape)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(hidden).view(shape)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, Hq, T, D], [B, H, T, D] x2

    def merge_weights(self, q: torch.Tensor) -> torch.Tensor:
        """w [B, H, T] from the pre-RoPE queries [B, Hq, T, D]."""
        B, _, T, _ = q.shape
        grouped = q[..., -1].float().view(B, -1, self.num_key_value_groups, T).mean(2)  # [B, H, T]
        return torch.sigmoid(grouped + self.settings.logit_offset) + _EPS

    def _decisions(self, k: torch.Tensor, relaxed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooling b [B, H, T], key bias [B, H, T] for later queries, straight-through hard decisions [B, H, T])."""
        logit = k[..., -1].float() - self.settings.logit_offset  # [B, H, T]
        if self.force_append:
            zeros = torch.zeros_like(logit)
            return zeros, zeros, zeros
        if relaxed:
            u = torch.rand_like(logit).clamp(_EPS, 1 - _EPS)
            noisy = (logit + torch.log(u) - torch.log1p(-u)) / self.settings.temperature
            b = torch.sigmoid(noisy)
            bias_next = F.logsigmoid(-noisy)  # log(1 - alpha), stable
        else:
            b = _straight_through(torch.sigmoid(logit))
            bias_next = torch.where(b > 0.5, _MASKED, 0.0)
        b = torch.cat([torch.zeros_like(b[..., :1]), b[..., 1:]], dim=-1)  # token 0 always appends
        key_bias = F.pad(bias_next[..., 1:], (0, 1))  # key i gets log(1 - alpha_{i+1}); the last key none
        return b, key_bias, _straight_through(b)

    def decision_rows(self, norms: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, indices along dim 0) that compute the decision channels q[-1] and k[-1] of every head: the
        last row of each head's q/k projection (and bias), and (`norms`) the last element of Qwen3's per-head q/k
        norms."""
        D = self.head_dim
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for proj, norm in ((self.q_proj, self.q_norm), (self.k_proj, self.k_norm)):
            rows = torch.arange(D - 1, proj.out_features, D, device=proj.weight.device)
            out.append((proj.weight, rows))
            if isinstance(proj.bias, nn.Parameter):
                out.append((proj.bias, rows))
            weight = getattr(norm, "weight", None) if norm is not None and norms else None
            if isinstance(weight, nn.Parameter):
                out.append((weight, torch.tensor([weight.shape[0] - 1], device=weight.device)))
        return out

    # ---- the forward paths --------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else kwargs.get("past_key_values")
        assert position_embeddings is not None, "DMC attention needs the model's rotary embeddings"
        cos, sin = position_embeddings  # [B, T, D] each
        q, k, v = self._project(hidden_states)
        if self.mode == "fade":
            out = self._fade(q, k, v, cos, sin, attention_mask, cache)
        elif isinstance(cache, dmc_cache.DMCCache):
            if _masks_beyond_causal(attention_mask):
                raise ValueError("DMC's compressed cache does not support padded prompts yet (the attention mask "
                                 "hides tokens a causal mask would show); decode unpadded prompts, one length per "
                                 "batch.")
            out = self._cached(q, k, v, cos, sin, cache.layer(self.layer_idx))
        else:
            if cache is not None and cache.get_seq_length(self.layer_idx) > 0:
                raise ValueError("DMC attention cannot decode from a stock KV cache; pass "
                                "cache=nas_minitron.dmc.DMCCache() to generate().")
            relaxed = self.training if self.relaxed is None else self.relaxed
            out, keys, values, b = self._full(q, k, v, cos, sin, attention_mask, relaxed)
            if cache is not None:  # a stock cache the model made by itself: keep its length right, refuse to reuse it
                cache.update(keys, values, self.layer_idx)
        B, T = hidden_states.shape[:2]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale + bias) v in float32 softmax; q [B, Hq, T, D], keys/values [B, H, S, D], bias
        broadcastable to [B, Hq, T, S]. Returns [B, Hq, T, D]."""
        g = self.num_key_value_groups
        keys, values = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)  # [B, Hq, S, D]
        scores = torch.matmul(q, keys.transpose(2, 3)).float() * self.scaling + bias  # [B, Hq, T, S]
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values)

    def _causal_bias(self, attention_mask: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
        """[B or 1, 1, T, T] additive: transformers' own 4D mask when it covers these T keys, else plain causal."""
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] == T:
            if attention_mask.dtype == torch.bool:
                return torch.where(attention_mask, 0.0, _MASKED)
            return attention_mask.float().clamp(min=_MASKED)
        later = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
        return torch.where(later, _MASKED, 0.0)[None, None]

    def _fade(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              attention_mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
        """Stage 1: stock attention with the decision channels scaled (works with a stock cache)."""
        qr = rotate(q, cos, sin, self.channel_scale)
        kr = rotate(k, cos, sin, self.channel_scale)
        if isinstance(cache, dmc_cache.DMCCache):
            raise ValueError("a DMC cache needs DMC attention in mode 'dmc', not the stage-1 fade.")
        if cache is not None:
            kr, v = cache.update(kr, v, self.layer_idx)
        T, S = q.shape[-2], kr.shape[-2]
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] == S:
            bias = (torch.where(attention_mask, 0.0, _MASKED) if attention_mask.dtype == torch.bool
                    else attention_mask.float().clamp(min=_MASKED))
        else:  # queries are the last T of S positions
            later = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
            bias = torch.where(later, _MASKED, 0.0)[None, None]
        return self._attend(qr, kr, v, bias)

    def _full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              attention_mask: torch.Tensor | None, relaxed: bool,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole sequence at once (training, and the prefill of a compressed cache).

        Returns (attention output [B, Hq, T, D], rotated pooled keys [B, H, T, D], pooled values, pooling b)."""
        B, _, T, D = q.shape
        b, key_bias, decisions = self._decisions(k, relaxed)
        self.last_decisions = decisions
        w = self.merge_weights(q)  # [B, H, T]
        pooled = windowed_pool(torch.cat([k, v], dim=-1), w, b, self.settings.window).to(v.dtype)
        keys, values = rotate(pooled[..., :D], cos, sin, self.channel_scale), pooled[..., D:]
        qr = rotate(q, cos, sin, self.channel_scale)
        earlier = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)  # key i < query t
        dmc_bias = (key_bias.unsqueeze(2) * earlier).repeat_interleave(self.num_key_value_groups, dim=1)
        bias = self._causal_bias(attention_mask, T, q.device) + dmc_bias  # [B, Hq, T, T]
        return self._attend(qr, keys, values, bias), keys, values, b

    def _cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                layer: dmc_cache.DMCLayer) -> torch.Tensor:
        """Inference with the compressed cache: an empty layer takes the whole prompt through the hard full path and
        keeps only the entries that survive; afterwards tokens are merged or appended one at a time."""
        if layer.num_tokens == 0:
            out, keys, values, b = self._full(q, k, v, cos, sin, None, relaxed=False)
            layer.ingest(k, v, self.merge_weights(q), b, keys, values, self.settings.window)
            return out
        w = self.merge_weights(q)  # [B, H, T]
        logit = k[..., -1].float() - self.settings.logit_offset
        hard = torch.zeros_like(logit) if self.force_append else (torch.sigmoid(logit) > 0.5).float()
        self.last_decisions = hard
        outs = []
        for t in range(q.shape[-2]):
            k_mean, v_mean, merge = layer.merge(k[:, :, t], v[:, :, t], w[:, :, t], hard[:, :, t])  # [B, H, D] x2
            k_rot = rotate(k_mean.unsqueeze(2), cos[:, t : t + 1], sin[:, t : t + 1], self.channel_scale)
            keys, values, valid = layer.write(k_rot.squeeze(2), v_mean, merge)  # [B, H, S, D] x2, [B, H, S]
            qt = rotate(q[:, :, t : t + 1], cos[:, t : t + 1], sin[:, t : t + 1], self.channel_scale)
            bias = torch.where(valid, 0.0, _MASKED).repeat_interleave(self.num_key_value_groups, dim=1)
            outs.append(self._attend(qt, keys, values, bias.unsqueeze(2)))
        return torch.cat(outs, dim=2)


def _masks_beyond_causal(mask: torch.Tensor | None) -> bool:
    """Whether a 4D attention mask [B, 1, Tq, S] (bool: True = attend; float: 0 = attend) hides a key that the causal
    pattern would show (padding). transformers passes None (sdpa) or the plain causal mask for unpadded input."""
    if mask is None or mask.dim() != 4:
        return False
    tq, s = mask.shape[-2], mask.shape[-1]
    offset = s - tq  # the query i sits at position offset + i
    causal = torch.ones(tq, s, dtype=torch.bool, device=mask.device).tril(offset)  # key j <= offset + i
    allowed = mask if mask.dtype == torch.bool else mask == 0
    return bool((causal & ~allowed).any())


# ---- whole-model helpers ---------------------------------------------------------------------------------------
def check_supported(model: PreTrainedModel) -> None:
    """UserError unless the model is a supported family with head_dim >= MIN_HEAD_DIM and full attention only
    (`support.check_supported_config` on its config)."""
    check_supported_config(model.config.to_dict())


def apply_dmc(model: PreTrainedModel, settings: DMCSettings | None = None) -> list[DMCAttention]:
    """Replace every layer's `self_attn` by a DMCAttention owning the same weights (in place); returns them."""
    check_supported(model)
    settings = settings or DMCSettings()
    modules = []
    for layer in model.model.layers:
        attn = layer.self_attn
        if not isinstance(attn, DMCAttention):
            attn = DMCAttention(attn, settings)
            layer.self_attn = attn
        modules.append(attn)
    return modules


def dmc_modules(model: nn.Module) -> list[DMCAttention]:
    """The DMCAttention modules in layer order."""
    return [m for m in model.modules() if isinstance(m, DMCAttention)]


def set_dmc_state(model: nn.Module, *, mode: str | None = None, channel_scale: float | None = None,
                  force_append: bool | None = None, relaxed: bool | None | str = "keep") -> None:
    """Set the DMC state of every layer; arguments left at their default keep the current value."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"DMC mode must be one of {MODES}, got {mode!r}")
    for m in dmc_modules(model):
        m.mode = mode if mode is not None else m.mode
        m.channel_scale = float(channel_scale) if channel_scale is not None else m.channel_scale
        m.force_append = force_append if force_append is not None else m.force_append
        if relaxed != "keep":
            m.relaxed = relaxed  # type: ignore[assignment]


def decision_rows(model: nn.Module, norms: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's `DMCAttention.decision_rows`."""
    return [row for m in dmc_modules(model) for row in m.decision_rows(norms)]


def collect_decisions(model: nn.Module) -> torch.Tensor:
    """The last forward's straight-through decisions of every layer, stacked: [L, B, H, T]."""
    found = [m.last_decisions for m in dmc_modules(model)]
    if any(d is None for d in found) or not found:
        raise RuntimeError("no DMC decisions recorded: run a forward in mode 'dmc' first")
    return torch.stack(found)  # type: ignore[arg-type]
