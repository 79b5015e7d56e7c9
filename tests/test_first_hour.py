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
