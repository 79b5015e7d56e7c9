"""Hardening, second pass (issue 33): `dgemma train --out` never appends to, rewrites or replaces a file dgemma did
not write (metrics.jsonl, runs.jsonl, loss.png), and resuming keeps every line of the run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgemma.io.checkpoint import CheckpointError
from dgemma.train.run_dir import RUN_MANIFEST, RunDirectory

from .test_train_trainer import _write_jsonl, make_trainer


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["metrics.jsonl", "runs.jsonl", "loss.png", "notes.txt"])
def test_training_refuses_an_out_holding_a_users_file(tmp_path, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b'{"mine": 1}\n')
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError, match="not a dgemma run directory"):
        make_trainer(out, steps=2)
    assert _tree(tmp_path) == before


def test_cli_refuses_a_users_out_in_one_line_before_loading(tmp_path, capsys):
    from dgemma.cli import main
    from dgemma.testing import write_test_tokenizer

    tok = write_test_tokenizer(tmp_path / "tok")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "a b"}] * 4)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"my": "experiment"}\n')
    (out / "loss.png").write_bytes(b"my plot")
    before = _tree(tmp_path)
    for extra in ([], ["--resume"]):
        code = main(["train", "--preset", "tiny", "--tokenizer", str(tok), "--data", str(data), "--out", str(out),
                     "--steps", "1", "--batch-size", "2", "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
    assert _tree(tmp_path) == before


def test_a_users_file_under_a_run_name_in_a_dgemma_run_is_refused(tmp_path):
    """A dgemma run (with its manifest) that did not write loss.png yet: a loss.png the user put there is refused
    before training, and stays."""
    out = tmp_path / "run"
    make_trainer(out, steps=2, save_every=1).train(stop_after=1)
    (out / "loss.png").unlink(missing_ok=True)
    owned = json.loads((out / RUN_MANIFEST).read_text())["files"]
    (out / RUN_MANIFEST).write_text(json.dumps({"written_by": "dgemma", "files": [f for f in owned
                                                                                  if f != "loss.png"]}))
    (out / "loss.png").write_bytes(b"my plot")
    with pytest.raises(CheckpointError, match="did not write it"):
        make_trainer(out, steps=2)
    assert (out / "loss.png").read_bytes() == b"my plot"


def test_resume_keeps_the_users_files_and_every_line_it_owns(tmp_path):
    out = tmp_path / "run"
    first = make_trainer(out, steps=4, save_every=2)
    first.train()
    (out / "notes.txt").write_text("my notes\n")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    again = make_trainer(out, steps=6, save_every=2)
    again.load()
    again.train()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and (out / "metrics.jsonl").read_text().splitlines()[:4] == lines
    assert (out / "notes.txt").read_text() == "my notes\n"


def test_a_fresh_run_replaces_the_metrics_of_a_dgemma_run_that_never_saved(tmp_path):
    out = tmp_path / "run"
    run = RunDirectory.open(out)
    run.append_line("metrics.jsonl", {"step": 1, "loss": 9.0})  # a run killed before its first checkpoint
    make_trainer(out, steps=2, save_every=2).train()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"] != 9.0


def test_a_run_from_before_the_manifest_resumes_and_is_adopted(tmp_path):
    out = tmp_path / "run"
    make_trainer(out, steps=2, save_every=2).train()
    (out / RUN_MANIFEST).unlink()
    again = make_trainer(out, steps=3, save_every=1)
    again.load()
    again.train()
    assert again.step == 3 and "metrics.jsonl" in json.loads((out / RUN_MANIFEST).read_text())["files"]


def test_a_long_line_is_refused_by_its_size_before_it_is_tokenized(tmp_path):
    """A line longer than any text the model can take is refused naming its line, without tokenizing it (the
    tokenizer is wrapped to count its calls) and without reading the whole line."""
    from dgemma.testing import write_test_tokenizer
    from dgemma.text.tokenizer import Tokenizer
    from dgemma.train.data import DataError, read_jsonl

    tok = Tokenizer.from_dir(write_test_tokenizer(tmp_path / "tok"))
    calls = []
    encode = tok.encode
    tok.encode = lambda text, *a, **k: calls.append(len(text)) or encode(text, *a, **k)
    limit = 64 * tok.max_token_bytes  # bytes of text 64 positions can hold
    ok = json.dumps({"prompt": "q", "response": "a b"})
    cases = {
        "text": json.dumps({"prompt": "q", "response": "x" * (limit + 1)}),  # the line fits, the text does not
        "line": json.dumps({"prompt": "q", "response": "x" * (6 * limit + 70_000)}),  # past the line bound
        "escapes": json.dumps({"prompt": "q", "response": "\u0001" * (limit + 1)}),  # 6 bytes a character
    }
    for name, long in cases.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("\n".join([ok, ok, long, ok]) + "\n")
        calls.clear()
        with pytest.raises(DataError) as info:
            read_jsonl(data, tok, "raw", max_length=64, canvas_length=8)
        message = str(info.value)
        assert message.startswith(f"{data}:3: ") and "\n" not in message, message
        assert all(n < 10 for n in calls), (name, calls)  # only the short lines were tokenized
    fits = tmp_path / "fits.jsonl"
    fits.write_text("\n".join([ok, json.dumps({"prompt": "q", "response": "x" * 40})]) + "\n")
    assert len(read_jsonl(fits, tok, "raw", max_length=64, canvas_length=8)) == 2
