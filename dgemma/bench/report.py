"""From the timed runs to the numbers `dgemma bench` reports: tokens/s, ms per step, GFLOP/s against the machine's
peak, memory against weights + KV cache, and the table printed for a person."""

from __future__ import annotations

import resource

import torch

from ..cache import KVCache
from ..quant import is_quantized
from .flops import decoder_step_bytes, decoder_step_flops
from .runners import Measurement


def summarize(args, m: Measurement) -> dict:
    """The JSON-shaped report of one run (`dgemma bench --json` prints it as is)."""
    config, dtype, peak, bandwidth = m.config, m.dtype, m.matmul_peak_gflops, m.copy_bandwidth_gb_s
    C = config.canvas_length
    cuda = args.device.startswith("cuda")
    # what the model holds (an int4 model's state_dict() would unpack its weights to report them)
    weights = sum(t.numel() * t.element_size() for t in [*m.model.parameters(), *m.model.buffers()])
    capacity = args.prompt_len + min(-(-args.new_tokens // C), 4) * C  # as generate() allocates it
    kv_cache = KVCache(config.text, args.batch_size, capacity, dtype, "meta").nbytes()  # sized, not allocated
    context = args.prompt_len + args.new_tokens // 2  # average context across canvases
    flops_step = decoder_step_flops(config.text, C, context) * args.batch_size
    bytes_step = decoder_step_bytes(config.text, weights, context, args.batch_size, torch.finfo(dtype).bits)
    rows = []
    for name, st in m.results.items():
        seconds, tokens = st.median("seconds"), st.median("tokens")
        prefill, steps = st.median("prefill_seconds"), st.median("steps")
        row = {
            "engine": name,
            "tokens_per_s": tokens / seconds,
            "prefill_ms": prefill * 1e3,
            "forwards": steps,
            "tokens_per_forward": tokens / args.batch_size / steps if steps else 0.0,
            "run_seconds": [round(r.seconds, 3) for r in st.runs],
        }
        if name != "autoregressive":
            step_s = (seconds - prefill) / steps if steps else 0.0
            row["ms_per_step"] = step_s * 1e3
            row["gflops"] = flops_step / step_s / 1e9 if step_s else 0.0
            row["pct_of_peak"] = 100 * row["gflops"] / peak
            if bandwidth:
                row["gb_per_s"] = bytes_step / step_s / 1e9 if step_s else 0.0
                row["pct_of_bandwidth"] = 100 * row["gb_per_s"] / bandwidth
        else:
            row["ms_per_token"] = (seconds - prefill) / max(steps - 1, 1) * 1e3
        rows.append(row)
    dgemma_peak = m.dgemma_peak_bytes
    out = {
        "workload": {"preset": None if args.model else args.preset, "model": args.model,
                     "active_params_m": round(config.text.num_parameters(active=True) / 1e6, 1),
                     "batch_size": args.batch_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "denoising_steps": args.steps, "adaptive": args.adaptive, "threads": args.threads,
                     "device": args.device, "dtype": str(dtype).replace("torch.", ""), "repeats": args.repeats,
                     "sampler": getattr(args, "sampler", "exact"),
                     "weights": m.model.quantization_config["quant_method"] if is_quantized(m.model)
                     else "unquantized"},
        "machine": {"matmul_peak_gflops": peak, "copy_bandwidth_gb_s": bandwidth, "weights_mb": weights / 2**20,
                    "floor_ms_per_step_bandwidth": bytes_step / (bandwidth * 1e9) * 1e3 if bandwidth else None,
                    "floor_ms_per_step": flops_step / (peak * 1e9) * 1e3,
                    "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "kv_cache_mb": kv_cache / 2**20,
                    "dgemma_peak_memory_mb": dgemma_peak / 2**20,
                    "dgemma_peak_memory_kind": "CUDA max_memory_allocated" if cuda else "RSS above the process baseline",
                    "dgemma_peak_over_weights_and_cache": dgemma_peak / (weights + kv_cache),
                    "peak_rss_mb_by_phase": {k: v / 2**20 for k, v in m.peak_rss_by_phase.items()}},
        "results": rows,
    }
    by = {r["engine"]: r for r in rows}
    if "transformers" in by:
        out["speedup_vs_transformers"] = by["dgemma"]["tokens_per_s"] / by["transformers"]["tokens_per_s"]
    if "autoregressive" in by:
        out["speedup_vs_autoregressive"] = by["dgemma"]["tokens_per_s"] / by["autoregressive"]["tokens_per_s"]
    return out


def print_table(out: dict) -> None:
    w, m = out["workload"], out["machine"]
    print(f"workload: {w['preset'] or w['model']} ({w['active_params_m']}M active), batch {w['batch_size']}, "
          f"prompt {w['prompt_len']}, {w['new_tokens']} new tokens, {w['denoising_steps']} "
          f"{'adaptive' if w['adaptive'] else 'fixed'} steps, {w['threads']} thread{'' if w['threads'] == 1 else 's'}, {w['device']} {w['dtype']}"
          f"{'' if w['weights'] == 'unquantized' else ', ' + w['weights'] + ' weights'}")
    print(f"machine: matmul peak {m['matmul_peak_gflops']:.1f} GFLOP/s; weights {m['weights_mb']:.0f} MiB; "
          f"matmul floor {m['floor_ms_per_step']:.2f} ms per denoising step")
    if m.get("copy_bandwidth_gb_s"):
        print(f"         copy bandwidth {m['copy_bandwidth_gb_s']:.0f} GB/s; bandwidth floor "
              f"{m['floor_ms_per_step_bandwidth']:.3f} ms per denoising step")
    header = f"{'engine':15s} {'tokens/s':>9s} {'ms/step':>9s} {'prefill ms':>10s} {'tok/fwd':>8s} " \
             f"{'GFLOP/s':>8s} {'% peak':>7s}"
    print(f"memory: dgemma peak {m['dgemma_peak_memory_mb']:.0f} MiB ({m['dgemma_peak_memory_kind']}) = "
          f"{m['dgemma_peak_over_weights_and_cache']:.2f}x weights + KV cache "
          f"({m['weights_mb']:.0f} + {m['kv_cache_mb']:.0f} MiB)")
    if m.get("peak_rss_mb_by_phase"):
        phases = ", ".join(f"{k} {v:.0f}" for k, v in m["peak_rss_mb_by_phase"].items())
        print(f"process RSS by phase (MiB, peak): {phases}")
    gpu = bool(m.get("copy_bandwidth_gb_s"))
    if gpu:
        header += f" {'GB/s':>7s} {'% bw':>6s}"
    print(header)
    print("-" * len(header))
    for r in out["results"]:
        step = r.get("ms_per_step", r.get("ms_per_token", 0.0))
        line = (f"{r['engine']:15s} {r['tokens_per_s']:9.1f} {step:9.2f} {r['prefill_ms']:10.1f} "
                f"{r['tokens_per_forward']:8.2f} {r.get('gflops', float('nan')):8.1f} "
                f"{r.get('pct_of_peak', float('nan')):7.2f}")
        if gpu:
            line += f" {r.get('gb_per_s', float('nan')):7.1f} {r.get('pct_of_bandwidth', float('nan')):6.2f}"
        print(line)
    if any(r["engine"] == "autoregressive" for r in out["results"]):
        print("(autoregressive: ms/step is ms per token)")
    if "speedup_vs_autoregressive" in out:
        print(f"speedup_vs_autoregressive: {out['speedup_vs_autoregressive']:.2f}")
    if "speedup_vs_transformers" in out:
        print(f"speedup_vs_transformers: {out['speedup_vs_transformers']:.2f}")


UNSTEADY = 2.0  # slowest over fastest timed run past which a median hides a busy machine


def spread_warnings(out: dict) -> list[str]:
    """A line per engine whose timed runs differ by more than UNSTEADY times: the machine was busy, and the
    median of such runs is no steady figure."""
    lines = []
    for r in out["results"]:
        runs = r["run_seconds"]
        if len(runs) > 1 and min(runs) > 0 and max(runs) / min(runs) > UNSTEADY:
            listed = ", ".join(f"{t:.2f}" for t in runs)
            lines.append(f"warning: {r['engine']}'s {len(runs)} runs took {listed} s ({max(runs) / min(runs):.1f}x "
                         f"apart); something else was using the machine, so the median is not a steady figure")
    return lines
