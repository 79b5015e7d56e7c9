"""`dgemma serve`: the argument parser, light to import, and the handler that starts the server."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ..cli_common import CLIError, add_model_args, apply_threads, load_runtime


# -- dgemma serve ---------------------------------------------------------------------------------------------------
def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and streaming")
    add_model_args(p, threads_note="; on a small CPU, 1 leaves a core to the HTTP side")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $DGEMMA_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests denoised together (KV-cache rows)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per request, prompt + output (default: min(model limit, 8192))")
    p.add_argument("--max-waiting", type=int, default=None, help="waiting-queue bound (default 8 x max-num-seqs)")
    p.add_argument("--sampler", choices=["fast", "exact"], default="fast",
                   help="fast: one uniform per position (the same distribution); exact: torch.multinomial's draws, "
                        "as generate makes them")
    p.add_argument("--no-settled-prefix", action="store_true",
                   help="do not pin and stream the settled prefix by default (text then streams per canvas)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    import uvicorn

    from ..engine import Engine
    from .app import build_app
    from .serving import Serving

    for name in ("max_num_seqs", "port", "max_model_len", "max_waiting"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "port" else 1):
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {value}")
    apply_threads(args.threads)
    ckpt, tokenizer = load_runtime(args)
    text = ckpt.config.text
    max_model_len = args.max_model_len or min(text.max_position_embeddings, 8192)
    if min(max_model_len, text.max_position_embeddings) <= ckpt.config.canvas_length:
        raise CLIError(f"--max-model-len {max_model_len} leaves no room for a prompt and a "
                       f"{ckpt.config.canvas_length}-token canvas")
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=args.max_num_seqs,
                    max_model_len=max_model_len, max_waiting=args.max_waiting, sampler=args.sampler)
    name = args.served_model_name or ckpt.path.resolve().name
    serving = Serving(engine, tokenizer, name, settled_prefix=not args.no_settled_prefix)
    api_key = args.api_key or os.environ.get("DGEMMA_API_KEY") or None
    app = build_app(serving, api_key)
    print(f"dgemma serve: {name} on {ckpt.model.device}, {args.max_num_seqs} rows x {engine.max_model_len} tokens "
          f"({engine.runner.nbytes() / 2**20:.0f} MiB of cache), http://{args.host}:{args.port}/v1"
          + (", API key required" if api_key else ""), file=sys.stderr)
    engine.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        with contextlib.suppress(Exception):
            engine.stop()
    return 0
