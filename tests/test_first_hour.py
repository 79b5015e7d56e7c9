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


def test_sudoku_puzzle_mistakes_are_named_before_torch_loads():
    import subprocess
    import sys

    code = ("import sys; from dgemma.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules)")
    cases = {"55" + "0" * 79: "two 5s in row 1, at row 1 column 1 and row 1 column 2",
             "5" + "0" * 8 + "5" + "0" * 71: "two 5s in column 1, at row 1 column 1 and row 2 column 1",
             "5" + "0" * 9 + "5" + "0" * 70: "two 5s in box 1",
             "5x" + "0" * 79: "unexpected character 'x'"}
    for puzzle, words in cases.items():
        proc = subprocess.run([sys.executable, "-c", code, "sudoku", "solve", puzzle], capture_output=True, text=True,
                              timeout=120)
        assert proc.stdout.split() == ["2", "False"], proc.stderr  # refused, and torch never imported
        assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_too_few_givens_warn_and_still_solve(capsys):
    assert main(["sudoku", "solve", "0" * 81, "--tries", "1"]) in (0, 1)
    err = capsys.readouterr().err
    assert "warning: 0 givens; a Sudoku needs at least 17" in err


def test_a_default_of_zero_is_shown_in_help(capsys):
    try:
        main(["sudoku", "solve", "--help"])
    except SystemExit:
        pass
    assert "(default: 0)" in " ".join(capsys.readouterr().out.split())
