"""Hostile config and safetensors files: every one is refused with one line (ConfigError / CheckpointError, exit 2 in
the CLI), never a traceback, a hang or a multi-gigabyte allocation; values read from files are bounded like request
fields (engine/request.py)."""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from dgemma.io import checkpoint
from dgemma.io.checkpoint import CheckpointError, SafetensorsFile
from dgemma.cli import main
from dgemma.config import ConfigError, GenerationConfig, ModelConfig, read_json

from .conftest import TINY_TEXT

MODEL = {"model_type": "diffusion_gemma", "canvas_length": 16, "text_config": dict(TINY_TEXT)}


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    return msg


# ---- generation_config.json ---------------------------------------------------------------------------------------

BAD_GENERATION = {
    "steps 10^7 (hangs generate)": ({"max_denoising_steps": 10**7}, "max_denoising_steps"),
    "steps 0": ({"max_denoising_steps": 0}, "max_denoising_steps"),
    "steps 1.5": ({"max_denoising_steps": 1.5}, "max_denoising_steps"),
    "steps true": ({"max_denoising_steps": True}, "max_denoising_steps"),
    "t_min as a string": ({"t_min": "0.4"}, "t_min"),
    "t_max Infinity": ({"t_max": float("inf")}, "t_max"),
    "t_max NaN": ({"t_max": float("nan")}, "t_max"),
    "t_max above request bound": ({"t_max": 101.0}, "t_max"),
    "stability 10^9 (allocates B x 10^9 x C)": ({"stability_threshold": 10**9}, "stability_threshold"),
    "confidence Infinity": ({"confidence_threshold": float("inf")}, "confidence_threshold"),
    "confidence as a string": ({"confidence_threshold": "x"}, "confidence_threshold"),
    "entropy bound as a list": ({"sampler_config": {"entropy_bound": [1]}}, "entropy_bound"),
    "max_new_tokens 10^12": ({"max_new_tokens": 10**12}, "max_new_tokens"),
    "eos as a string": ({"eos_token_id": "x"}, "eos_token_id"),
    "eos out of the vocabulary": ({"eos_token_id": 10**6}, "eos_token_id"),
    "pad negative": ({"pad_token_id": -1}, "pad_token_id"),
}


@pytest.mark.parametrize("case", sorted(BAD_GENERATION))
def test_generation_config_values_are_bounded(case):
    raw, field = BAD_GENERATION[case]
    text = ModelConfig.from_hf(copy.deepcopy(MODEL)).text
    with pytest.raises(ConfigError) as info:
        GenerationConfig.from_hf(raw, text, "generation_config.json")
    msg = _one_line(info.value)
    assert msg.startswith("generation_config.json: ") and field in msg, msg


def test_generation_config_bounds_match_requests():
    """The edges a request accepts are accepted from a file too."""
    text = ModelConfig.from_hf(copy.deepcopy(MODEL)).text
    gen = GenerationConfig.from_hf({"max_denoising_steps": 1024, "t_min": 0, "t_max": 100}, text)
    assert (gen.max_denoising_steps, gen.t_min, gen.t_max) == (1024, 0, 100)
    with pytest.raises(ConfigError, match="max_denoising_steps"):
        GenerationConfig().replace(max_denoising_steps=1025)  # the CLI's --max-denoising-steps goes through here
    # a request's temperature (<= 2) scales a file's schedule (<= 100): that product stays valid
    assert GenerationConfig(t_min=0.0, t_max=100.0).replace(t_max=200.0).t_max == 200.0


# ---- config.json ----------------------------------------------------------------------------------------------------

def _model(**text_changes) -> dict:
    d = copy.deepcopy(MODEL)
    d["text_config"].update(text_changes)
    return d


BAD_MODEL = {
    "per_layer_config as a list": (_model(per_layer_config=[{"head_dim": 32}]), "per_layer_config"),
    "per_layer_config entry not an object": (_model(per_layer_config={"1": 5}), "per_layer_config"),
    "rope_parameters as a list": (_model(rope_parameters=[1]), "rope_parameters"),
    "rope_theta as a string": (_model(rope_parameters={"full_attention": {"rope_theta": "1e6"}}), "rope_theta"),
    "rope factor as a string": (_model(rope_parameters={"full_attention": {"factor": "abc"}}), "factor"),
    "10^9 layers (would build a 10^9 list)": (_model(num_hidden_layers=10**9, layer_types=[]), "num_hidden_layers"),
    "vocab 10^12": (_model(vocab_size=10**12), "vocab_size"),
    "hidden size as a float": (_model(hidden_size=64.0), "hidden_size"),
    "layer type not a string": (_model(layer_types=[["x"], "full_attention", "full_attention"]), "layer_types"),
    "layer_types not a list": (_model(layer_types=7), "layer_types"),
    "rms_norm_eps Infinity": (_model(rms_norm_eps=float("inf")), "rms_norm_eps"),
    "softcapping as a string": (_model(final_logit_softcapping="30"), "final_logit_softcapping"),
    "max positions 10^12": (_model(max_position_embeddings=10**12), "max_position_embeddings"),
    "eos beyond the vocabulary": (_model(eos_token_id=[1, 10**6]), "eos_token_id"),
    "bos as a string": (_model(bos_token_id="2"), "bos_token_id"),
    "text_config a list": ({**MODEL, "text_config": [1]}, "text_config"),
    "canvas 10^9": ({**copy.deepcopy(MODEL), "canvas_length": 10**9}, "canvas_length"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODEL))
def test_model_config_values_are_checked(case):
    raw, field = BAD_MODEL[case]
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(raw, "config.json")
    msg = _one_line(info.value)
    assert msg.startswith("config.json: ") and field in msg, msg


def test_deeply_nested_json_is_one_line(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        read_json(f)


def test_hostile_config_in_the_cli_is_one_line(tmp_path, capsys):
    """Through `dgemma generate`: exit 2, one line, no traceback (the config is read before any weights)."""
    for name, raw, message in [
        ("config.json", _model(per_layer_config=[1]), "per_layer_config"),
        ("generation_config.json", {"max_denoising_steps": 10**7}, "max_denoising_steps"),
        ("generation_config.json", {"t_min": "low"}, "t_min"),
    ]:
        d = tmp_path / "m"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        (d / "config.json").write_text(json.dumps(raw if name == "config.json" else MODEL))
        if name == "generation_config.json":
            (d / name).write_text(json.dumps(raw))
        capsys.readouterr()
        assert main(["generate", "--model", str(d), "--prompt-ids", "3,4"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


# ---- safetensors headers --------------------------------------------------------------------------------------------

def _safetensors(path: Path, header: dict | str, data: bytes = b"\x00" * 64) -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype="F32", shape=(4,), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "offsets as strings": ({"w": _entry(offsets=("0", "16"))}, "data_offsets"),
    "offsets as floats": ({"w": _entry(offsets=(0.0, 16.0))}, "data_offsets"),
    "three offsets": ({"w": _entry(offsets=(0, 8, 16))}, "data_offsets"),
    "offsets reversed": ({"w": _entry(offsets=(16, 0))}, "data_offsets"),
    "dtype as a list": ({"w": _entry(dtype=["F32"])}, "dtype"),
    "float shape": ({"w": _entry(shape=(4.0,))}, "shape"),
    "dimension as a string (a 4 GB string today)": ({"w": _entry(shape=("4", 10**9))}, "shape"),
    "negative dimension": ({"w": _entry(shape=(-4,))}, "shape"),
    "bool dimension": ({"w": _entry(shape=(True, 4))}, "shape"),
    "entry not an object": ({"w": [1, 2]}, "malformed"),
    "metadata not an object": ({"__metadata__": [1], "w": _entry()}, "__metadata__"),
    "overlapping tensors": ({"a": _entry(offsets=(0, 16)), "b": _entry(offsets=(8, 24))}, "overlap"),
    "same bytes twice": ({"a": _entry(offsets=(0, 16)), "b": _entry(offsets=(0, 16))}, "overlap"),
    "F32 bytes declared BF16": ({"w": _entry(dtype="BF16", shape=(4,), offsets=(0, 16))}, "does not match"),
    "deeply nested": ('{"w": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_hostile_safetensors_header_is_one_line(case, tmp_path):
    header, message = BAD_HEADERS[case]
    f = _safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile.open(f)
    msg = _one_line(info.value)
    assert message in msg and str(f) in msg, msg


def test_well_formed_header_still_opens(tmp_path):
    f = _safetensors(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}, "a": _entry(offsets=(0, 16)),
                                                     "b": _entry(dtype="BF16", shape=(2, 4), offsets=(16, 32)),
                                                     "empty": _entry(shape=(0, 3), offsets=(32, 32))},
                     data=struct.pack("<4f", 1, 2, 3, 4) + b"\x00" * 16)
    st = SafetensorsFile.open(f)
    assert st.get("a").tolist() == [1, 2, 3, 4] and st.get("b").shape == (2, 4) and st.get("empty").shape == (0, 3)


# ---- weights that load but cannot be right --------------------------------------------------------------------------

NORM = "model.decoder.norm.weight"
Q_PROJ = "model.decoder.layers.0.self_attn.q_proj.weight"


def _rewrite(ckpt: Path, name: str, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    tensors[name] = fn(tensors[name])
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def _poke(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


BAD_WEIGHTS = {
    "NaN weight": (Q_PROJ, lambda t: _poke(t, float("nan")), f"tensor {Q_PROJ} holds NaN or Inf"),
    "Inf weight": (NORM, lambda t: _poke(t, float("inf")), f"tensor {NORM} holds NaN or Inf"),
    "integer weight": (NORM, lambda t: t.round().to(torch.int16), f"tensor {NORM} is I16"),
    # I16 bytes under a BF16 header: a small non-negative integer reads as a bf16 subnormal (about 1e-39), a
    # negative one as NaN (caught above)
    "I16 data declared as BF16": (Q_PROJ, lambda t: (t.abs() * 1000).round().to(torch.int16).view(torch.bfloat16),
                                  f"tensor {Q_PROJ} looks like integer data"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_weights_that_cannot_be_right_are_refused(case, tiny_checkpoint, tmp_path, capsys):
    """Loaded silently, these give all-pad (or NaN) output; refusing them names the tensor."""
    name, fn, message = BAD_WEIGHTS[case]
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "bad"))
    _rewrite(ckpt, name, fn)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(ckpt, quiet=True)
    assert message in _one_line(info.value)
    capsys.readouterr()
    assert main(["generate", "--model", str(ckpt), "--prompt-ids", "3,4,5", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_hostile_header_in_the_cli_is_one_line(tiny_checkpoint, tmp_path, capsys):
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "bad"))
    _safetensors(ckpt / "model.safetensors", '{"w": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert main(["generate", "--model", str(ckpt), "--prompt-ids", "3,4,5", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nested too deeply" in err[0], err


@pytest.mark.parametrize("quantization, message", [
    ({"quant_method": "fp8", "modules_to_not_convert": 5}, "modules_to_not_convert must be a list"),
    ({"quant_method": "fp8", "weight_block_size": [True, 128]}, "weight_block_size must be two positive integers"),
    ({"quant_method": "fp8", "weight_block_size": "128"}, "weight_block_size must be two positive integers"),
])
def test_hostile_quantization_config_is_one_line(quantization, message, tiny_checkpoint, tmp_path):
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "bad"))
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = quantization
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(ckpt, quiet=True)
    assert message in _one_line(info.value)
