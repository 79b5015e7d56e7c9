"""The paged KV cache's cost on a decoder pass: the same rows through KVCache (one preallocated row per sequence)
and PagedKVCache (blocks; its writer gathers each row's attended keys into a contiguous buffer per layer). Random
weights and an all-zero cache (timing does not depend on the values); rows at different lengths, as the engine
batches them. Prints the whole pass and the writer alone (scatter + gather for every layer; 5x the repeats), and
bytes per block.

    python benchmarks/paged_gather.py --preset small --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dgemma.engine.block_manager import DEFAULT_BLOCK_SIZE, BlockManager
from dgemma.paged_cache import PagedKVCache, bytes_per_block
from dgemma.presets import preset_config, random_model

LENGTHS = [1000, 300, 2000, 150, 700, 1500, 60, 1200]


def median_ms(a, b, repeats: int) -> tuple[float, float]:
    """Median times of a() and b() in ms, run alternately (a loaded machine drifts)."""
    a(), b()  # warm-up
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((a, b), times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return tuple(1000 * statistics.median(t) for t in times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in ("small", "26b-a4b"):
        text = preset_config(name).text
        sliding = sum(2 * text.layer_kv_heads(i) * text.layer_head_dim(i) * 2 for i in range(text.num_hidden_layers)
                      if text.is_sliding(i))
        bf16, fp32 = (bytes_per_block(text, args.block_size, d) for d in (torch.bfloat16, torch.float32))
        print(f"{name}: bytes per block of {args.block_size}: {bf16:,} in bf16, {fp32:,} in fp32; sliding-window "
              f"layers hold {sliding / bytes_per_block(text, 1, torch.bfloat16):.0%} of it")
    cfg = preset_config(args.preset)
    model = random_model(cfg, std=0.02, seed=0)
    C, V, R = model.canvas_length, model.config.vocab_size, len(LENGTHS)
    capacity = max(LENGTHS) + C
    contiguous = model.new_cache(R, capacity)
    bm = BlockManager(sum(-(-(n + C) // args.block_size) for n in LENGTHS), args.block_size)
    paged = PagedKVCache(model.config, bm.num_blocks, args.block_size, R, capacity, model.dtype, model.device)
    for r, n in enumerate(LENGTHS):
        table = bm.allocate(list(range(n)), num_slots=n + C)  # distinct prompts: no sharing
        paged.assign(r, table.blocks, n)
        contiguous.lengths[r] = n
    rows = [5, 2, 7, 0, 3, 6, 1, 4]  # the engine's rows come in any order
    canvas = torch.randint(0, V, (R, C), generator=torch.Generator().manual_seed(0))
    print(f"preset {args.preset}, canvas {C}, {args.threads} threads; decoder pass over {R} rows at cache lengths "
          f"{LENGTHS}; KV {contiguous.nbytes() / 2**20:.0f} MiB contiguous ({capacity} slots a row), "
          f"{paged.nbytes() / 2**20:.0f} MiB paged ({bm.num_blocks} blocks)")

    def decoder(cache):
        return lambda: model.decode(canvas, None, model.plan(cache, rows, C, encoder=False))

    def writer_only(cache):
        plan = model.plan(cache, rows, C, encoder=False)
        new = {s: torch.randn(R, model.config.layer_kv_heads(i), C, model.config.layer_head_dim(i))
               for i, s in ((i, cfg.text.is_sliding(i)) for i in range(cfg.text.num_hidden_layers))}

        def run():
            writer = cache.writer(rows, torch.tensor([cache.lengths[r] for r in rows]), plan.kv_start, plan.kv_end)
            for layer in model.layers:
                writer(layer.layer_idx, layer.is_sliding, new[layer.is_sliding], new[layer.is_sliding])
        return run

    with torch.inference_mode():
        for label, make, repeats in (("decoder pass", decoder, args.repeats),
                                     ("writer alone", writer_only, 5 * args.repeats)):
            a, b = median_ms(make(contiguous), make(paged), repeats)
            print(f"{label:13s} contiguous {a:8.1f} ms   paged {b:8.1f} ms   paged - contiguous {b - a:+8.1f} ms")


if __name__ == "__main__":
    main()
