"""Everything a first GPU run should measure, in one command, within 8 minutes on one CUDA GPU:

    cd <repo> && .venv/bin/python benchmarks/gpu_check.py --out "$OUT"

It installs and downloads nothing (random-weight presets only). Parts, cheapest correctness checks first, each in
its own subprocess with its own timeout (and none past the overall --budget), so a failing or hanging part is
recorded and the next one runs:

    1. pytest -m gpu                 the GPU tests (graph capture, int4 and NVFP4 CUDA paths, training on CUDA)
    2. engine-step                   the serving engine's step against generate's (tokens equal, ms per step)
    3. bench-small                   `dgemma bench --preset small` against transformers, CUDA graphs on and off
    4. 26b-a4b-fp8                   the release's shapes built on the device, batch 1, 4 and 8, prompt 128,
                                     512 new tokens, 16 fixed steps (tokens/s, ms per step, prefill, peak memory)
    5. constrained-step              `small` at the release's 262,144-token vocabulary, a step with and without a
                                     JSON constraint (structured_output.py cost: the canvas read on the device, the
                                     DP's forward pass there and, once more, on the host)
    6. bench-medium                  as 3 on `medium`
    7. 26b-a4b-int4, -nvfp4, -bf16   as 4, for each format whose weights fit the device (bf16 needs ~80 GB)

It writes gpu_check.json (every part: status, seconds, why it failed, its figures) and gpu_check.md (the tables)
to --out, and prints the markdown. The exit status is 0 only if every part passed.

    python benchmarks/gpu_check.py --dry-run --out /tmp/check    # every part at tiny scale on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("fp8", "int4", "nvfp4", "bf16")  # of the 26b-a4b build, in the order they run
FORMAT_SIZE_KEY = {"fp8": "fp8", "int4": "int4", "nvfp4": "nvfp4", "bf16": "bf16"}


@dataclass
class Part:
    name: str
    argv: list[str]
    timeout: float
    kind: str  # "pytest", "engine", "bench", "sweep" or "constrained": how its output is read
    result: dict = field(default_factory=dict)


def parts(dry: bool, device: str, py: str) -> list[Part]:
    """The parts in the order they run. Dry: tiny presets and few steps on the CPU, the same code paths."""
    me = str(Path(__file__).resolve())
    bench = [py, "-m", "dgemma.cli", "bench", "--device", device, "--json"]
    if dry:
        work = ["--prompt-len", "8", "--new-tokens", "64", "--steps", "2", "--threads", "2"]
        out = [Part("pytest-gpu", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                   "tests/test_cuda.py"], 60, "pytest"),
               Part("engine-step", [py, "-m", "dgemma.bench.engine_step", "--preset", "tiny", "--device", device,
                                    "--batch-size", "2", "--json", *work], 60, "engine"),
               Part("bench-small", [*bench, "--preset", "tiny", "--compare", "transformers", "--repeats", "1",
                                    *work], 60, "bench")]
        sweep = [py, me, "--sweep", "--preset", "tiny", "--device", device, "--batch-sizes", "1", "2", *work]
    else:
        work = ["--prompt-len", "128", "--new-tokens", "512", "--steps", "16"]
        graphs = ["--compare", "transformers", "--compare", "eager", "--repeats", "2"]
        out = [Part("pytest-gpu", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                    120, "pytest"),
               Part("engine-step", [py, "-m", "dgemma.bench.engine_step", "--preset", "small", "--device", device,
                                    "--json", *work], 60, "engine"),
               Part("bench-small", [*bench, "--preset", "small", *graphs, *work], 60, "bench")]
        sweep = [py, me, "--sweep", "--preset", "26b-a4b", "--device", device, "--batch-sizes", "1", "4", "8", *work]
    constrained = Part("constrained-step", [py, str(ROOT / "benchmarks" / "structured_output.py"), "cost", "--device",
                                            device, "--json", *(["--vocab", "4096", "--steps", "1", "--pairs", "1"]
                                                                if dry else ["--vocab", "262144", "--steps", "8"])],
                       90 if dry else 150, "constrained")
    medium = Part("bench-medium", [*bench, "--preset", "tiny" if dry else "medium",
                                   *(["--repeats", "1"] if dry else graphs), *work], 60 if dry else 75, "bench")
    sweeps = [Part(f"26b-a4b-{f}", [*sweep, "--format", f], 90 if dry else 100, "sweep") for f in FORMATS]
    return [*out, sweeps[0], constrained, medium, *sweeps[1:]]


def fits(fmt: str, preset: str, device: str) -> tuple[bool, str]:
    """Whether `fmt`'s weights of `preset` (from shapes alone) leave a fifth of the device's memory for the rest."""
    import torch

    from dgemma.presets import preset_config
    from dgemma.quant.sizes import format_sizes

    need = format_sizes(preset_config(preset))[FORMAT_SIZE_KEY[fmt]]
    if device.startswith("cuda"):
        have = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    why = f"{fmt} weights {need / 2**30:.1f} GiB, device {have / 2**30:.1f} GiB"
    return need <= 0.8 * have, why


def sweep(args) -> int:
    """One format of one preset built once on the device, then `dgemma bench`'s workload at each batch size.
    Prints one JSON object: the format, the build's seconds and peak memory, and one bench report per batch."""
    import torch

    from dgemma.bench.cli import add_bench_parser
    from dgemma.bench.report import summarize
    from dgemma.bench.runners import build_model
    from dgemma.cli_common import apply_threads

    ok, why = fits(args.format, args.preset, args.device)
    if not ok:
        print(json.dumps({"format": args.format, "skipped": f"does not fit: {why}"}))
        return 0
    sub = argparse.ArgumentParser().add_subparsers()
    bench = add_bench_parser(sub).parse_args([
        "--preset", args.preset, "--device", args.device, "--prompt-len", str(args.prompt_len),
        "--new-tokens", str(args.new_tokens), "--steps", str(args.steps), "--repeats", "1",
        *(["--threads", str(args.threads)] if args.threads else []),
        *([] if args.format == "bf16" else ["--quantize", args.format]),
        *(["--dtype", "bfloat16"] if args.format == "bf16" or args.device.startswith("cuda") else [])])
    apply_threads(bench.threads)
    from dgemma.bench.probes import rss_status
    from dgemma.bench.runners import run_workload

    t = time.perf_counter()
    built = build_model(bench)
    cuda = args.device.startswith("cuda")
    report = {"format": args.format, "fits": why, "build_seconds": time.perf_counter() - t,
              "build_peak_mb": (torch.cuda.max_memory_allocated() if cuda else rss_status("VmHWM:")) / 2**20,
              "runs": []}
    for b in args.batch_sizes:
        bench.batch_size = b
        report["runs"].append(summarize(bench, run_workload(bench, built)))
        print(f"  batch {b} done", file=sys.stderr)
    print(json.dumps(report))
    return 0


def last_json(stdout: str) -> dict | None:
    """The JSON object a part printed last on stdout (bench --json pretty-prints one; a sweep prints one line)."""
    decoder = json.JSONDecoder()
    for i in [i for i, line in enumerate(stdout.splitlines()) if line.startswith("{")][::-1]:
        text = "\n".join(stdout.splitlines()[i:])
        try:
            return decoder.raw_decode(text)[0]
        except ValueError:
            continue
    return None


def run_part(part: Part, timeout: float, env: dict) -> dict:
    """Run one part in a subprocess; never raises. -> status ("passed", "failed", "timeout"), seconds, why, data."""
    t = time.perf_counter()
    try:
        p = subprocess.run(part.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        return {"status": "timeout", "seconds": time.perf_counter() - t,
                "why": f"killed after {timeout:.0f} s", "stderr_tail": tail.decode(errors="replace")
                if isinstance(tail, bytes) else tail}
    result = {"seconds": time.perf_counter() - t, "returncode": p.returncode}
    if part.kind == "pytest":
        summary = [line for line in p.stdout.splitlines() if line.strip()][-1:] or [""]
        result["summary"] = summary[0]
        result["data"] = None
    else:
        result["data"] = last_json(p.stdout)
    if p.returncode != 0 or (part.kind != "pytest" and result["data"] is None):
        result["status"] = "failed"
        lines = [line for line in (p.stderr + "\n" + p.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error:" in line or "FAILED" in line]
        result["why"] = (errors or lines or [f"exit status {p.returncode}"])[-1][:500]
        result["stderr_tail"] = p.stderr[-3000:]
        if part.kind == "pytest":
            result["failures"] = [line for line in p.stdout.splitlines() if line.startswith("FAILED")]
    else:
        result["status"] = "passed"
    return result


def markdown(report: dict) -> str:
    """The tables: one line per part, then the bench figures and the 26b-a4b sweep."""
    h = report["host"]
    lines = [f"# gpu_check on {h['device_name']} ({'dry run' if report['dry_run'] else 'full'}), "
             f"{report['total_seconds']:.0f} s", "", "| part | status | s | note |", "|---|---|---|---|"]
    for name, r in report["parts"].items():
        note = r.get("why") or r.get("summary") or ""
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | {note.replace('|', '/')} |")
    bench_rows, sweep_rows, engine_rows, constrained_rows = [], [], [], []
    for name, r in report["parts"].items():
        d = r.get("data") or {}
        if "results" in d:
            w, m = d["workload"], d["machine"]
            for e in d["results"]:
                bench_rows.append(f"| {name}: {w['preset']} | {e['engine']} | {e['tokens_per_s']:.1f} | "
                                  f"{e.get('ms_per_step', float('nan')):.2f} | {e['prefill_ms']:.1f} | "
                                  f"{m['dgemma_peak_memory_mb']:.0f} |")
        for run in d.get("runs", []):
            w, m, e = run["workload"], run["machine"], run["results"][0]
            sweep_rows.append(f"| {d['format']} | {w['batch_size']} | {e['tokens_per_s']:.1f} | "
                              f"{e['ms_per_step']:.2f} | {e['prefill_ms']:.1f} | {m['dgemma_peak_memory_mb']:.0f} | "
                              f"{m['weights_mb']:.0f} |")
        if d.get("skipped"):
            sweep_rows.append(f"| {d['format']} | - | skipped: {d['skipped']} | | | | |")
        if "constrained" in d:
            k = d["constrained"]
            constrained_rows += [f"| {k['device']} | {k['vocab']} | {r['constraint']} | {r['states']} | {r['pairs']} | "
                                 f"{min(r['ms_without']):.1f} | {min(r['ms_with']):.1f} | {r['ratio']:.2f} |"
                                 for r in k["rows"]]
        for row in d.get("rows", []):
            engine_rows.append(f"| {d['preset']} | {row['batch_size']} | {row['engine_ms_per_step']:.2f} | "
                               f"{row.get('engine_graphs_ms_per_step', float('nan')):.2f} | "
                               f"{row.get('generate_eager_ms_per_step', float('nan')):.2f} | "
                               f"{row.get('generate_graphs_ms_per_step', float('nan')):.2f} | "
                               f"{row.get('tokens_equal_generate_eager', '-')} | "
                               f"{row.get('tokens_equal_generate_graphs', '-')} | "
                               f"{row.get('tokens_equal_engine_graphs', '-')} |")
    if engine_rows:
        lines += ["", "| engine step | batch | engine ms/step | engine graphs ms/step | generate eager ms/step | "
                      "generate graphs ms/step | tokens = generate eager | tokens = generate graphs | "
                      "engine graphs tokens = engine eager |", "|---|---|---|---|---|---|---|---|---|", *engine_rows]
    if constrained_rows:  # `small`, one canvas of fixed steps, with and without a constraint
        lines += ["", "| constrained step: device | vocab | constraint | states | pairs | ms/step without | "
                      "ms/step with | with/without |", "|---|---|---|---|---|---|---|---|", *constrained_rows]
    if bench_rows:  # dgemma (graphs on CUDA), dgemma-eager (graphs off), transformers
        lines += ["", "| part: preset | engine | tokens/s | ms/step | prefill ms | dgemma peak MiB |",
                  "|---|---|---|---|---|---|", *bench_rows]
    if sweep_rows:
        lines += ["", "| 26b-a4b weights | batch | tokens/s | ms/step | prefill ms | peak MiB | weights MiB |",
                  "|---|---|---|---|---|---|---|", *sweep_rows]
    return "\n".join(lines) + "\n"


def host(device: str) -> dict:
    import platform

    import torch

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor()
    return {"device": device, "device_name": name or "cpu", "torch": torch.__version__, "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.md (created)")
    p.add_argument("--dry-run", action="store_true", help="every part at tiny scale on the CPU")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 480; dry run 600)")
    p.add_argument("--only", nargs="+", help="run only the parts with these names")
    # the child mode: one format of the 26b-a4b sweep (what the 26b-a4b-* parts run)
    p.add_argument("--sweep", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--format", choices=FORMATS, help=argparse.SUPPRESS)
    p.add_argument("--preset", default="26b-a4b", help=argparse.SUPPRESS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help=argparse.SUPPRESS)
    p.add_argument("--prompt-len", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.sweep:
        args.device = device
        return sweep(args)
    if args.out is None:
        p.error("--out is required")
    budget = args.budget or (600.0 if args.dry_run else 480.0)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    todo = [q for q in parts(args.dry_run, device, sys.executable) if not args.only or q.name in args.only]
    start = time.perf_counter()
    report = {"dry_run": args.dry_run, "host": host(device), "command": " ".join(sys.argv), "parts": {}}
    for part in todo:
        left = budget - (time.perf_counter() - start)
        if left < 10:
            part.result = {"status": "skipped", "why": f"out of time (budget {budget:.0f} s)"}
        else:
            print(f"[gpu_check] {part.name} (at most {min(part.timeout, left):.0f} s)", file=sys.stderr, flush=True)
            part.result = run_part(part, min(part.timeout, left), env)
            print(f"[gpu_check] {part.name}: {part.result['status']} in {part.result['seconds']:.0f} s"
                  f"{'  ' + part.result['why'] if 'why' in part.result else ''}", file=sys.stderr, flush=True)
        report["parts"][part.name] = part.result
    report["total_seconds"] = time.perf_counter() - start
    report["failed"] = [n for n, r in report["parts"].items() if r["status"] != "passed"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    return 0 if not report["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
