"""DMC compressed cache vs the stock DynamicCache: KV-cache bytes and decode time per token, on this machine.

A SmolLM2-135M-shaped model with random weights (30 layers, hidden 576, 9 heads, 3 KV heads, head_dim 64; vocab cut
to --vocab so that the LM head does not dominate the timing). Random weights are not retrofitted: to get a
compressing model, the keys' decision channel is amplified by --gain (the larger, the more tokens merge), and the
achieved CR is *measured* from the filled cache, not set. Rows: stock attention + DynamicCache; DMC attention with
every decision forced to append (CR 1, the DMC code path's own overhead); DMC with the amplified decisions.
Greedy decoding, batch 1, after a --prompt-token prompt. Decode ms/token is the best of --repeats runs.

    PYTHONPATH=$PWD python benchmarks/bench_dmc.py [--prompt 1024] [--new 32] [--gain 12]

With `--dmc-model DIR` (a directory `nas-minitron dmc` wrote, e.g. by `bench_dmc_retrofit.py --keep`) it measures that
retrofitted model instead, on a real prompt (the builtin corpus' validation split, its own tokenizer): stock
attention + DynamicCache on the same weights, DMC all-append, and DMC with the learned decisions.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from nas_minitron.dmc.attention import apply_dmc, dmc_modules, set_dmc_state
from nas_minitron.dmc.cache import DMCCache, cache_stats


def _model(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                  max_position_embeddings=8192, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


def _decode(model: torch.nn.Module, prompt: torch.Tensor, new: int, cache: object) -> tuple[float, float]:
    """(prefill s, decode s per token) of greedy decoding with `cache`."""
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(prompt, cache=cache, use_cache=True).logits[:, -1:]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new):
            logits = model(logits.argmax(-1), cache=cache, use_cache=True).logits[:, -1:]
        return prefill, (time.perf_counter() - start) / new


def _stock_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--gain", type=float, default=12.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dmc-model", default=None, help="a retrofitted model directory to measure instead")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; prompt {args.prompt}, {args.new} new tokens, batch 1, float32, "
          f"{'model ' + args.dmc_model if args.dmc_model else 'random weights'}")
    if args.dmc_model:
        from transformers import AutoTokenizer

        from nas_minitron.data import take_sequences

        tokenizer = AutoTokenizer.from_pretrained(args.dmc_model)
        prompt = take_sequences("builtin", tokenizer, "validation", args.prompt, 1)
        model = AutoModelForCausalLM.from_pretrained(args.dmc_model, dtype=torch.float32).eval()
    else:
        prompt = torch.randint(4, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
        model = _model(args.vocab)
    rows = []
    best = min((_decode(model, prompt, args.new, DynamicCache()) for _ in range(args.repeats)), key=lambda r: r[1])
    stock_cache = DynamicCache()
    _decode(model, prompt, args.new, stock_cache)
    stock_bytes = _stock_bytes(stock_cache)
    rows.append(("stock DynamicCache", 1.0, stock_bytes, stock_bytes, stock_bytes, *best))
    apply_dmc(model)
    if not args.dmc_model:  # random weights: amplify the keys' decision channel so that some tokens merge
        with torch.no_grad():
            for m in dmc_modules(model):
                rows_idx = torch.arange(m.head_dim - 1, m.k_proj.weight.shape[0], m.head_dim)
                m.k_proj.weight[rows_idx] *= args.gain * 4
    learned = "DMC, learned decisions" if args.dmc_model else f"DMC, gain {args.gain:g}"
    for name, force in (("DMC, all append", True), (learned, False)):
        set_dmc_state(model, mode="dmc", channel_scale=0.0, force_append=force)
        best = min((_decode(model, prompt, args.new, DMCCache()) for _ in range(args.repeats)), key=lambda r: r[1])
        cache = DMCCache()
        _decode(model, prompt, args.new, cache)
        stats = cache_stats(cache)
        held = stats["capacity_bytes"] + stats["window_bytes"]
        rows.append((name, stats["cr"], stats["entry_bytes"], stats["allocated_bytes"], held, *best))
    base_bytes, base_ms = rows[0][3], rows[0][6]
    print("| cache | achieved CR (tokens / entries) | kept-entry MiB | padded block MiB (vs stock) | held MiB "
          "(buffers + windows) | prefill s | decode ms/token | vs stock |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cr, kept, allocated, held, prefill, decode in rows:
        print(f"| {name} | {cr:.2f} | {kept / 2**20:.1f} | {allocated / 2**20:.1f} ({allocated / base_bytes:.2f}) "
              f"| {held / 2**20:.1f} | {prefill:.2f} | {decode * 1e3:.1f} | {decode / base_ms:.2f} |")


if __name__ == "__main__":
    main()
