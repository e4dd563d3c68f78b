"""A compressed KV cache for DMC inference: a transformers `Cache` whose layers hold per-head variable-length entries.

Layout: padded per head with a length vector. Each layer keeps keys/values [B, H, capacity, D] (RoPE applied to the
keys) and `lengths` [B, H]: head (b, h) owns entries [0, lengths[b, h]). Why padded and not paged: attention over a
padded block is one batched matmul with a mask, in plain PyTorch, on any device; a paged layout (NVIDIA's kernel)
needs a custom kernel to pay off. The price: the allocation follows the *longest* head of the layer, so the bytes
held (`allocated_bytes`) save less than the entries kept (`entry_bytes`) when heads compress unevenly. Both are
reported, never assumed.

Besides the entries, each (b, h) keeps the open run's last `window` pre-RoPE keys, values and merge weights, because
the open entry is the weighted mean of the last <= window tokens of its run and must be recomputed (and re-rotated
at the newest position) when a token merges into it. That is a constant `window`-token overhead per head.

`get_seq_length()` counts tokens seen (what positions and masks need), not entries.

Imports torch and transformers at module top (the classes subclass transformers' cache): reach this module through
`nas_minitron._lazy.lazy_import` from light code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["DMCCache", "DMCLayer", "cache_stats"]


GROW_MIN_ENTRIES = 64
GROW_FRACTION = 0.25


def _grown(entries: int) -> int:
    """Capacity for `entries` plus headroom: a quarter more (at least 64 entries), so appends copy the buffer
    O(log) times while at most a fifth of what is held is unused (a doubling buffer can leave half unused)."""
    return entries + max(GROW_MIN_ENTRIES, int(entries * GROW_FRACTION))


class DMCLayer(CacheLayerMixin):
    """One layer's compressed cache (see the module docstring), created by `DMCCache.layer`."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.keys: torch.Tensor | None = None  # [B, H, capacity, D], rotated
        self.values: torch.Tensor | None = None  # [B, H, capacity, D]
        self.lengths: torch.Tensor | None = None  # [B, H] entries per head
        self.window_keys: torch.Tensor | None = None  # [B, H, window, D], pre-RoPE, oldest first
        self.window_values: torch.Tensor | None = None
        self.window_weights: torch.Tensor | None = None  # [B, H, window]
        self.run_length: torch.Tensor | None = None  # [B, H] tokens in the open run
        self.num_tokens = 0
        self.is_initialized = False

    # ---- transformers' layer interface ------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated by `ingest`

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a DMC cache is written by DMC attention only (nas_minitron.dmc.apply_dmc)")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.num_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        DMCLayer.__init__(self)

    def _tensors(self) -> list[str]:
        return ["keys", "values", "lengths", "window_keys", "window_values", "window_weights", "run_length"]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in self._tensors():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, indices.to(value.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in self._tensors():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.repeat_interleave(repeats, dim=0))

    # ---- DMC ------------------------------------------------------------------------------------------------------
    def ingest(self, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, b: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, window: int) -> None:
        """Fill an empty layer from a prompt's hard full-path results: pre-RoPE k, v [B, H, T, D], weights w and
        hard decisions b [B, H, T] (b_0 = 0), rotated pooled keys and pooled values [B, H, T, D].

        Position i's partial entry survives iff it ends its run (i = T-1 or b_{i+1} = 0)."""
        B, H, T, D = k.shape
        ends = torch.ones_like(b, dtype=torch.bool)
        ends[..., :-1] = b[..., 1:] < 0.5  # [B, H, T]
        lengths = ends.sum(-1)  # [B, H]
        capacity = _grown(int(lengths.max()))
        slot = torch.where(ends, ends.long().cumsum(-1) - 1, capacity)  # [B, H, T]; non-ends go to a spare slot
        index = slot.unsqueeze(-1).expand(B, H, T, D)
        self.keys = keys.new_zeros(B, H, capacity + 1, D).scatter_(2, index, keys)[:, :, :capacity]
        self.values = values.new_zeros(B, H, capacity + 1, D).scatter_(2, index, values)[:, :, :capacity]
        self.lengths = lengths
        appends = (b < 0.5).long() * torch.arange(T, device=b.device)  # position of each append, 0 elsewhere
        self.run_length = T - appends.max(-1).values  # [B, H]
        pad = max(window - T, 0)
        self.window_keys = F.pad(k[:, :, -window:], (0, 0, pad, 0))
        self.window_values = F.pad(v[:, :, -window:], (0, 0, pad, 0))
        self.window_weights = F.pad(w[:, :, -window:], (pad, 0))
        self.num_tokens = T
        self.is_initialized = True

    def merge(self, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, decision: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Take one token (k, v [B, H, D], w and hard decision [B, H]) into the open-run window; returns the
        pre-RoPE mean key and the mean value of the entry it ends in, and whether it merged [B, H] (bool)."""
        assert self.window_keys is not None and self.window_values is not None
        assert self.window_weights is not None and self.run_length is not None
        merge = decision > 0.5
        self.run_length = torch.where(merge, self.run_length + 1, 1)
        self.window_keys = torch.cat([self.window_keys[:, :, 1:], k.unsqueeze(2)], dim=2)
        self.window_values = torch.cat([self.window_values[:, :, 1:], v.unsqueeze(2)], dim=2)
        self.window_weights = torch.cat([self.window_weights[:, :, 1:], w.unsqueeze(2)], dim=2)
        window = self.window_weights.shape[-1]
        first = window - self.run_length.clamp(max=window)  # [B, H] oldest window slot in the run
        valid = torch.arange(window, device=w.device) >= first.unsqueeze(-1)  # [B, H, window]
        ww = (self.window_weights.float() * valid).unsqueeze(-1)  # [B, H, window, 1]
        z = ww.sum(2)  # [B, H, 1]
        k_mean = (ww * self.window_keys.float()).sum(2) / z
        v_mean = (ww * self.window_values.float()).sum(2) / z
        return k_mean.to(k.dtype), v_mean.to(v.dtype), merge

    def write(self, key: torch.Tensor, value: torch.Tensor, merge: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Overwrite the last entry (merge) or append one (key, value [B, H, D]); returns the used keys and values
        [B, H, S, D] (S = the longest head) and the validity mask [B, H, S]."""
        assert self.keys is not None and self.values is not None and self.lengths is not None
        slot = torch.where(merge, self.lengths - 1, self.lengths)  # [B, H]
        if int(slot.max()) >= self.keys.shape[2]:
            grow = _grown(self.keys.shape[2]) - self.keys.shape[2]
            self.keys = F.pad(self.keys, (0, 0, 0, grow))
            self.values = F.pad(self.values, (0, 0, 0, grow))
        B, H, D = key.shape
        index = slot.view(B, H, 1, 1).expand(B, H, 1, D)
        self.keys.scatter_(2, index, key.unsqueeze(2).to(self.keys.dtype))
        self.values.scatter_(2, index, value.unsqueeze(2).to(self.values.dtype))
        self.lengths = self.lengths + (~merge).long()
        self.num_tokens += 1
        used = int(self.lengths.max())
        valid = torch.arange(used, device=key.device) < self.lengths.unsqueeze(-1)
        return self.keys[:, :, :used], self.values[:, :, :used], valid


class DMCCache(Cache):
    """The compressed cache to pass to `generate(cache=DMCCache())` or to a DMC model's forward."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=DMCLayer)

    def layer(self, layer_idx: int) -> DMCLayer:
        """The layer's compressed cache, created on first use."""
        while len(self.layers) <= layer_idx:
            self.layers.append(DMCLayer())
        found = self.layers[layer_idx]
        assert isinstance(found, DMCLayer), f"layer {layer_idx} of a DMCCache is a {type(found).__name__}"
        return found


def cache_stats(cache: Any) -> dict[str, Any]:
    """Measured compression of a filled DMC cache: tokens, entries kept, CR = tokens / entries (all layers and
    heads), per-layer CR, bytes of the kept entries, bytes allocated (padded), bytes of the open-run windows."""
    tokens = entries = entry_bytes = allocated = capacity = window_bytes = 0
    per_layer = []
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        B, H, _, D = layer.keys.shape
        item = layer.keys.element_size()
        n = int(layer.lengths.sum())
        tokens += layer.num_tokens * B * H
        entries += n
        per_layer.append(layer.num_tokens * B * H / n)
        entry_bytes += 2 * n * D * item
        allocated += 2 * B * H * int(layer.lengths.max()) * D * item  # the padded block attention reads
        capacity += 2 * layer.keys.numel() * item  # what is held: the buffer grows by a quarter (`_grown`)
        window_bytes += sum(t.numel() * t.element_size() for t in
                            (layer.window_keys, layer.window_values, layer.window_weights))
    return {"tokens": tokens, "entries": entries, "cr": tokens / entries if entries else 1.0,
            "per_layer_cr": per_layer, "entry_bytes": entry_bytes, "allocated_bytes": allocated,
            "capacity_bytes": capacity, "window_bytes": window_bytes}
