"""Where the 26b-a4b preset's memory goes on a CPU, phase by phase, at the release's widths with fewer layers
(the 262k vocabulary, 128 experts top-8, 512-wide global heads; the last layer a global one): the process's RSS
and peak RSS after the start, the int4 build (`build_on_device`, as `dgemma bench --preset 26b-a4b --quantize
int4` builds it) and one canvas of --steps steps. Two layer counts give the per-layer slope, and so the 30
layers' figure, without building 16 GB.

    python benchmarks/memory_26b.py --layers 1            # build, then one canvas of 2 steps
    python benchmarks/memory_26b.py --layers 3 --build-only
"""

from __future__ import annotations

import argparse

import torch

from dgemma.bench.probes import reset_peak, rss_status
from dgemma.config import FULL, SLIDING
from dgemma.generate import generate
from dgemma.presets import build_on_device, default_generation, preset_config


def phase(name: str) -> None:
    print(f"{name:10s} rss {rss_status('VmRSS:') / 2**20:.0f} MiB  peak {rss_status('VmHWM:') / 2**20:.0f} MiB",
          flush=True)
    reset_peak()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.layers
    config = preset_config("26b-a4b", num_hidden_layers=n, layer_types=[SLIDING] * (n - 1) + [FULL])
    phase("start")
    model = build_on_device(config, "cpu", torch.float32, "int4")
    phase("build")
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(f"the model holds {held / 2**20:.0f} MiB")
    if args.build_only:
        return
    gen = default_generation(config).replace(max_new_tokens=config.canvas_length, max_denoising_steps=args.steps,
                                             confidence_threshold=1e-30)
    torch.manual_seed(0)
    out = generate(model, [list(range(3, 19))], gen)
    phase("generate")
    print(f"prefill {out.stats.prefill_seconds:.1f} s, generation {out.stats.seconds:.1f} s")


if __name__ == "__main__":
    main()
