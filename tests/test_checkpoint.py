"""Checkpoint loading: sharded files, clear one-line errors for bad checkpoints, memory use while loading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgemma.io import checkpoint
from dgemma.io.checkpoint import CheckpointError
from dgemma.cli import main
from dgemma.config import ConfigError
from dgemma.presets import default_generation, preset_config, random_model

from .conftest import make_reference_checkpoint


def test_sharded_checkpoint_loads_like_single(tmp_path, tiny_checkpoint):
    sharded = make_reference_checkpoint(tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a = checkpoint.load(tiny_checkpoint, quiet=True).model.state_dict()
    b = checkpoint.load(sharded, quiet=True).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vision_tower_loads_or_is_skipped_with_one_line_notice(tiny_checkpoint, capsys):
    assert checkpoint.load(tiny_checkpoint).vision is not None
    assert capsys.readouterr().err == ""
    assert checkpoint.load(tiny_checkpoint, vision=False).vision is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vision tower" in err[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensor(path: Path, drop: str | None = None, reshape: str | None = None):
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(f)
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].clone()
    save_file(tensors, f, metadata={"format": "pt"})


BAD = {
    "missing config": (lambda d: (d / "config.json").unlink(), "config.json: file not found"),
    "wrong model_type": (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})),
                         "model_type is 'llama'"),
    "bad json": (lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "missing tensor": (lambda d: _rewrite_tensor(d, drop="model.decoder.layers.1.self_attn.q_proj.weight"),
                       "missing tensor model.decoder.layers.1.self_attn.q_proj.weight"),
    "misshaped tensor": (lambda d: _rewrite_tensor(d, reshape="model.decoder.norm.weight"),
                         "tensor model.decoder.norm.weight has shape (63,), expected (64,)"),
    "truncated": (lambda d: _truncate(d / "model.safetensors"), "is truncated"),
    "not safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4), "too short"),
}


def _truncate(f: Path):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_gives_one_clear_line(case, tiny_checkpoint, tmp_path, capsys):
    ckpt = _copy(tiny_checkpoint, tmp_path / "bad")
    damage, message = BAD[case]
    damage(ckpt)
    with pytest.raises((CheckpointError, ConfigError)) as info:
        checkpoint.load(ckpt, quiet=True)
    assert message in str(info.value) and "\n" not in str(info.value)
    # the CLI prints exactly one line, no traceback, and writes nothing
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["generate", "--model", str(ckpt), "--prompt-ids", "3,4,5", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    out_dir = tmp_path / "converted"
    assert main(["convert", "--model", str(ckpt), "--out", str(out_dir)]) == 2
    assert not out_dir.exists()


def test_convert_to_bf16_round_trips(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["convert", "--model", str(tiny_checkpoint), "--out", str(out), "--dtype", "bfloat16"]) == 0
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.decoder.norm.weight").dtype == torch.bfloat16
    loaded = checkpoint.load(out, quiet=True)  # converted to fp32 for the CPU
    assert loaded.model.dtype == torch.float32


RSS_SCRIPT = """
import sys, torch
from dgemma.io import checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

# warm up once on a small checkpoint: torch's one-time lazy initialisation (~80 MB) is not loading cost
checkpoint.load(sys.argv[2], quiet=True)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS:")
ck = checkpoint.load(sys.argv[1], quiet=True)
total = sum(float(p.sum()) for p in ck.model.state_dict().values())  # touch every page
peak = status("VmHWM:")
weights = sum(p.numel() * p.element_size() for p in ck.model.state_dict().values())
print((peak - base) / weights)
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_rss_while_loading_is_near_weight_size(tmp_path, dtype, tiny_checkpoint):
    cfg = preset_config("tiny", vocab_size=32_000, hidden_size=512, intermediate_size=1024, num_experts=8,
                        moe_intermediate_size=512, num_hidden_layers=4, layer_types=["sliding_attention"] * 3 +
                        ["full_attention"])
    model = random_model(cfg)
    checkpoint.save(tmp_path / "m", model, cfg, default_generation(cfg), dtype=dtype)
    del model
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "m"), str(tiny_checkpoint)], capture_output=True, text=True,
                         check=True)
    ratio = float(out.stdout.strip())
    assert ratio < 1.3, f"peak RSS while loading was {ratio:.2f}x the weights"
