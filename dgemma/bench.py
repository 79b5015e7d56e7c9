"""`dgemma bench`: one workload through dgemma and, with --compare, through transformers' generate or an
autoregressive decode of the same backbone, alternating runs in one process on the same weights."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import KVCache
from .config import GenerationConfig, ModelConfig, TextConfig
from .quant import is_quantized


def measure_matmul_peak(dtype: torch.dtype, device: str, seconds: float = 1.0) -> float:
    """Best GFLOP/s of a large square matmul: the machine's practical ceiling for this dtype and thread count."""
    n = 8192 if str(device).startswith("cuda") else 2048  # big enough to fill the device
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def measure_copy_bandwidth(device: str) -> float:
    """Best GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(20):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = max(best, 2 * src.numel() / (time.perf_counter() - t) / 1e9)
    return best


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def decoder_step_flops(text: TextConfig, canvas: int, context: int, self_conditioned: bool = True) -> float:
    """Matmul FLOPs of one decoder pass over a canvas with `context` cached tokens (per sequence)."""
    h, c = text.hidden_size, canvas
    total = 0.0
    for i in range(text.num_hidden_layers):
        hd, kv = text.layer_head_dim(i), text.layer_kv_heads(i)
        nh = text.num_attention_heads
        proj = h * nh * hd * 2 + h * kv * hd * (2 if text.is_sliding(i) else 1)
        keys = (min(context, text.sliding_window - 1) if text.is_sliding(i) else context) + c
        total += 2 * c * proj + 2 * 2 * c * keys * nh * hd
        total += 2 * c * 3 * h * text.intermediate_size
        total += 2 * c * (text.top_k_experts * 3 * h * text.moe_intermediate_size + h * text.num_experts)
    total += 2 * c * h * text.vocab_size  # tied head
    if self_conditioned:
        total += 2 * c * text.vocab_size * h + 2 * c * 3 * h * text.intermediate_size  # soft embedding + SC MLP
    return total


@dataclass
class RunResult:
    seconds: float
    prefill_seconds: float
    steps: int
    tokens: int
    peak_delta_bytes: int = 0


@dataclass
class EngineStats:
    name: str
    runs: list[RunResult] = field(default_factory=list)

    def median(self, key):
        return statistics.median(getattr(r, key) for r in self.runs)


def _rss_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_dgemma(model, prompts, gen, seed, cuda_graphs: bool | None = None) -> RunResult:
    from .generate import generate

    torch.manual_seed(seed)
    before = _rss_status("VmRSS:")
    _reset_peak()
    out = generate(model, prompts, gen, cuda_graphs=cuda_graphs)
    delta = _rss_status("VmHWM:") - before
    return RunResult(out.stats.seconds, out.stats.prefill_seconds, out.stats.denoising_steps // len(prompts),
                     out.stats.generated_tokens, delta)


def run_transformers(ref, prompts, gen, seed) -> RunResult:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    device = ref.device
    ids = torch.tensor(prompts, device=device)
    calls = {"n": 0, "prefill": 0.0}
    encoder = ref.model.encoder
    original = encoder.forward

    def timed(*a, **k):  # time the prompt's encoder pass (prefill) only
        t = time.perf_counter()
        out = original(*a, **k)
        if calls["n"] == 0:
            _sync(str(device))
            calls["prefill"] = time.perf_counter() - t
        calls["n"] += 1
        return out

    encoder.forward = timed
    steps = {"n": 0}
    forward = ref.forward

    def count(*a, **k):
        steps["n"] += 1
        return forward(*a, **k)

    ref.forward = count
    try:
        torch.manual_seed(seed)
        before = _rss_status("VmRSS:")
        _reset_peak()
        _sync(str(device))
        t = time.perf_counter()
        out = ref.generate(ids, max_new_tokens=gen.max_new_tokens, max_denoising_steps=gen.max_denoising_steps,
                           t_min=gen.t_min, t_max=gen.t_max, stability_threshold=gen.stability_threshold,
                           confidence_threshold=gen.confidence_threshold,
                           sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(gen.entropy_bound)))
        _sync(str(device))
        seconds = time.perf_counter() - t
        delta = _rss_status("VmHWM:") - before
    finally:
        encoder.forward = original
        ref.forward = forward
    tokens = int((out.sequences[:, ids.shape[1]:] != gen.pad_token_id).sum())
    return RunResult(seconds, calls["prefill"], steps["n"], tokens, delta)


@torch.inference_mode()
def run_autoregressive(model, prompts, gen, seed) -> RunResult:
    """Causal decoding of the same backbone, one token per forward with the KV cache (greedy)."""
    torch.manual_seed(seed)
    tokens = torch.tensor(prompts, device=model.device)
    B, T = tokens.shape
    n_new = gen.max_new_tokens
    before = _rss_status("VmRSS:")
    _reset_peak()
    t0 = time.perf_counter()
    cache = model.new_cache(B, T + n_new)
    hidden = model.encode(tokens, cache)
    next_token = model.logits(hidden[:, -1:]).argmax(-1)
    _sync(str(model.device))
    prefill = time.perf_counter() - t0
    for _ in range(n_new - 1):
        hidden = model.encode(next_token, cache)
        next_token = model.logits(hidden).argmax(-1)
    _sync(str(model.device))
    seconds = time.perf_counter() - t0
    return RunResult(seconds, prefill, n_new, B * n_new, _rss_status("VmHWM:") - before)


def build_model(args):
    from . import checkpoint
    from .presets import default_generation, preset_config, random_model

    device = args.device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype] \
        if args.dtype else checkpoint.default_dtype(device)
    if args.model:
        ck = checkpoint.load(args.model, device=device, dtype=dtype, quiet=True)
        model, config, generation, path = ck.model, ck.config, ck.generation, Path(args.model)
    else:
        config = preset_config(args.preset)
        model = random_model(config, std=0.02, seed=0, device=device, dtype=dtype)
        generation, path = default_generation(config), None
    if args.quantize:
        from .quant import quantize_model

        quantize_model(model)
        path = None  # what transformers is compared on is this model, saved afresh
    return model, config, generation, path, dtype


def load_transformers(model, config: ModelConfig, path: Path | None, device: str, dtype: torch.dtype):
    import transformers

    from . import checkpoint

    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="dgemma-bench-")
        path = Path(tmp.name) / "model"
        # a tiny (unused) vision tower, so transformers does not build its 400 MB default one
        vision = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16)
        checkpoint.save(path, model, config, GenerationConfig(), vision_config=vision)
    transformers.logging.set_verbosity_error()
    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).to(device).eval()
    return ref, tmp


def main_bench(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    baseline_rss = _rss_status("VmRSS:")  # the interpreter and torch, before any weights
    model, config, base_gen, path, dtype = build_model(args)
    if args.quantize and not args.device.startswith("cuda"):
        # the preset was built in fp32 before it was quantized: count only what the quantized model holds
        from .runtime import release_free_memory

        release_free_memory()
        _reset_peak()
    C = config.canvas_length
    gen = base_gen.replace(max_new_tokens=args.new_tokens, max_denoising_steps=args.steps,
                           entropy_bound=args.entropy_bound)
    if not args.adaptive:  # fixed steps: an unreachable confidence threshold disables the early stop
        gen = gen.replace(confidence_threshold=1e-30)
    V = config.text.vocab_size
    g = torch.Generator().manual_seed(1234)
    prompts = torch.randint(3, V, (args.batch_size, args.prompt_len), generator=g).tolist()

    cuda = args.device.startswith("cuda")
    engines = {"dgemma": lambda seed: run_dgemma(model, prompts, gen, seed, cuda_graphs=cuda and args.cuda_graphs)}
    if cuda and args.cuda_graphs and "eager" in args.compare:  # the same engine without CUDA graphs
        engines["dgemma-eager"] = lambda seed: run_dgemma(model, prompts, gen, seed, cuda_graphs=False)
    # dgemma's memory, measured before anything else is loaded: its warm-up run is its largest (first touch)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engines["dgemma"](0)
    dgemma_peak = (torch.cuda.max_memory_allocated() if cuda else _rss_status("VmHWM:") - baseline_rss)
    peak = measure_matmul_peak(dtype, args.device)
    tmp = None
    if "transformers" in args.compare:
        ref, tmp = load_transformers(model, config, path, args.device, dtype)
        engines["transformers"] = lambda seed: run_transformers(ref, prompts, gen, seed)
    if "autoregressive" in args.compare:
        engines["autoregressive"] = lambda seed: run_autoregressive(model, prompts, gen, seed)

    results = {name: EngineStats(name) for name in engines}
    for name, fn in engines.items():  # warm-up (allocator, lazy init), not timed
        if name != "dgemma":  # warmed up above
            fn(0)
    for i in range(args.repeats):  # alternate engines so drift and contention hit all of them alike
        for name, fn in engines.items():
            results[name].runs.append(fn(i + 1))
            print(f"  {name:15s} run {i + 1}: {results[name].runs[-1].seconds:.2f} s", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    # measured before and after the runs: a busy moment on the machine lowers one reading, not both
    peak = max(peak, measure_matmul_peak(dtype, args.device))
    bandwidth = measure_copy_bandwidth(args.device) if cuda else None

    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    capacity = args.prompt_len + min(-(-args.new_tokens // C), 4) * C  # as generate() allocates it
    kv_cache = KVCache(config.text, args.batch_size, capacity, dtype, "meta").nbytes()  # sized, not allocated
    context = args.prompt_len + args.new_tokens // 2  # average context across canvases
    flops_step = decoder_step_flops(config.text, C, context) * args.batch_size
    # bytes a step must move at least: every weight once (a 256-token canvas reaches every expert) and the
    # cached K/V it attends over
    kv_bytes = 0
    for i in range(config.text.num_hidden_layers):
        keys = min(context, config.text.sliding_window) if config.text.is_sliding(i) else context
        kv_bytes += 2 * keys * config.text.layer_kv_heads(i) * config.text.layer_head_dim(i)
    bytes_step = weights + kv_bytes * args.batch_size * torch.finfo(dtype).bits // 8
    rows = []
    for name, st in results.items():
        seconds, tokens = st.median("seconds"), st.median("tokens")
        prefill, steps = st.median("prefill_seconds"), st.median("steps")
        row = {
            "engine": name,
            "tokens_per_s": tokens / seconds,
            "prefill_ms": prefill * 1e3,
            "forwards": steps,
            "tokens_per_forward": tokens / args.batch_size / steps if steps else 0.0,
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
    out = {
        "workload": {"preset": None if args.model else args.preset, "model": args.model,
                     "active_params_m": round(config.text.num_parameters(active=True) / 1e6, 1),
                     "batch_size": args.batch_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "denoising_steps": args.steps, "adaptive": args.adaptive, "threads": args.threads,
                     "device": args.device, "dtype": str(dtype).replace("torch.", ""), "repeats": args.repeats,
                     "weights": "fp8" if is_quantized(model) else "unquantized"},
        "machine": {"matmul_peak_gflops": peak, "copy_bandwidth_gb_s": bandwidth, "weights_mb": weights / 2**20,
                    "floor_ms_per_step_bandwidth": bytes_step / (bandwidth * 1e9) * 1e3 if bandwidth else None,
                    "floor_ms_per_step": flops_step / (peak * 1e9) * 1e3,
                    "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "kv_cache_mb": kv_cache / 2**20,
                    "dgemma_peak_memory_mb": dgemma_peak / 2**20,
                    "dgemma_peak_memory_kind": "CUDA max_memory_allocated" if cuda else "RSS above the process baseline",
                    "dgemma_peak_over_weights_and_cache": dgemma_peak / (weights + kv_cache)},
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
          f"{'adaptive' if w['adaptive'] else 'fixed'} steps, {w['threads']} threads, {w['device']} {w['dtype']}"
          f"{', FP8 weights' if w['weights'] == 'fp8' else ''}")
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


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    from .presets import PRESETS

    p = subparsers.add_parser("bench", help="measure generation speed (optionally against transformers / AR)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="random-weight model preset")
    p.add_argument("--model", help="benchmark a checkpoint directory instead of a preset")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=16, help="denoising steps per canvas")
    p.add_argument("--adaptive", action="store_true", help="allow the early stop (default: fixed steps)")
    p.add_argument("--entropy-bound", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2 if os.cpu_count() == 2 else 8))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare", action="append", default=[], choices=["transformers", "autoregressive", "eager"],
                   help="also run transformers' generate, an autoregressive decode, or (CUDA) dgemma without graphs")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, run each denoising step eagerly instead of replaying a CUDA graph")
    p.add_argument("--quantize", choices=["fp8"], default=None,
                   help="quantize the model's weights first (as `dgemma quantize` does) and time that")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args) -> int:
    for name in ("batch_size", "prompt_len", "new_tokens", "steps", "threads", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.quantize and "transformers" in args.compare and not args.device.startswith("cuda"):
        raise ValueError("--compare transformers with --quantize needs --device cuda: on a CPU transformers "
                         "5.23 cannot dequantize fused FP8 experts")
    out = main_bench(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(out)
    return 0

