"""`dgemma sudoku solve | eval` as a person uses them: puzzle notations, stdin, --tries, eval's progress and size."""

from __future__ import annotations

import io
import os
import sys

import pytest

from dgemma.tasks.sudoku_cli import EVAL_PUZZLES, HELDOUT_SIZE, main
from dgemma.tasks.sudoku_puzzles import format_grid, parse_grid, pretty

KNOWN = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
NEWSPAPER = """
5 3 . | . 7 . | . . .
6 . . | 1 9 5 | . . .
. 9 8 | . . . | . 6 .
------+-------+------
8 . . | . 6 . | . . 3
4 . . | 8 . 3 | . . 1
7 . . | . 2 . | . . 6
------+-------+------
. 6 . | . . . | 2 8 .
. . . | 4 1 9 | . . 5
. . . | . 8 . | . 7 9
"""
# seed 0 gets this 32-given puzzle wrong and seed 1 solves it (the shipped model, one thread, givens pinned)
NEEDS_A_SECOND_TRY = "072080000300000050040300700095046200167000000030005600451702090720900000006000327"


def test_parse_grid_reads_the_usual_notations():
    want = [int(c) for c in KNOWN]
    assert parse_grid(KNOWN) == want
    assert parse_grid(KNOWN.replace("0", ".")) == want
    assert parse_grid(NEWSPAPER) == want
    assert parse_grid(pretty(want)) == want
    assert parse_grid("\n".join(KNOWN[9 * r:9 * r + 9] for r in range(9))) == want  # 9 lines, no separators
    boxed = "+-------+-------+-------+\n" + "\n".join(
        "| " + " | ".join(" ".join(KNOWN[9 * r + 3 * b:9 * r + 3 * b + 3]) for b in range(3)) + " |"
        for r in range(9)) + "\n+=======+=======+=======+"
    assert parse_grid(boxed) == want
    with pytest.raises(ValueError, match="81 cells, got 80"):
        parse_grid(KNOWN[:-1])
    with pytest.raises(ValueError, match="unexpected character 'x'"):
        parse_grid(KNOWN[:-1] + "x")
    with pytest.raises(ValueError, match="unexpected character '-'"):
        parse_grid(KNOWN[:40] + "-" + KNOWN[41:])  # a dash inside a row of cells is not a separator line


def _solve(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    code = main(["solve", *argv, "--threads", "1"])
    return code, capsys.readouterr()


def test_solve_reads_a_grid_from_stdin(capsys, monkeypatch):
    from dgemma.tasks.sudoku import heldout_set

    puzzle, solution = heldout_set(1)[0]  # 44 givens: the shipped model solves it at seed 0
    code, out = _solve(capsys, stdin=io.StringIO(pretty(puzzle) + "\n"), monkeypatch=monkeypatch)
    assert code == 0 and "valid solution" in out.out and format_grid(solution) in out.out
    code, out = _solve(capsys, "-", stdin=io.StringIO(format_grid(puzzle).replace("0", ".")), monkeypatch=monkeypatch)
    assert code == 0 and format_grid(solution) in out.out


def test_solve_without_a_puzzle_at_a_terminal_is_a_one_line_error(capsys, monkeypatch):
    master, slave = os.openpty()
    with open(slave) as tty, open(master, "wb"):
        code, out = _solve(capsys, stdin=tty, monkeypatch=monkeypatch)
    assert code == 2 and out.err.count("\n") == 1 and "pipe it in" in out.err


def test_tries_resamples_until_the_checker_accepts(capsys):
    code, out = _solve(capsys, NEEDS_A_SECOND_TRY, "--tries", "1")
    assert code == 1 and "NOT a valid solution" in out.out and "(seed 0)" in out.out
    code, out = _solve(capsys, NEEDS_A_SECOND_TRY)  # four tries by default
    assert code == 0 and "valid solution after" in out.out and "(try 2 of 4, seed 1)" in out.out
    code, out = _solve(capsys, KNOWN, "--tries", "0")
    assert code == 2 and "--tries must be >= 1" in out.err


def test_eval_defaults_are_a_minute_and_say_which_set(capsys):
    from dgemma.cli import build_parser

    p = build_parser()
    assert p.parse_args(["sudoku", "eval"]).puzzles == EVAL_PUZZLES == 200
    assert p.parse_args(["sudoku", "eval", "--full"]).full and HELDOUT_SIZE == 1000
    assert main(["eval", "--puzzles", "4", "--batch-size", "2", "--no-untrained", "--threads", "1"]) == 0
    out = capsys.readouterr()
    assert "4 puzzles (the first 4 of the 1000; --full runs all)" in out.out
    import hashlib

    from dgemma.tasks.sudoku import ASSET_DIR
    sha = hashlib.sha256((ASSET_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert f"model: {ASSET_DIR} (model.safetensors sha256 {sha})" in out.out  # the eval names the file it measured
    assert "default sampler (cap 48)" in out.out and "1 step (cap 1)" in out.out
    assert "12-step cap (cap 12)" in out.out  # the goal's step budget, beside the default's 48
    assert "puzzle/s" in out.err or "s/puzzle" in out.err  # tqdm's bar, on stderr
    assert "solved" not in out.err


def test_eval_takes_a_range_of_givens(capsys):
    """--givens LO-HI: each held-out puzzle draws its givens from the range (a newspaper's 23-36), seeded and
    prefix-stable like the fixed-count sets; a range outside [17, 81] exits 2 in one line."""
    from dgemma.tasks import sudoku as S
    from dgemma.tasks.sudoku_puzzles import count_solutions

    a = S.heldout_set(6, (30, 36))
    assert a == S.heldout_set(6, (30, 36)) and S.heldout_set(3, (30, 36)) == a[:3]
    counts = [81 - p.count(0) for p, _ in a]
    assert all(30 <= c <= 36 for c in counts) and len(set(counts)) > 1
    assert all(count_solutions(p) == 1 for p, _ in a)
    assert main(["eval", "--givens", "30-36", "--puzzles", "2", "--no-untrained", "--threads", "1"]) == 0
    assert "2 puzzles (the first 2 of the 1000; --full runs all) with 30-36 givens (45-51 empty cells)" in \
        capsys.readouterr().out
    for bad in ("10-20", "40-30", "x"):
        assert main(["eval", "--givens", bad]) == 2
        err = capsys.readouterr().err
        assert "--givens" in err and err.count("\n") == 1


def test_hard_set_is_minimal_puzzles_with_at_most_25_givens(capsys):
    """--hard: seeded, prefix-stable minimal puzzles (removing any given allows a second solution), at most 25
    givens; the header reports how many puzzles have each count."""
    from dgemma.tasks import sudoku as S
    from dgemma.tasks.sudoku_puzzles import count_solutions

    a = S.hard_set(4)
    assert a == S.hard_set(4) and S.hard_set(2) == a[:2]
    for puzzle, solution in a:
        assert 81 - puzzle.count(0) <= S.HARD_MAX_GIVENS and count_solutions(puzzle) == 1
        assert all(puzzle[i] == solution[i] for i in range(81) if puzzle[i])
        for i in (i for i in range(81) if puzzle[i]):
            assert count_solutions(puzzle[:i] + [0] + puzzle[i + 1:]) == 2, "a given could be removed"
    assert main(["eval", "--hard", "--puzzles", "2", "--no-untrained", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "hard set: 2 puzzles (the first 2 of the 1000; --full runs all), minimal" in out
    counts = sorted(81 - p.count(0) for p, _ in a[:2])
    assert all(f"{g} givens x{counts.count(g)}" in out for g in set(counts))


def test_validation_puzzles_are_not_the_held_out_ones():
    """Training's periodic evals read a validation set of the same difficulty, never the held-out puzzles."""
    from dgemma.tasks import sudoku as S

    for givens in (44, (23, 36)):
        test, val = S.heldout_set(5, givens), S.heldout_set(5, givens, validation=True)
        assert not {tuple(p) for p, _ in test} & {tuple(p) for p, _ in val}
        assert val == S.heldout_set(5, givens, validation=True)
        lo, hi = (givens, givens) if isinstance(givens, int) else givens
        assert all(lo <= 81 - p.count(0) <= hi for p, _ in val)


def test_train_init_starts_from_a_model(tmp_path):
    """--init continues from a model's weights: the shipped model's first training loss is far below a random
    model's, and its evals are reported per difficulty, ranges included, on the validation set."""
    import json

    from dgemma.tasks.sudoku import ASSET_DIR

    def first_loss(out, *extra):
        assert main(["train", "--out", str(out), "--steps", "1", "--batch-size", "4", "--eval-every", "1",
                     "--eval-puzzles", "1", "--eval-givens", "44,30-36", "--warmup-steps", "1", "--threads", "1",
                     "--device", "cpu", *extra]) == 0
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert {"eval_solve_rate_44", "eval_steps_30-36"} <= set(lines[-1])
        return lines[0]["dec_loss"]

    shipped = first_loss(tmp_path / "init", "--init", str(ASSET_DIR))
    assert shipped < 0.5 < 2.0 < first_loss(tmp_path / "random")
    # a larger --layers grows the model with silent layers: the same first loss, and the run's model is deeper
    assert abs(first_loss(tmp_path / "deeper", "--init", str(ASSET_DIR), "--layers", "8") - shipped) < 1e-4
    assert json.loads((tmp_path / "deeper" / "model" / "config.json").read_text())["text_config"][
        "num_hidden_layers"] == 8
    assert main(["train", "--out", str(tmp_path / "shallower"), "--init", str(ASSET_DIR), "--layers", "4",
                 "--steps", "1", "--threads", "1"]) == 2


def test_every_invocation_of_a_run_is_recorded(tmp_path):
    """runs.jsonl keeps each invocation's starting step, command line and options: a run resumed across several
    invocations keeps its whole configuration beside its checkpoint."""
    import json

    common = ["--out", str(tmp_path), "--batch-size", "2", "--eval-every", "100", "--eval-puzzles", "1", "--warmup-steps", "1",
              "--hidden-size", "48", "--layers", "2", "--threads", "1", "--device", "cpu"]
    assert main(["train", "--steps", "1", "--lr", "0.002", *common]) == 0
    assert main(["train", "--steps", "2", "--lr", "0.002", "--resume", *common]) == 0
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in runs] == [0, 1] and [r["options"]["resume"] for r in runs] == [False, True]
    assert runs[0]["options"]["lr"] == 0.002 and runs[0]["options"]["steps"] == 1 and runs[1]["processes"] == 1
    # resumed at its last step: nothing to train, but the result still carries the validation figures
    assert main(["train", "--steps", "2", "--lr", "0.002", "--resume", *common]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps_this_invocation"] == 0 and any(k.startswith("solve_rate_") for k in result["validation"])


def test_train_refuses_bad_pinning_and_recycling_options(tmp_path, capsys):
    """--pin-givens or --sampled-canvas outside [0, 1] and --self-cond-passes below 1 exit 2 in one line, before any
    run is written."""
    for bad, words in ((["--pin-givens", "1.5"], "--pin-givens"), (["--self-cond-passes", "0"], "self_cond_passes"),
                       (["--sampled-canvas", "-0.1"], "sampled_canvas")):
        out = tmp_path / bad[0].strip("-")
        assert main(["train", "--out", str(out), "--steps", "1", "--threads", "1", *bad]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
        assert not (out / "checkpoint.safetensors").exists()
