"""`dgemma serve`: the argument parser, light to import, and the handler that starts the server."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from pathlib import Path

from ..cli_common import CLIError, add_model_args, apply_threads, load_runtime
from .limits import COMPILE_FLAGS, FLAGS, CompileSettings, ServerLimits

LOOPBACK = ("127.0.0.1", "::1", "localhost")


# -- dgemma serve ---------------------------------------------------------------------------------------------------
def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and streaming")
    add_model_args(p, threads_note="; on a small CPU, 1 leaves a core to the HTTP side")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics (visible in ps: prefer "
                        "$DGEMMA_API_KEY or --api-key-file; default: $DGEMMA_API_KEY, else no key)")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated host names clients may use besides IP addresses and localhost (a guard "
                        "against DNS rebinding; '*' allows any)")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests denoised together (KV-cache rows)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per request, prompt + output (default: min(model limit, 8192))")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="memory for the paged KV cache, shared by all requests and the prefix cache (default: "
                        "max-num-seqs x max-model-len tokens, at most half the memory free at start)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of earlier prompts (each prompt is encoded whole)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="run the decoder pass in buckets of static buffers (rows and context length rounded up), "
                        "captured and replayed as CUDA graphs on a GPU (bf16, not int4 experts); off by default "
                        "until a GPU run shows it gives the eager tokens. On a CPU it runs the same buckets "
                        "without capture, which only costs time")
    p.add_argument("--prefill-budget", type=int, default=512,
                   help="prompt tokens encoded per engine step, between the running requests' denoising steps "
                        "(default 512)")
    p.add_argument("--max-waiting", type=int, default=None, help="waiting-queue bound (default 8 x max-num-seqs)")
    p.add_argument("--sampler", choices=["fast", "exact"], default="fast",
                   help="fast: one uniform per position (the same distribution); exact: torch.multinomial's draws, "
                        "as generate makes them")
    p.add_argument("--allowed-local-media", metavar="DIR", default=None,
                   help="let image_url parts name image files inside DIR (default: only data: URLs)")
    p.add_argument("--max-images-per-request", type=int, default=8,
                   help="images in one chat request (more is refused with 400 before any is decoded)")
    p.add_argument("--no-settled-prefix", action="store_true",
                   help="do not pin and stream the settled prefix by default (text then streams per canvas)")
    for flags, settings in ((FLAGS, ServerLimits), (COMPILE_FLAGS, CompileSettings)):
        for name, what in flags.items():
            default = getattr(settings, name)
            p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                           help=f"{what} (default {default})")
    p.set_defaults(func=cmd_serve)
    return p


def api_key(args) -> str | None:
    """--api-key, else --api-key-file's first line, else $DGEMMA_API_KEY, else None."""
    if args.api_key and args.api_key_file:
        raise CLIError("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        try:
            lines = open(args.api_key_file, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--api-key-file: cannot read {args.api_key_file} ({e.__class__.__name__})") from None
        if not lines or not lines[0].strip():
            raise CLIError(f"--api-key-file: {args.api_key_file} is empty")
        return lines[0].strip()
    return args.api_key or os.environ.get("DGEMMA_API_KEY") or None


def cmd_serve(args) -> int:
    import uvicorn

    from ..engine import Engine
    from ..images import ImageSupport
    from ..control.gate import COMPILES
    from .app import build_app
    from .guard import uvicorn_config
    from .serving import Serving

    for name in ("max_num_seqs", "port", "max_model_len", "max_waiting", "prefill_budget"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "port" else 1):
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {value}")
    limits = ServerLimits(**{name: getattr(args, name) for name in FLAGS})
    compiles = CompileSettings(**{name: getattr(args, name) for name in COMPILE_FLAGS})
    if args.max_images_per_request < 0:
        raise CLIError(f"--max-images-per-request must be 0 or more, got {args.max_images_per_request}")
    media_dir = None
    if args.allowed_local_media is not None:
        media_dir = Path(args.allowed_local_media)
        if not media_dir.is_dir():
            raise CLIError(f"--allowed-local-media: {media_dir} is not a directory")
    key = api_key(args)
    allowed_hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None
    apply_threads(args.threads)
    if args.kv_cache_gib is not None and not args.kv_cache_gib > 0:
        raise CLIError(f"--kv-cache-gib must be positive, got {args.kv_cache_gib}")
    ckpt, tokenizer = load_runtime(args)
    text = ckpt.config.text
    max_model_len = args.max_model_len or min(text.max_position_embeddings, 8192)
    if min(max_model_len, text.max_position_embeddings) <= ckpt.config.canvas_length:
        raise CLIError(f"--max-model-len {max_model_len} leaves no room for a prompt and a "
                       f"{ckpt.config.canvas_length}-token canvas")
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=args.max_num_seqs,
                    max_model_len=max_model_len, max_waiting=args.max_waiting, sampler=args.sampler,
                    kv_cache_gib=args.kv_cache_gib, prefill_budget=args.prefill_budget,
                    prefix_caching=not args.no_prefix_caching, cuda_graphs=args.cuda_graphs)
    name = args.served_model_name or ckpt.path.resolve().name
    images = ImageSupport.of(ckpt) if ckpt.no_images_reason is None else None
    if ckpt.vision is not None and images is None:  # a tower whose image token ids cannot be used
        print(f"dgemma serve: text only, images are refused ({ckpt.no_images_reason})", file=sys.stderr)
    serving = Serving(engine, tokenizer, name, settled_prefix=not args.no_settled_prefix, limits=limits,
                      images=images, allowed_media=media_dir, max_images=args.max_images_per_request,
                      compile_limits=compiles.limits())
    COMPILES.configure(**compiles.gate())
    app = build_app(serving, key, allowed_hosts=allowed_hosts, public_metrics=args.public_metrics)
    kv = engine.kv_stats()
    print(f"dgemma serve: {name} on {ckpt.model.device}, {args.max_num_seqs} rows x {engine.max_model_len} tokens, "
          f"KV cache {kv.num_blocks} blocks ({engine.runner.nbytes() / 2**20:.0f} MiB with the rows' state), "
          f"http://{args.host}:{args.port}/v1"
          + (", API key required" if key else "") + f"; playground http://{args.host}:{args.port}/", file=sys.stderr)
    if not key and args.host not in LOOPBACK:
        print(f"WARNING: dgemma serve is listening on {args.host}, beyond this machine, WITHOUT an API key: anyone "
              "who can reach the port can use the model. Set $DGEMMA_API_KEY or --api-key-file.", file=sys.stderr)
    engine.start()
    # JSON-object mode compiles in the background, so the first response_format request does not wait for it
    threading.Thread(target=serving.warm_json_object, name="dgemma-json-mode", daemon=True).start()
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port, limits, log_level="info")).run()
    finally:
        with contextlib.suppress(Exception):
            engine.stop()
    return 0
