"""The training checkpoint keeps the last good state: a corrupted file is refused on resume (sha256 of the state), a
non-finite loss or gradient stops the run naming its step before anything is saved, a new checkpoint replaces the old
one only once it reads back verified, and the loss plot survives NaN and Inf."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from dgemma.io.checkpoint import CheckpointError
from dgemma.errors import DgemmaError
from dgemma.train.plot import finite_points, plot_losses, rate_label
from dgemma.train.run_dir import RUN_MANIFEST
from dgemma.train.trainer import CHECKPOINT, TrainingError

from .test_train_trainer import _write_jsonl, make_trainer


def _data_start(path: Path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _trained(out: Path, steps: int = 2):
    t = make_trainer(out, steps=8, save_every=2)
    t.train(stop_after=steps)
    return t


def test_a_flipped_bit_in_the_tensors_is_refused_on_resume(tmp_path):
    _trained(tmp_path)
    ckpt = tmp_path / CHECKPOINT
    _flip_byte(ckpt, (_data_start(ckpt) + ckpt.stat().st_size) // 2)
    with pytest.raises(CheckpointError) as info:
        make_trainer(tmp_path, steps=8).load()
    msg = str(info.value)
    assert "checksum" in msg and str(ckpt) in msg and "\n" not in msg


def test_an_edited_state_is_refused_on_resume(tmp_path):
    """The JSON half of the state (step, schedule, history) is covered by the checksum too."""
    _trained(tmp_path)
    ckpt = tmp_path / CHECKPOINT
    data = ckpt.read_bytes()
    assert data.count(b'[\\"step\\", 2]') >= 1
    ckpt.write_bytes(data.replace(b'[\\"step\\", 2]', b'[\\"step\\", 7]', 1))
    with pytest.raises(CheckpointError, match="checksum"):
        make_trainer(tmp_path, steps=8).load()


def test_resume_of_a_corrupted_checkpoint_in_the_cli_is_one_line_and_keeps_the_file(tmp_path, capsys):
    from dgemma.cli import main
    from dgemma.testing import write_test_tokenizer

    tok = write_test_tokenizer(tmp_path / "tok")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)])
    out = tmp_path / "run"
    common = ["train", "--preset", "tiny", "--tokenizer", str(tok), "--data", str(data), "--out", str(out), "--quiet",
              "--batch-size", "2", "--save-every", "1", "--device", "cpu"]
    assert main([*common, "--steps", "2"]) == 0
    ckpt = out / CHECKPOINT
    _flip_byte(ckpt, ckpt.stat().st_size - 3)
    corrupted = ckpt.read_bytes()
    capsys.readouterr()
    assert main([*common, "--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error" in x]
    assert len(lines) == 1 and "checksum" in lines[0] and "Traceback" not in err, err
    assert ckpt.read_bytes() == corrupted  # nothing overwritten: the user can still inspect or recover it


def _poison(trainer) -> None:
    with torch.no_grad():
        trainer.model.embed_tokens.weight[5:] = float("nan")


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    t = _trained(tmp_path)
    good = (tmp_path / CHECKPOINT).read_bytes()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    _poison(t)
    with pytest.raises(TrainingError) as info:
        t.train()
    msg = str(info.value)
    assert "step 3" in msg and "loss" in msg and "\n" not in msg and isinstance(info.value, DgemmaError)
    assert t.step == 2  # no update was applied
    assert (tmp_path / CHECKPOINT).read_bytes() == good
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    resumed = make_trainer(tmp_path, steps=8)
    resumed.load()
    assert resumed.step == 2 and all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_a_non_finite_gradient_stops_before_the_update(tmp_path):
    t = _trained(tmp_path)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.model.embed_tokens.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingError, match="step 3: .*gradient"):
        t.train()
    assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())


def test_a_non_finite_state_is_never_saved(tmp_path):
    t = _trained(tmp_path)
    good = (tmp_path / CHECKPOINT).read_bytes()
    _poison(t)
    with pytest.raises(TrainingError, match="embed_tokens.weight"):
        t.save()
    assert (tmp_path / CHECKPOINT).read_bytes() == good
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != RUN_MANIFEST]  # no temporary


def test_a_checkpoint_that_does_not_read_back_leaves_the_previous_one(tmp_path, monkeypatch):
    """Written, then verified, then renamed over the old one: a write that comes back wrong replaces nothing."""
    t = _trained(tmp_path)
    good = (tmp_path / CHECKPOINT).read_bytes()
    import safetensors.torch

    real = safetensors.torch.save_file

    def bad_disk(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        _flip_byte(Path(filename), Path(filename).stat().st_size - 1)

    monkeypatch.setattr(safetensors.torch, "save_file", bad_disk)
    with pytest.raises(CheckpointError, match="checksum"):
        t.save()
    assert (tmp_path / CHECKPOINT).read_bytes() == good
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != RUN_MANIFEST]  # no temporary


HISTORY = [{"step": 1, "loss": 3.0, "dec_loss": 2.0, "enc_loss": 1.0}, {"step": 2, "loss": float("nan")},
           {"step": 3, "loss": float("inf"), "dec_loss": float("-inf")}, {"step": 4, "loss": None},
           {"step": 5, "loss": "2.5"}, {"loss": 1.0}, {"step": 6, "loss": 2.0, "dec_loss": 0.0},
           {"step": 7, "eval_loss": float("nan")}, {"step": 8, "loss": 1.5, "enc_loss": 0.5}]


def test_plot_points_skip_nan_inf_and_non_numbers():
    assert finite_points(HISTORY, "loss") == [(1, 3.0), (6, 2.0), (8, 1.5)]
    assert finite_points(HISTORY, "dec_loss") == [(1, 2.0)]  # log scale: zero is left out too
    assert finite_points(HISTORY, "dec_loss", positive=False) == [(1, 2.0), (6, 0.0)]  # a solve rate may be 0
    assert finite_points([{"step": 1, "loss": float("nan")}, {"step": 2, "loss": float("inf")}], "loss") == []


def test_plot_survives_nan_and_inf(tmp_path):
    assert plot_losses([{"step": 1, "loss": float("nan")}, {"step": 2, "loss": float("inf")}], tmp_path / "a.png",
                       quiet=True) is None
    pytest.importorskip("matplotlib")
    out = plot_losses(HISTORY, tmp_path / "loss.png", quiet=True)
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_with_nan_still_plot_after_a_resume(tmp_path):
    """metrics.jsonl holding NaN (json writes it as NaN) reloads and plots without raising."""
    t = _trained(tmp_path)
    t.history.append({"step": 2, "eval_loss": float("nan"), "loss": float("nan")})
    t.save()
    resumed = make_trainer(tmp_path, steps=4)
    resumed.load()
    assert any(isinstance(h.get("loss"), float) and h["loss"] != h["loss"] for h in resumed.history)
    resumed.train()  # plots at the end
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_plot_draws_the_eval_solve_rates_beside_the_loss(tmp_path):
    """A history with periodic solve rates gets a second panel (a wider image); NaN rates are left out."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    plain = plot_losses(HISTORY, tmp_path / "plain.png", quiet=True)
    rates = HISTORY + [{"step": 4, "eval_solve_rate_44": 0.5, "eval_solve_rate_23-36": 0.2},
                       {"step": 8, "eval_solve_rate_44": 0.75, "eval_solve_rate_23-36": float("nan")}]
    both = plot_losses(rates, tmp_path / "both.png", quiet=True)
    assert Image.open(both).width > Image.open(plain).width
    assert rate_label("eval_solve_rate_23-36") == "23-36 givens"
    assert rate_label("eval_solve_rate_44_pinned") == "44 givens, pinned"
