"""`dgemma bench-serve`: N concurrent streaming clients against an OpenAI-compatible dgemma server.

By default it starts a server in a child process on 127.0.0.1 with a random-weight preset model (offline, no tokenizer:
prompts are random token ids sent to /v1/completions); --url targets a running server instead. For each
concurrency level it runs twice, streaming with the settled prefix pinned and streamed (`settled_prefix: true`)
and without it (text then arrives one committed canvas at a time), and prints aggregate throughput, TTFT p50/p95
and latency p50/p95. Each run is bounded by --requests and --time-limit.

    dgemma bench-serve --preset tiny --concurrency 1 4 --requests 8
    dgemma bench-serve --url http://127.0.0.1:8000 --model NAME

A random model is noise: at the checkpoint temperature it is never confident, so nothing settles before the canvas
ends. The defaults (weights std 0.1, temperature 0.05) make this random model settle prefixes mid-canvas, as a
trained model does; the settings are printed with the results.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass

from dgemma.bench.serve_workloads import add_workload_arguments
from dgemma.cli_common import add_threads_arg


@dataclass
class Sample:
    ttft: float | None
    latency: float
    tokens: int
    steps: int


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


async def one_request(client, url: str, body: dict) -> Sample:
    t0 = time.perf_counter()
    ttft, tokens, steps = None, 0, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            if obj.get("usage"):
                tokens, steps = obj["usage"]["completion_tokens"], obj["usage"].get("denoising_steps", 0)
            if ttft is None and any(c.get("token_ids") or c.get("text") for c in obj["choices"]):
                ttft = time.perf_counter() - t0
    return Sample(ttft, time.perf_counter() - t0, tokens, steps)


async def run_level(url: str, headers: dict, bodies: list[dict], concurrency: int, time_limit: float):
    import asyncio

    import httpx

    jobs = list(bodies)
    samples: list[Sample] = []
    deadline = time.perf_counter() + time_limit

    async def worker(client) -> None:
        while jobs and time.perf_counter() < deadline:
            samples.append(await one_request(client, url, jobs.pop(0)))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=max(60.0, time_limit), headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return samples, time.perf_counter() - t0


def start_local_server(args):
    import torch

    from dgemma.engine import Engine
    from dgemma.presets import default_generation, preset_config, random_model
    from dgemma.server import ServerThread, Serving, build_app

    from dgemma.cli_common import apply_threads

    apply_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cfg = preset_config(args.preset)
    model = random_model(cfg, std=args.std, seed=0, device=device, dtype=dtype)
    gen = default_generation(cfg)
    if args.max_denoising_steps:
        gen = gen.replace(max_denoising_steps=args.max_denoising_steps)
    engine = Engine(model, gen, None, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                    kv_cache_gib=args.kv_cache_gib, prefix_caching=not args.no_prefix_caching).start()
    server = ServerThread(build_app(Serving(engine, None, args.preset))).start()
    info = (f"preset {args.preset} (random weights, std {args.std}), canvas {cfg.canvas_length}, vocab "
            f"{cfg.text.vocab_size}, {device} {str(dtype).replace('torch.', '')}, threads {torch.get_num_threads()}, "
            f"max_num_seqs {args.max_num_seqs}, max_denoising_steps {gen.max_denoising_steps}")
    return server, engine, args.preset, cfg.text.vocab_size, info


def _server_process(args, conn) -> None:
    """Child process: start the server, send its address, answer each "step_times" with the engine's step records
    (Engine.step_times), and serve until the parent closes the pipe."""
    from dgemma.runtime import tune_malloc

    tune_malloc()  # as `dgemma serve` does
    server, engine, model, vocab, info = start_local_server(args)
    conn.send((server.url, model, vocab, info))
    try:
        while conn.recv() == "step_times":
            conn.send(list(engine.step_times))
    except EOFError:
        pass
    finally:
        server.stop()
        engine.stop()


class ServerProcess:
    """The in-process server's setup in a child process, so that the benchmark's clients (httpx, JSON) do not
    share the server's interpreter lock, as real clients would not."""

    def __init__(self, args):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_server_process, args=(args, child), daemon=True)
        self.process.start()
        child.close()
        try:
            if not self.conn.poll(300):
                raise EOFError
            self.url, self.model, self.vocab, self.info = self.conn.recv()
        except EOFError:
            self.stop()
            raise RuntimeError("the server process did not start (its traceback, if any, is above)") from None

    def step_times(self) -> list:
        """The server engine's records of its recent steps (engine.StepTime), oldest first."""
        self.conn.send("step_times")
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.close()
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def cmd_bench_serve(args) -> int:
    import asyncio  # here, not at the top: `dgemma --help` registers this parser

    if args.workload != "concurrency":
        from dgemma.bench import serve_workloads

        {"shared-prefix": serve_workloads.shared_prefix, "long-prompt": serve_workloads.long_prompt}[args.workload](args)
        return 0

    server = engine = child = None
    if args.url:
        url, model, vocab = args.url.rstrip("/"), args.model, args.vocab_size
        if not model:
            import httpx

            from dgemma.cli_common import CLIError

            try:
                model = httpx.get(url + "/v1/models", headers=_headers(args), timeout=10).json()["data"][0]["id"]
            except httpx.HTTPError as e:  # nothing listening there, or not an HTTP server
                raise CLIError(f"--url {url}: {e}") from None
        info = f"server {url}, model {model}"
    elif args.server == "process":
        child = ServerProcess(args)
        url, model, vocab, info = child.url, child.model, child.vocab, child.info + ", server in its own process"
    else:
        server, engine, model, vocab, info = start_local_server(args)
        url = server.url
        info += ", server in the clients' process"
    try:
        print(f"# {info}")
        print(f"# {args.requests} requests per run (time limit {args.time_limit:.0f} s), prompt {args.prompt_len} "
              f"token ids, max_tokens {args.max_tokens}, temperature {args.temperature}, streaming")
        print(f"{'concurrency':>11} {'settled prefix':>14} {'requests':>8} {'tokens/s':>9} {'TTFT p50':>9} "
              f"{'TTFT p95':>9} {'lat p50':>8} {'lat p95':>8} {'steps/req':>9}")
        for concurrency in args.concurrency:
            for settled in (True, False):
                def body(i: int) -> dict:
                    rng = random.Random(i)  # the same prompts with and without the settled prefix
                    return {"model": model, "prompt": [rng.randrange(3, vocab) for _ in range(args.prompt_len)],
                            "max_tokens": args.max_tokens, "seed": i, "temperature": args.temperature,
                            "stream": True, "stream_options": {"include_usage": True}, "settled_prefix": settled}

                # warm-up (allocations, first-call overheads), not counted
                asyncio.run(run_level(url, _headers(args), [body(-1)], 1, args.time_limit))
                samples, wall = asyncio.run(run_level(url, _headers(args), [body(i) for i in range(args.requests)],
                                                      concurrency, args.time_limit))
                ttfts = [s.ttft for s in samples if s.ttft is not None]
                lats = [s.latency for s in samples]
                tokens = sum(s.tokens for s in samples)
                steps = statistics.mean(s.steps for s in samples) if samples else 0
                print(f"{concurrency:>11} {'on' if settled else 'off':>14} {len(samples):>8} {tokens / wall:>9.1f} "
                      f"{percentile(ttfts, 50):>8.3f}s {percentile(ttfts, 95):>8.3f}s {percentile(lats, 50):>7.3f}s "
                      f"{percentile(lats, 95):>7.3f}s {steps:>9.1f}", flush=True)
    finally:
        if server is not None:
            server.stop()
            engine.stop()
        if child is not None:
            child.stop()
    return 0


def _headers(args) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def add_bench_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench-serve", help="benchmark the server: throughput, TTFT and latency")
    add_arguments(p)
    p.set_defaults(func=cmd_bench_serve)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="benchmark a running server instead of starting one in-process")
    p.add_argument("--model", help="model id (with --url; default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--vocab-size", type=int, default=256, help="prompt ids are drawn below this (with --url)")
    p.add_argument("--preset", default="tiny", help="random-weight preset for the local server")
    p.add_argument("--server", choices=["process", "thread"], default="process",
                   help="run the local server in a child process (default), or on threads of the clients' process")
    p.add_argument("--std", type=float, default=0.1, help="weight std of the random model")
    p.add_argument("--device", default="auto", help="device of the local server (auto: cuda when available)")
    add_threads_arg(p, note="; for the local server")
    p.add_argument("--max-num-seqs", type=int, default=8, help="the local server's --max-num-seqs")
    p.add_argument("--max-model-len", type=int, default=2048, help="the local server's --max-model-len")
    p.add_argument("--max-denoising-steps", type=int, default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="concurrent clients, one run per level")
    p.add_argument("--requests", type=int, default=8, help="requests per run")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per run")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt token ids per request")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--temperature", type=float, default=0.05, help="temperature of each request")
    p.add_argument("--no-prefix-caching", action="store_true", help="the local server's --no-prefix-caching")
    add_workload_arguments(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_serve", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return cmd_bench_serve(p.parse_args(argv))
