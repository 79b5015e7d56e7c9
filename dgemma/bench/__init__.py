"""`dgemma bench`: one workload through dgemma and, with --compare, through transformers' generate or an
autoregressive decode of the same backbone, alternating runs in one process on the same weights.

- probes.py   what the machine can do and what the process holds (matmul peak, copy bandwidth, RSS)
- flops.py    the cost model of a denoising step (FLOPs, bytes moved at least)
- runners.py  one timed generation per engine, and the whole workload (`run_workload`)
- report.py   from timings to the report (`summarize`) and its table (`print_table`)
- cli.py      the parser and the handler

This file imports nothing heavy, so registering the `bench` parser costs no torch import; the names below are
loaded on first use."""

from __future__ import annotations

import importlib

_NAMES = {
    "measure_matmul_peak": "probes", "measure_copy_bandwidth": "probes",
    "decoder_step_flops": "flops", "decoder_step_bytes": "flops",
    "RunResult": "runners", "EngineStats": "runners", "Measurement": "runners", "run_dgemma": "runners",
    "run_transformers": "runners", "run_autoregressive": "runners", "build_model": "runners",
    "load_transformers": "runners", "run_workload": "runners",
    "summarize": "report", "print_table": "report",
    "add_bench_parser": "cli", "cmd_bench": "cli", "main_bench": "cli",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
