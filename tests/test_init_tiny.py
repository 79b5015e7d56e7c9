"""`dgemma init-tiny`: a random text checkpoint with a tokenizer that every command can use, written without a
download."""

from __future__ import annotations

import json

from dgemma.io import checkpoint
from dgemma.cli import main
from dgemma.testing import write_tiny_checkpoint
from dgemma.text.tokenizer import Tokenizer


def test_init_tiny_writes_a_checkpoint_that_loads_chats_and_generates(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["init-tiny", "--out", str(out), "--canvas-length", "8", "--max-denoising-steps", "4"]) == 0
    assert f"dgemma chat --model {out}" in capsys.readouterr().out
    ckpt = checkpoint.load(out, quiet=True)
    assert ckpt.config.canvas_length == 8 and ckpt.generation.max_denoising_steps == 4
    tok = Tokenizer.from_dir(out)
    assert tok is not None and tok.vocab_size <= ckpt.config.text.vocab_size
    assert tok.decode(tok.encode("héllo, wörld", add_special_tokens=False)) == "héllo, wörld"
    assert main(["generate", "--model", str(out), "--chat", "--prompt", "hello", "--max-new-tokens", "16",
                 "--seed", "3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["outputs"][0]
    assert 0 < len(record["token_ids"]) <= 16


def test_the_test_checkpoint_is_what_init_tiny_writes(tmp_path, capsys):
    assert main(["init-tiny", "--out", str(tmp_path / "cli")]) == 0
    made = write_tiny_checkpoint(tmp_path / "lib")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (made / name).read_bytes(), name


def test_init_tiny_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["init-tiny", "--out", str(tmp_path)]) == 2
    assert "not a dgemma output" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert main(["init-tiny", "--out", str(tmp_path / "x"), "--canvas-length", "0"]) == 2
    assert "--canvas-length must be" in capsys.readouterr().err
