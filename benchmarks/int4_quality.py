"""How far int4 (and FP8, for scale) moves a model's logits from the unquantized model's.

    python benchmarks/int4_quality.py --preset medium                 # random weights, std 0.02
    python benchmarks/int4_quality.py --model dgemma/assets/sudoku    # a trained checkpoint

For each format: the decoder's logits on the same random prompt and canvas (batch 2), compared with the fp32
model's: the largest absolute difference, the difference's norm relative to the logits' norm, and how many
positions keep the same argmax token, and the seconds the forward pass took (the second of two: the fp8 row dequantizes
per call, the int4 rows run torch's int4 kernels). The int4 rows are run at each group size that fits the model."""

from __future__ import annotations

import argparse
import copy
import time

import torch


def logits(model, V: int, C: int, prompt_len: int = 64) -> torch.Tensor:
    prompt = torch.randint(3, V, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    canvas = torch.randint(0, V, (2, C), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(2, prompt_len + C)
    with torch.no_grad():
        model.encode(prompt, cache)
        return model.denoise(canvas, cache).float()


@torch.no_grad()
def perturb(model, eps: float = 1e-3) -> None:
    """The control row: every quantized-format matrix times (1 + eps * noise), a perturbation far smaller than
    FP8's or int4's rounding. On random-weight presets this alone moves the logits by tens of percent (such a
    model amplifies any change), so there only the trained model's rows say how much a format costs."""
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "embed" not in name and "router" not in name:
            p.mul_(1 + eps * torch.randn(p.shape, generator=g))


def timed(model, V: int, C: int) -> tuple[torch.Tensor, float]:
    """The logits, and the seconds of a second identical pass (the first one also allocates)."""
    logits(model, V, C)
    t = time.perf_counter()
    out = logits(model, V, C)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dgemma.io import checkpoint
    from dgemma.presets import preset_config, random_model
    from dgemma.quant import fp8, int4

    if args.model:
        ck = checkpoint.load(args.model, quiet=True)
        model, config, name = ck.model, ck.config, args.model
    else:
        config = preset_config(args.preset)
        model, name = random_model(config, std=0.02, seed=0), f"{args.preset} (random weights, std 0.02)"
    V, C = config.text.vocab_size, config.canvas_length
    ref, ref_seconds = timed(model, V, C)
    print(f"{name}: logits {tuple(ref.shape)}, fp32 logits' RMS {ref.pow(2).mean().sqrt():.4f}, "
          f"max |logit| {ref.abs().max():.3f}")
    print(f"{'format':28s} {'max |diff|':>10s} {'rel. RMS':>9s} {'same argmax':>12s} {'time':>6s}")
    print(f"{'fp32 (the reference)':28s} {0:10.4f} {0:9.4f} {100:11.1f}% {ref_seconds:5.1f}s")
    runs = [("control: w*(1+1e-3*N(0,1))", perturb), ("fp8 (auto block)", lambda m: fp8.quantize_model(m))]
    for g in (32, 64, 128):
        runs.append((f"int4 group {g}", lambda m, g=g: int4.quantize_model(m, g)))
    for label, quantize in runs:
        q = copy.deepcopy(model)
        try:
            quantize(q)
        except fp8.QuantError as e:
            print(f"{label:28s} does not fit: {e}")
            continue
        got, seconds = timed(q, V, C)
        diff = got - ref
        same = (got.argmax(-1) == ref.argmax(-1)).float().mean()
        print(f"{label:28s} {diff.abs().max():10.4f} {diff.norm() / ref.norm():9.4f} {100 * same:11.1f}% "
              f"{seconds:5.1f}s")
        del q


if __name__ == "__main__":
    main()
