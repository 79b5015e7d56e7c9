"""Does the server stay responsive while it refuses huge prompts?

A streaming request runs (back to back) while /health is polled every 20 ms: first alone (baseline), then while
other client processes send 10 MB prompts (--rate per second each; 0: without pause). Two attacks: the default
--max-request-bytes (4 MiB: 413 before the body is read), and a limit raised to 16 MiB (the body is read and parsed,
and the prompt is refused before it is encoded, as it cannot fit in the context). Reports /health latency (p50, p99,
max) and the stream's pace (tokens/s, median and longest gap between chunks) per phase.

    python benchmarks/load_big_prompt.py                 # tiny random model + byte-level test tokenizer, in process
    python benchmarks/load_big_prompt.py --model DIR     # a real checkpoint
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from dgemma.engine import Engine
from dgemma.server import ServerThread, Serving, build_app
from dgemma.server.limits import ServerLimits


def load(model_dir: str | None):
    from dgemma.io import checkpoint
    from dgemma.text.tokenizer import Tokenizer

    if model_dir is None:
        from dgemma.presets import default_generation, preset_config, random_model
        from dgemma.testing import write_test_tokenizer

        d = Path(tempfile.mkdtemp())
        cfg = preset_config("tiny", canvas_length=16, vocab_size=256)
        write_test_tokenizer(d / "tok")
        checkpoint.save(d / "model", random_model(cfg, std=0.1, seed=0), cfg,
                        default_generation(cfg).replace(max_denoising_steps=8), tokenizer_dir=d / "tok")
        model_dir = str(d / "model")
    ckpt = checkpoint.load(model_dir, quiet=True)
    return ckpt, Tokenizer.from_dir(model_dir)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def attack(url: str, prompt: bytes, rate: float, stop, results) -> None:
    statuses: dict[str, int] = {}
    with httpx.Client(timeout=120) as c:
        while not stop.is_set():
            next_at = time.perf_counter() + (1 / rate if rate > 0 else 0)
            try:
                r = c.post(url + "/v1/completions", content=prompt, headers={"Content-Type": "application/json"})
                key = str(r.status_code)
            except httpx.HTTPError as e:  # the server may close before the whole body is sent (after its 413)
                key = type(e).__name__
            statuses[key] = statuses.get(key, 0) + 1
            time.sleep(max(0.0, next_at - time.perf_counter()))
    results.put(statuses)


def phase(url: str, seconds: float, attackers: int, prompt: bytes, rate: float) -> dict:
    stop = threading.Event()
    health, gaps, statuses = [], [], {}
    tokens = [0]

    def poll():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t = time.perf_counter()
                c.get(url + "/health").raise_for_status()
                health.append(time.perf_counter() - t)
                time.sleep(0.02)

    def stream():
        body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "seed": 0,
                "temperature": 0.05}
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                last = None
                with c.stream("POST", url + "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                        choices = json.loads(line[len("data: "):])["choices"]
                        tokens[0] += sum(len(c.get("token_ids") or []) for c in choices)
                        if stop.is_set():
                            break

    # attackers are processes, so their own work (building and sending 10 MB) does not take the server's GIL
    ctx = multiprocessing.get_context("spawn")
    attack_stop, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=attack, args=(url, prompt, rate, attack_stop, results)) for _ in range(attackers)]
    for proc in procs:
        proc.start()
    threads = [threading.Thread(target=f) for f in (poll, stream)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    attack_stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for proc in procs:
        for key, n in results.get(timeout=180).items():
            statuses[key] = statuses.get(key, 0) + n
        proc.join()
    return {"health_p50_ms": 1000 * percentile(health, 0.5), "health_p99_ms": 1000 * percentile(health, 0.99),
            "health_max_ms": 1000 * max(health), "health_n": len(health),
            "stream_tokens_per_s": tokens[0] / elapsed, "stream_gap_p50_ms": 1000 * statistics.median(gaps),
            "stream_gap_max_ms": 1000 * max(gaps), "big_prompts": statuses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: a tiny random model)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    p.add_argument("--attackers", type=int, default=1,
                   help="client processes sending 10 MB prompts without pause (default 1)")
    p.add_argument("--prompt-mb", type=float, default=10.0, help="size of each big prompt (default 10)")
    p.add_argument("--rate", type=float, default=5.0,
                   help="big prompts per second per attacker, 0 for no pause (default 5; a flood mostly measures "
                        "the attacker's own CPU on a small machine)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ckpt, tokenizer = load(args.model)
    text = "All work and no play makes Jack a dull boy. " * int(args.prompt_mb * 2**20 / 44)
    prompt = ('{"model": "m", "prompt": "' + text + '", "max_tokens": 8}').encode()
    print(f"big prompt: {len(prompt) / 2**20:.1f} MiB; {args.attackers} attacker(s) at {args.rate:g}/s; "
          f"{args.seconds:g} s per phase")
    rows = []
    for name, limits, attackers in [("baseline", ServerLimits(), 0),
                                    ("10 MB prompts, 4 MiB limit (413)", ServerLimits(), args.attackers),
                                    ("10 MB prompts, 16 MiB limit (400)", ServerLimits(max_request_bytes=16 * 2**20),
                                     args.attackers)]:
        engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=4, max_model_len=512).start()
        srv = ServerThread(build_app(Serving(engine, tokenizer, "m", limits=limits))).start()
        try:
            rows.append((name, phase(srv.url, args.seconds, attackers, prompt, args.rate)))
        finally:
            srv.stop()
            engine.stop()
    print(f"\n{'phase':36s} {'health p50':>10s} {'p99':>8s} {'max':>8s} {'stream tok/s':>12s} {'gap p50':>8s} "
          f"{'gap max':>8s}  big prompts")
    for name, r in rows:
        print(f"{name:36s} {r['health_p50_ms']:8.1f}ms {r['health_p99_ms']:6.1f}ms {r['health_max_ms']:6.1f}ms "
              f"{r['stream_tokens_per_s']:12.1f} {r['stream_gap_p50_ms']:6.1f}ms {r['stream_gap_max_ms']:6.1f}ms  "
              f"{r['big_prompts']}")


if __name__ == "__main__":
    main()
