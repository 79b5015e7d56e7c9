"""`--out` of `dgemma convert` / `dgemma quantize` (checkpoint.save): a directory dgemma did not write is refused, and
replacing an earlier dgemma output removes only the files dgemma wrote there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dgemma.io import checkpoint
from dgemma.io.checkpoint import CheckpointError
from dgemma.cli import main
from dgemma.io.output_dir import MANIFEST
from dgemma.presets import default_generation, preset_config, random_model

CFG = preset_config("tiny", vocab_size=64, canvas_length=8)


def _save(out: Path, **kwargs) -> Path:
    model = random_model(CFG, std=0.05, seed=kwargs.pop("seed", 0))
    return checkpoint.save(out, model, CFG, default_generation(CFG), **kwargs)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x01\x02")
    (path / "config.json").write_text('{"mine": true}')  # a name dgemma also writes: still the user's
    return path


def _one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert all(n in err[0] for n in needles), err
    return err[0]


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_out_holding_user_files_is_refused_and_left_alone(command, tiny_checkpoint, tmp_path, capsys):
    out = _user_dir(tmp_path / "work")
    before = _tree(tmp_path)
    assert main([command, "--model", str(tiny_checkpoint), "--out", str(out)]) == 2
    _one_error_line(capsys, str(out), "not a dgemma output")
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no temporary left beside it


def test_out_dot_does_not_wipe_the_working_directory(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    work = _user_dir(tmp_path / "work")
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    assert main(["convert", "--model", str(tiny_checkpoint), "--out", "."]) == 2
    _one_error_line(capsys, "not a dgemma output")
    assert _tree(tmp_path) == before


def test_out_that_is_a_file_is_refused(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "model"
    out.write_text("a file")
    assert main(["convert", "--model", str(tiny_checkpoint), "--out", str(out)]) == 2
    _one_error_line(capsys, "not a directory")
    assert out.read_text() == "a file"


def test_empty_directory_is_used(tmp_path, monkeypatch):
    out = tmp_path / "empty"
    out.mkdir()
    _save(out)
    assert checkpoint.load(out, quiet=True).model is not None
    monkeypatch.chdir(out)  # `--out .` in an empty directory works too
    _save(Path("."), seed=1)
    assert (out / "model.safetensors").is_file() and not [p for p in out.iterdir() if p.name.startswith(".dgemma-s")]


def test_replacing_a_dgemma_output_keeps_the_users_files(tmp_path):
    """Sharded, then single-file: the old shards and index go, the user's files stay, the new model loads."""
    out = tmp_path / "m"
    _save(out, max_shard_bytes=100_000)
    first = set(json.loads((out / MANIFEST).read_text())["files"])
    assert "model.safetensors.index.json" in first and len([f for f in first if f.startswith("model-")]) > 1
    (out / "README.md").write_text("what I trained")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    _save(out, seed=1)
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", MANIFEST, "README.md", "eval"}
    assert (out / "README.md").read_text() == "what I trained" and (out / "eval" / "scores.json").read_text() == "{}"
    expected = random_model(CFG, std=0.05, seed=1).state_dict()
    loaded = checkpoint.load(out, quiet=True).model.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_a_user_file_named_like_a_new_output_file_is_not_overwritten(tmp_path):
    shard = sorted(p.name for p in _save(tmp_path / "probe", max_shard_bytes=100_000).glob("model-*"))[-1]
    out = tmp_path / "m"
    _save(out)  # single file
    (out / shard).write_bytes(b"mine")
    before = _tree(out)
    with pytest.raises(CheckpointError, match=shard):
        _save(out, max_shard_bytes=100_000)  # would write a shard with that name
    assert _tree(out) == before and not [p for p in out.iterdir() if p.name.startswith(".dgemma-s")]


def test_failed_save_leaves_the_previous_output_whole(tmp_path, monkeypatch):
    out = tmp_path / "m"
    _save(out)
    (out / "notes.txt").write_text("keep")
    before = _tree(out)
    import dgemma.io.checkpoint as ck

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        _save(out, seed=1)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_interrupted_replacement_is_finished_by_the_next_save(tmp_path, monkeypatch):
    """Killed while moving files in: the directory still names every dgemma file, so the next save cleans up."""
    out = tmp_path / "m"
    _save(out, max_shard_bytes=100_000)
    (out / "notes.txt").write_text("keep")
    real_replace, calls = os.replace, []

    def dies_after_two(src, dst):
        calls.append(dst)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        _save(out, seed=1)
    monkeypatch.setattr(os, "replace", real_replace)
    _save(out, seed=2)
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors", MANIFEST,
                                               "notes.txt"}
    assert (out / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("files", [["../outside.txt"], ["/etc/passwd"], "config.json", [".."], [3]])
def test_a_tampered_manifest_deletes_nothing(files, tmp_path):
    out = tmp_path / "m"
    _save(out)
    (tmp_path / "outside.txt").write_text("keep")
    (out / MANIFEST).write_text(json.dumps({"written_by": "dgemma", "files": files}))
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError, match="manifest"):
        _save(out, seed=1)
    assert _tree(tmp_path) == before


def test_convert_twice_into_the_same_out(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["convert", "--model", str(tiny_checkpoint), "--out", str(out), "--dtype", "bfloat16"]) == 0
    (out / "notes.txt").write_text("keep")
    assert main(["convert", "--model", str(tiny_checkpoint), "--out", str(out), "--dtype", "float32"]) == 0
    assert (out / "notes.txt").read_text() == "keep"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.decoder.norm.weight").dtype == torch.float32
    capsys.readouterr()
    assert main(["convert", "--model", str(out), "--out", str(out)]) == 2
    _one_error_line(capsys, "--out must differ from --model")


def test_training_refuses_an_out_model_it_did_not_write_before_training(tmp_path):
    from dgemma.train.data import ShuffledExamples
    from dgemma.train.batch import Example
    from dgemma.train.trainer import TrainConfig, Trainer

    model_dir = _user_dir(tmp_path / "run" / "model")
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError, match="not a dgemma output"):
        Trainer(random_model(CFG).train(), CFG, default_generation(CFG), TrainConfig(steps=1, batch_size=1),
                ShuffledExamples([Example([2, 5], [6])]), tmp_path / "run", quiet=True)
    assert _tree(tmp_path) == before and model_dir.is_dir()
