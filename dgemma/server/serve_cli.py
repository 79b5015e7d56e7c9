"""`dgemma serve`: the argument parser, light to import, and the handler that starts the server."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


# -- dgemma serve ---------------------------------------------------------------------------------------------------
def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_model_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and streaming")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set DGEMMA_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests denoised together (KV-cache rows)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per request, prompt + output (default: min(model limit, 8192))")
    p.add_argument("--max-waiting", type=int, default=None, help="waiting-queue bound (default 8 x max-num-seqs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; on a small CPU 1 leaves a core to the HTTP side (default: torch's)")
    p.add_argument("--no-settled-prefix", action="store_true",
                   help="do not pin and stream the settled prefix by default (text then streams per canvas)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    import torch
    import uvicorn

    from ..cli import CLIError, load_runtime
    from ..engine import Engine
    from .app import build_app
    from .serving import Serving

    for name in ("max_num_seqs", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise CLIError(f"--{name.replace('_', '-')} must be positive")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError("--threads must be positive")
        torch.set_num_threads(args.threads)
    ckpt, tokenizer = load_runtime(args)
    text = ckpt.config.text
    max_model_len = args.max_model_len or min(text.max_position_embeddings, 8192)
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=args.max_num_seqs,
                    max_model_len=max_model_len, max_waiting=args.max_waiting)
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
