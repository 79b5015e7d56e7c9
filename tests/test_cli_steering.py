"""The CLI's canvas steering: generate --template/--suffix/--prediction/--sampler and dgemma edit, end to end on a
tiny random checkpoint with the byte-level test tokenizer."""

from __future__ import annotations

import json

import pytest

from dgemma.cli import main
from dgemma.testing import write_tiny_checkpoint
from dgemma.text.tokenizer import Tokenizer

C = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli-steer"), canvas_length=C, max_denoising_steps=4)


def run_json(capsys, args):
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_template_pins_the_literal_text_and_fills_the_holes(model_dir, capsys):
    tok = Tokenizer.from_dir(model_dir)
    out = run_json(capsys, ["generate", "--model", str(model_dir), "--prompt", "Person", "--seed", "1", "--json",
                            "--template", "Name: {{5}}, age: {{2}}."])
    ids = out["outputs"][0]["token_ids"]
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    name, age, end = enc("Name: "), enc(", age: "), enc(".")
    assert ids[:len(name)] == name
    assert ids[len(name) + 5: len(name) + 5 + len(age)] == age
    assert ids[len(name) + 5 + len(age) + 2:][:len(end)] == end
    assert out["outputs"][0]["finish_reason"] == "stop"


def test_template_longer_than_a_canvas_spans_canvases(model_dir, capsys):
    out = run_json(capsys, ["generate", "--model", str(model_dir), "--prompt", "x", "--seed", "2", "--json",
                            "--template", "A{{30}}B{{30}}C"])
    assert out["stats"]["canvases"] == 2 and out["outputs"][0]["text"].startswith("A")


def test_suffix_prints_the_middle(model_dir, capsys):
    out = run_json(capsys, ["generate", "--model", str(model_dir), "--prompt", "def f(", "--suffix", "): pass",
                            "--seed", "3", "--json", "--sampler", "fast"])
    assert 1 <= len(out["outputs"][0]["token_ids"]) < 4 * C  # no --max-new-tokens: the middle may span 4 canvases


@pytest.mark.parametrize("args, flag", [
    (["--template", "no holes"], "--template"), (["--template", "a {{0}} b"], "--template"),
    (["--template", "a {{-3}} b"], "--template"), (["--prediction", "x", "--strength", "2"], "--strength"),
    (["--strength", "0.5"], "--strength"), (["--suffix", "x" * 200], "--suffix"),
    (["--suffix", "a", "--template", "b {{2}}"], "--suffix")])
def test_bad_steering_flags_exit_2_naming_the_flag(model_dir, capsys, args, flag):
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert flag in err and err.count("\n") == 1


def test_edit_writes_the_edited_text(model_dir, tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("hello world\n")
    out = tmp_path / "b.txt"
    assert main(["edit", "--model", str(model_dir), "--file", str(src), "--instruction", "shout", "--out", str(out),
                 "--seed", "0", "--strength", "0.0"]) == 0
    assert out.exists() and isinstance(out.read_text(), str)
    assert src.read_text() == "hello world\n"  # the input is never touched
    assert main(["edit", "--model", str(model_dir), "--file", str(src), "--instruction", "x", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["edit", "--model", str(model_dir), "--file", str(tmp_path / "nope"), "--instruction", "x"]) == 2


def test_constraint_flags_give_valid_output(model_dir, tmp_path, capsys):
    import re

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    out = run_json(capsys, ["generate", "--model", str(model_dir), "--prompt", "x", "--seed", "1", "--json",
                            "--max-new-tokens", str(2 * C), "--json-schema", str(tmp_path / "s.json")])
    assert set(json.loads(out["outputs"][0]["text"])) == {"n"}
    out = run_json(capsys, ["generate", "--model", str(model_dir), "--prompt", "x", "--prompt", "yy", "--seed", "2",
                            "--json", "--max-new-tokens", str(C), "--regex", "[0-9]{3}-[a-z]{2}"])
    assert all(re.fullmatch("[0-9]{3}-[a-z]{2}", o["text"]) for o in out["outputs"])
    out = run_json(capsys, ["generate", "--model", str(model_dir), "--prompt", "x", "--seed", "3", "--json",
                            "--max-new-tokens", str(C), "--choice", "left", "--choice", "right"])
    assert out["outputs"][0]["text"] in ("left", "right")
    for bad, flag in ((["--regex", "(x"], "--regex"), (["--json-schema", str(tmp_path / "nope.json")], "--json-schema"),
                      (["--choice", "a", "--regex", "b"], "--regex")):
        assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", str(C), *bad]) == 2
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1


def test_a_constraint_flag_combines_with_a_template_or_a_suffix(model_dir, capsys):
    import re

    out = run_json(capsys, ["generate", "--model", str(model_dir), "--prompt", "x", "--seed", "4", "--json",
                            "--template", "id={{4}};", "--regex", "id=[0-9]{4};"])
    assert re.fullmatch("id=[0-9]{4};", out["outputs"][0]["text"]), out
    out = run_json(capsys, ["generate", "--model", str(model_dir), "--prompt", "x", "--seed", "5", "--json",
                            "--max-new-tokens", str(C), "--suffix", "42", "--regex", "[a-c]{2,4}-[0-9]{2}"])
    assert re.fullmatch("[a-c]{2,4}-", out["outputs"][0]["text"]), out  # the middle
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--template", "id={{3}};",
                 "--regex", "id=[0-9]{4};"]) == 2
    err = capsys.readouterr().err
    assert "--template" in err and err.count("\n") == 1
