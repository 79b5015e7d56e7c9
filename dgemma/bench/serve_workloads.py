"""`dgemma bench-serve --workload shared-prefix | long-prompt`: the paged KV cache's workloads, against local servers
started as bench-serve starts them (random-weight preset, a child process each).

shared-prefix:
  - time to first token of a request whose 2,000-token prefix (--prefix-len) an earlier request sent, against the
    earlier (cold) one, for --requests pairs of distinct prefixes, one request at a time;
  - --chats concurrent chats sharing a --system-len system prompt, each with its own question, with the prefix cache
    and without it (a server with --no-prefix-caching): throughput, and the peak KV memory the blocks took
    against the preallocated rows (max_num_seqs x max_model_len) they replace.
long-prompt:
  - --chats streams running when a --long-len prompt arrives, against the same streams alone: their seconds per
    denoising step (latency / steps), and the long prompt's time to first token;
  - the wall time of single engine steps (the server's Engine.step_times, read over the child process's pipe),
    p50/p99/max: alone, the steps that denoised the streams and encoded no prompt; with the long prompt, the steps
    that denoised them while encoding its chunks (begun after it was sent: time.monotonic is one clock for both
    processes on Linux).
The ratios compare runs of one invocation (the same machine and load).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import re
import statistics
import time


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=["concurrency", "shared-prefix", "long-prompt"], default="concurrency",
                   help="concurrency: the levels of --concurrency (default); shared-prefix and long-prompt: the "
                        "paged KV cache's workloads (see dgemma/bench/serve_workloads.py)")
    p.add_argument("--prefix-len", type=int, default=2000, help="shared-prefix: the prefix a second request reuses")
    p.add_argument("--system-len", type=int, default=1000, help="shared-prefix: the chats' shared system prompt")
    p.add_argument("--chats", type=int, default=16, help="concurrent chats (shared-prefix; long-prompt: streams)")
    p.add_argument("--long-len", type=int, default=8000, help="long-prompt: the long prompt's tokens")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="the local server's --kv-cache-gib")


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def _body(model: str, prompt: list[int], args, seed: int, max_tokens: int | None = None) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens or args.max_tokens, "seed": seed,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}


def _metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _server(args, **overrides):
    from .serve import ServerProcess

    a = copy.copy(args)
    for k, v in overrides.items():
        setattr(a, k, v)
    return ServerProcess(a)


def _run(url: str, bodies: list[dict], concurrency: int, args):
    from .serve import run_level

    return asyncio.run(run_level(url, {}, bodies, concurrency, args.time_limit))


def shared_prefix(args) -> None:
    from .serve import percentile
    from ..paged_cache import bytes_per_block
    from ..presets import preset_config

    server = _server(args, no_prefix_caching=False)
    try:
        url, model, vocab = server.url, server.model, server.vocab
        print(f"# {server.info}")
        _run(url, [_body(model, _ids(random.Random("warm-up"), 64, vocab), args, 0)], 1, args)  # warm-up
        cold, warm = [], []
        for i in range(args.requests):
            rng = random.Random(i)
            prefix = _ids(rng, args.prefix_len, vocab)
            split = {}
            for out, seed in ((cold, 1), (warm, 2)):
                since = time.monotonic()
                (s,), _ = _run(url, [_body(model, prefix + _ids(rng, 16, vocab), args, seed)], 1, args)
                out.append(s.ttft)
                split[seed] = _engine_time(server, since)
                print(f"  {'cold' if seed == 1 else 'warm'}: TTFT {s.ttft:.3f}s; {_describe(split[seed])}", flush=True)
            (pc, dc, *_), (pw, dw, *_) = split[1], split[2]
            print(f"  engine time cold / warm {(pc + dc) / (pw + dw):.2f}x; the prefill alone {pc / pw:.1f}x; "
                  f"with a free warm prefill at most {(pc + dc) / dw:.2f}x")
        print(f"TTFT with a {args.prefix_len}-token prefix: cold p50 {percentile(cold, 50):.3f}s, "
              f"warm p50 {percentile(warm, 50):.3f}s: {percentile(cold, 50) / percentile(warm, 50):.1f}x sooner "
              f"({args.requests} pairs)")
    finally:
        server.stop()
    cfg = preset_config(args.preset)
    rows = args.max_num_seqs * args.max_model_len * bytes_per_block(cfg.text, 1, _dtype(args))
    per_block = bytes_per_block(cfg.text, 16, _dtype(args))
    rates, split = {}, {}
    for caching in (True, False):
        server = _server(args, no_prefix_caching=not caching)
        try:
            rng = random.Random(7)
            system = _ids(rng, args.system_len, server.vocab)
            bodies = [_body(server.model, system + _ids(rng, 24, server.vocab), args, i) for i in range(args.chats)]
            _run(server.url, [_body(server.model, system + [5], args, 99)], 1, args)  # warm-up; caches the system
            since = time.monotonic()
            samples, wall = _run(server.url, bodies, args.chats, args)
            split[caching] = _engine_time(server, since)
            rates[caching] = sum(s.tokens for s in samples) / wall
            peak = _metric(server.url, "dgemma_kv_blocks_peak") * per_block
            print(f"{args.chats} chats, {args.system_len}-token system prompt, prefix cache "
                  f"{'on' if caching else 'off'}: {rates[caching]:.1f} tokens/s, {len(samples)} done in {wall:.1f}s, "
                  f"TTFT p50 {percentile([s.ttft for s in samples if s.ttft], 50):.2f}s; peak KV "
                  f"{peak / 2**20:.1f} MiB vs {rows / 2**20:.1f} MiB of preallocated rows")
            print(f"  {_describe(split[caching])}", flush=True)
        finally:
            server.stop()
    print(f"throughput with the prefix cache / without: {rates[True] / rates[False]:.2f}x")
    (p_on, d_on, *_), (p_off, d_off, *_) = split[True], split[False]
    print(f"engine time without / with the cache {(p_off + d_off) / (p_on + d_on):.2f}x; with a free prefill at most "
          f"{(p_off + d_off) / d_on:.2f}x")


def _engine_time(server, since: float) -> tuple[float, float, int, int, float]:
    """The server engine's steps begun after `since` (time.monotonic): seconds encoding prompts, seconds denoising
    (the rest of each step: decoder passes, commits, streaming), prompt tokens encoded, decoder passes, and the
    seconds from `since` to the end of the last step."""
    steps = [t for t in server.step_times() if t.start >= since]
    end = max((t.start + t.seconds for t in steps), default=since)
    return (sum(t.prefill_seconds for t in steps), sum(t.seconds - t.prefill_seconds for t in steps),
            sum(t.prefill_tokens for t in steps), sum(1 for t in steps if t.rows), end - since)


def _describe(split: tuple[float, float, int, int, float]) -> str:
    prefill, denoise, tokens, passes, span = split
    return (f"engine: prefill {prefill:.2f}s ({tokens} tokens), denoising {denoise:.2f}s ({passes} decoder passes), "
            f"outside the steps {span - prefill - denoise:.2f}s until the last one ended")


def long_prompt(args) -> None:
    server = _server(args)
    step_p99 = {}
    try:
        url, model, vocab = server.url, server.model, server.vocab
        print(f"# {server.info}")
        _run(url, [_body(model, _ids(random.Random("warm-up"), 64, vocab), args, 0)], 1, args)  # warm-up
        for with_long in (False, True):
            rng = random.Random(3 if with_long else 4)
            streams = [_body(model, _ids(rng, args.prompt_len, vocab), args, i) for i in range(args.chats)]
            results = {}

            async def both():
                from .serve import run_level

                tasks = [run_level(url, {}, streams, args.chats, args.time_limit)]
                if with_long:
                    async def late():
                        await asyncio.sleep(1.0)  # the streams are running
                        return await run_level(url, {}, [_body(model, _ids(rng, args.long_len, vocab), args, 77,
                                                                max_tokens=16)], 1, args.time_limit)
                    tasks.append(late())
                results["out"] = await asyncio.gather(*tasks)

            t0, sent = time.perf_counter(), time.monotonic()
            asyncio.run(both())
            (samples, _), *long = results["out"]
            per_step = [s.latency / s.steps for s in samples if s.steps]
            line = (f"{args.chats} streams{' + a ' + str(args.long_len) + '-token prompt' if with_long else ' alone'}:"
                    f" {statistics.mean(per_step) * 1000:.0f} ms per step (mean), max {max(per_step) * 1000:.0f} ms")
            if long:
                line += f"; the long prompt's TTFT {long[0][0][0].ttft:.2f}s"
            print(line + f" ({time.perf_counter() - t0:.1f}s)", flush=True)
            step_p99[with_long] = _step_spread(server.step_times(), sent + (1.0 if with_long else 0.0), with_long)
    finally:
        server.stop()
    print(f"p99 engine step while the long prompt is encoded / alone: {step_p99[True] / step_p99[False]:.2f}x")


def _step_spread(records: list, since: float, with_long: bool) -> float:
    """Print the spread of the engine steps begun after `since` that denoised the streams: alone, those that encoded
    no prompt; with the long prompt, those that encoded its chunks, and the same steps less the seconds of their
    chunks (a within-step comparison that the machine's load over minutes does not skew). -> their p99."""
    from .serve import percentile

    steps = [t for t in records if t.start >= since and t.rows and (t.prefill_tokens > 0) == with_long]
    seconds = [t.seconds for t in steps]
    commits = [t.commit_seconds for t in steps if t.commit_seconds]
    print(f"  engine steps {'encoding the long prompt' if with_long else 'encoding no prompt'}: {_spread(seconds)}; "
          f"prompt chunks p50 {percentile([t.prefill_seconds for t in steps], 50) * 1000:.0f} ms; canvas commits in "
          f"{len(commits)} of them, p50 {percentile(commits, 50) * 1000:.0f} ms")
    if with_long:
        rest = [t.seconds - t.prefill_seconds for t in steps]
        print(f"  the same steps less their prompt chunks: {_spread(rest)}; p99 with / without the chunks "
              f"{percentile(seconds, 99) / percentile(rest, 99):.2f}x", flush=True)
    return percentile(seconds, 99)


def _spread(seconds: list[float]) -> str:
    """p50, p99 and max of step times, and how many."""
    from .serve import percentile

    return (f"p50 {percentile(seconds, 50) * 1000:.0f} ms, p99 {percentile(seconds, 99) * 1000:.0f} ms, "
            f"max {max(seconds, default=float('nan')) * 1000:.0f} ms ({len(seconds)} steps)")


def _dtype(args):
    import torch

    return torch.float32 if args.device in ("auto", "cpu") and not torch.cuda.is_available() else torch.bfloat16
