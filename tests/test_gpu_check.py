"""benchmarks/gpu_check.py, the prepared GPU run, checked on the CPU: its dry run runs every part at tiny scale
through the same code (subprocesses, bench's JSON, the 26b-a4b sweep per format) and writes the JSON and markdown;
a failing or hanging part is recorded with its reason and the next one still runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def dry_run(tmp_path: Path, *only: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    argv = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), *(["--only", *only] if only else [])]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    return p, report, (tmp_path / "gpu_check.md").read_text()


def test_dry_run_engine_step_and_one_26b_format(tmp_path):
    p, report, md = dry_run(tmp_path, "engine-step", "26b-a4b-int4")
    assert p.returncode == 0, p.stderr[-2000:]
    assert list(report["parts"]) == ["engine-step", "26b-a4b-int4"] and report["failed"] == []
    engine = report["parts"]["engine-step"]["data"]
    assert engine["tokens_equal"] is True and engine["rows"][0]["tokens_equal_generate_eager"] is True
    sweep = report["parts"]["26b-a4b-int4"]["data"]
    assert sweep["format"] == "int4" and [r["workload"]["batch_size"] for r in sweep["runs"]] == [1, 2]
    for run in sweep["runs"]:
        assert run["workload"]["weights"] == "dgemma-int4" or "int4" in run["workload"]["weights"]
        assert run["results"][0]["tokens_per_s"] > 0 and run["results"][0]["ms_per_step"] > 0
    assert "| engine-step | passed |" in md and "| int4 | 2 |" in md


@pytest.mark.slow
def test_dry_run_every_part(tmp_path):
    p, report, md = dry_run(tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    names = ["pytest-gpu", "engine-step", "bench-small", "26b-a4b-fp8", "constrained-step", "bench-medium",
             "26b-a4b-int4", "26b-a4b-nvfp4", "26b-a4b-bf16"]
    assert list(report["parts"]) == names and report["failed"] == []
    bench = report["parts"]["bench-small"]["data"]
    assert {r["engine"] for r in bench["results"]} == {"dgemma", "transformers"}
    for fmt in ("fp8", "int4", "nvfp4", "bf16"):
        assert f"| {fmt} | 1 |" in md
    constrained = report["parts"]["constrained-step"]["data"]["constrained"]["rows"]
    assert [r["constraint"] for r in constrained] == ["JSON object", "24 strings of up to 64"]
    assert all(min(r["ms_with"]) > 0 and r["pairs"] > 0 for r in constrained) and "| cpu | 4096 | JSON object |" in md
    assert md == load().markdown(report)


def test_a_failing_part_is_recorded_and_a_hanging_one_is_killed():
    gc = load()
    env = {"PYTHONPATH": str(ROOT)}
    fails = gc.Part("fails", [sys.executable, "-c", "raise ValueError('no such kernel')"], 30, "bench")
    r = gc.run_part(fails, 30, env)
    assert r["status"] == "failed" and "ValueError: no such kernel" in r["why"]
    silent = gc.Part("silent", [sys.executable, "-c", "print('not json')"], 30, "engine")
    assert gc.run_part(silent, 30, env)["status"] == "failed"  # exit 0 but no report
    hangs = gc.Part("hangs", [sys.executable, "-c", "import time; time.sleep(60)"], 2, "bench")
    r = gc.run_part(hangs, 2, env)
    assert r["status"] == "timeout" and "2 s" in r["why"]
    ok = gc.Part("ok", [sys.executable, "-c", "print('log'); print('{\"a\": 1}')"], 30, "bench")
    assert gc.run_part(ok, 30, env) == {"seconds": pytest.approx(0, abs=30), "returncode": 0, "data": {"a": 1},
                                        "status": "passed"}
