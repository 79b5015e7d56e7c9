"""`python -m dgemma.server serve ...` / `bench-serve ...`, usable before the subcommands are registered in cli.py."""

from __future__ import annotations

import argparse
import sys

from ..cli import CLIError
from .app import add_serve_parser


def main(argv: list[str] | None = None) -> int:
    from ..checkpoint import CheckpointError
    from ..config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m dgemma.server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    try:
        from benchmarks.bench_serve import add_bench_serve_parser
    except ImportError:
        pass
    else:
        add_bench_serve_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (CLIError, CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"dgemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
