"""What a new user meets in the first hour: mistakes named in one line before any slow work."""

from __future__ import annotations

import json

from dgemma.cli import main
from dgemma.cli_common import DEFAULT_MODEL


def test_training_the_sudoku_model_on_text_is_refused(tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"prompt": "What is the capital of France?", "response": "Paris, by far."})
                            + "\n" for _ in range(3)))
    assert main(["train", "--model", str(DEFAULT_MODEL), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--warmup-steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "tokens are unknown to this tokenizer" in err and str(data) in err
    assert not (tmp_path / "run" / "model").exists()


def test_default_threads_leave_out_the_cores_others_keep_busy(monkeypatch):
    import os

    from dgemma import cli_common

    monkeypatch.setattr(cli_common, "available_cpus", lambda: 2)
    for load, want in [(0.0, 2), (0.7, 1), (1.2, 1), (20.6, 1)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert cli_common.default_threads() == want, load
    monkeypatch.setattr(cli_common, "available_cpus", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0.0, 0.0))
    assert cli_common.default_threads() == 13


def test_bench_warns_when_its_runs_differ_by_more_than_twice():
    from dgemma.bench.report import spread_warnings

    out = {"results": [{"engine": "dgemma", "run_seconds": [52.0, 1.99, 21.7]},
                       {"engine": "transformers", "run_seconds": [3.0, 4.0, 5.9]}]}
    lines = spread_warnings(out)
    assert len(lines) == 1 and "dgemma's 3 runs took 52.00, 1.99, 21.70 s (26.1x apart)" in lines[0]
