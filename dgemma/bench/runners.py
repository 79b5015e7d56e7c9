"""One timed generation per engine: dgemma, transformers' generate, and an autoregressive decode of the same
backbone; and the model they share (a random preset or a checkpoint)."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import GenerationConfig, ModelConfig
from .probes import reset_peak, rss_status, sync


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


def run_dgemma(model, prompts, gen, seed, cuda_graphs: bool | None = None, sampler: str = "exact") -> RunResult:
    from ..generate import generate

    torch.manual_seed(seed)
    before = rss_status("VmRSS:")
    reset_peak()
    out = generate(model, prompts, gen, cuda_graphs=cuda_graphs, sampler=sampler)
    delta = rss_status("VmHWM:") - before
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
            sync(str(device))
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
        before = rss_status("VmRSS:")
        reset_peak()
        sync(str(device))
        t = time.perf_counter()
        out = ref.generate(ids, max_new_tokens=gen.max_new_tokens, max_denoising_steps=gen.max_denoising_steps,
                           t_min=gen.t_min, t_max=gen.t_max, stability_threshold=gen.stability_threshold,
                           confidence_threshold=gen.confidence_threshold,
                           sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(gen.entropy_bound)))
        sync(str(device))
        seconds = time.perf_counter() - t
        delta = rss_status("VmHWM:") - before
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
    before = rss_status("VmRSS:")
    reset_peak()
    t0 = time.perf_counter()
    cache = model.new_cache(B, T + n_new)
    hidden = model.encode(tokens, cache)
    next_token = model.logits(hidden[:, -1:]).argmax(-1)
    sync(str(model.device))
    prefill = time.perf_counter() - t0
    for _ in range(n_new - 1):
        hidden = model.encode(next_token, cache)
        next_token = model.logits(hidden).argmax(-1)
    sync(str(model.device))
    seconds = time.perf_counter() - t0
    return RunResult(seconds, prefill, n_new, B * n_new, rss_status("VmHWM:") - before)


def build_model(args):
    from ..io import checkpoint
    from ..cli_common import load_checkpoint
    from ..presets import default_generation, preset_config, random_model

    device = args.device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype] \
        if args.dtype else checkpoint.default_dtype(device)
    if args.model:
        ck = load_checkpoint(args.model, device=device, dtype=dtype, quiet=True)
        model, config, generation, path = ck.model, ck.config, ck.generation, Path(args.model)
    elif args.preset == "26b-a4b" or args.quantize == "nvfp4":  # made module by module on the device, quantized
        from ..presets import build_on_device

        config = preset_config(args.preset)
        model = build_on_device(config, device, dtype, args.quantize)
        return model, config, default_generation(config), None, dtype
    else:
        config = preset_config(args.preset)
        model = random_model(config, std=0.02, seed=0, device=device, dtype=dtype)
        generation, path = default_generation(config), None
    if args.quantize:
        from ..quant import fp8, int4

        (int4 if args.quantize == "int4" else fp8).quantize_model(model)
        path = None  # what transformers is compared on is this model, saved afresh
    return model, config, generation, path, dtype


def load_transformers(model, config: ModelConfig, path: Path | None, device: str, dtype: torch.dtype):
    import transformers

    from ..io import checkpoint

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


@dataclass
class Measurement:
    """Everything one `dgemma bench` run measured, before it is summarised."""

    model: torch.nn.Module
    config: ModelConfig
    dtype: torch.dtype
    results: dict[str, EngineStats]
    matmul_peak_gflops: float
    copy_bandwidth_gb_s: float | None
    dgemma_peak_bytes: int
    peak_rss_by_phase: dict[str, int] = field(default_factory=dict)  # the process's peak RSS in each phase (bytes)


def run_workload(args, built: tuple | None = None) -> Measurement:
    """Build the model (or take `built`, what build_model returned, to time several workloads on one model), time
    every engine on the same prompts (alternating runs), and probe the machine."""
    from .probes import measure_copy_bandwidth, measure_matmul_peak

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        from ..cli_common import CLIError

        raise CLIError("--device cuda requested but no CUDA device is available")
    baseline_rss = rss_status("VmRSS:")  # the interpreter and torch, before any weights
    model, config, base_gen, path, dtype = built or build_model(args)
    phases = {"start": baseline_rss, "build": rss_status("VmHWM:")}
    if args.quantize and not args.device.startswith("cuda") and built is None:
        # the preset was built in fp32 before it was quantized: count only what the quantized model holds
        from ..runtime import release_free_memory

        release_free_memory()
        phases["after build, freed"] = rss_status("VmRSS:")
        reset_peak()
    gen = base_gen.replace(max_new_tokens=args.new_tokens, max_denoising_steps=args.steps,
                           entropy_bound=args.entropy_bound)
    if not args.adaptive:  # fixed steps: an unreachable confidence threshold disables the early stop
        gen = gen.replace(confidence_threshold=1e-30)
    V = config.text.vocab_size
    g = torch.Generator().manual_seed(1234)
    prompts = torch.randint(3, V, (args.batch_size, args.prompt_len), generator=g).tolist()

    cuda = args.device.startswith("cuda")
    sampler = getattr(args, "sampler", "exact")
    graphs = cuda and args.cuda_graphs and getattr(model, "cuda_graph_capturable", True)  # not int4 experts
    engines = {"dgemma": lambda seed: run_dgemma(model, prompts, gen, seed, cuda_graphs=graphs, sampler=sampler)}
    if graphs and "eager" in args.compare:  # the same engine without CUDA graphs
        engines["dgemma-eager"] = lambda seed: run_dgemma(model, prompts, gen, seed, cuda_graphs=False,
                                                          sampler=sampler)
    # dgemma's memory, measured before anything else is loaded: its warm-up run is its largest (first touch)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engines["dgemma"](0)
    dgemma_peak = (torch.cuda.max_memory_allocated() if cuda else rss_status("VmHWM:") - baseline_rss)
    phases["first generation"] = rss_status("VmHWM:")
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
    phases["timed runs"] = rss_status("VmHWM:")  # the peak since the first generation (reset_peak per run)
    return Measurement(model, config, dtype, results, peak, bandwidth, dgemma_peak, phases)


def print_format_sizes(args) -> None:
    """`dgemma bench --sizes-only`: the weights in every format, from shapes on the meta device."""
    from ..config import ModelConfig, read_json
    from ..presets import preset_config
    from ..quant.sizes import format_sizes, print_sizes

    if args.model:
        config = ModelConfig.from_hf(read_json(Path(args.model) / "config.json"), str(Path(args.model) / "config.json"))
        name = args.model
    else:
        config, name = preset_config(args.preset), args.preset
    C = config.canvas_length
    capacity = args.prompt_len + min(-(-args.new_tokens // C), 4) * C  # as generate() allocates it
    print_sizes(name, config, format_sizes(config), capacity)
