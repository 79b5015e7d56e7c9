"""FP8 weight-only quantization: the block arithmetic, `dgemma quantize`, and the written checkpoint in dgemma and in
the reference implementation (transformers 5.23.0)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from dgemma.io import checkpoint
from dgemma.cli import main
from dgemma.quant.fp8 import FP8, QuantError, dequantize_blocks, quantize_blocks, quantize_model

from .conftest import make_reference_checkpoint

transformers = pytest.importorskip("transformers")


def test_blocks_round_trip_within_half_an_fp8_step():
    torch.manual_seed(0)
    w = torch.randn(3, 64, 96) * torch.logspace(-3, 1, 96)  # columns of very different sizes
    w[1, :32, :32] = 0  # an all-zero block
    q, scale = quantize_blocks(w, (32, 32))
    assert q.dtype == FP8 and q.shape == w.shape and scale.shape == (3, 2, 3)
    assert scale[1, 0, 0] == 1 and torch.count_nonzero(q[1, :32, :32].float()) == 0
    d = dequantize_blocks(q, scale, torch.float32)
    # E4M3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself; a subnormal by half of 2^-9 steps
    step = scale.repeat_interleave(32, -2).repeat_interleave(32, -1)
    assert ((d - w).abs() <= 2**-4 * w.abs() + 2**-10 * step + 1e-12).all()
    # each block's largest magnitude is representable exactly: nothing saturates
    amax = w.reshape(3, 2, 32, 3, 32).abs().amax(dim=(2, 4))
    assert torch.allclose(dequantize_blocks(q, scale, torch.float32).reshape(3, 2, 32, 3, 32).abs().amax(dim=(2, 4)),
                          amax, rtol=1e-6)


def test_blocks_reject_what_they_cannot_represent():
    with pytest.raises(QuantError, match="does not split"):
        quantize_blocks(torch.ones(48, 64), (32, 32))
    with pytest.raises(QuantError, match="inf or NaN"):
        quantize_blocks(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), (2, 2))


def _logits(model, V, C, seed=2):
    prompt = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(seed))
    canvas = torch.randint(0, V, (1, C), generator=torch.Generator().manual_seed(seed + 1))
    cache = model.new_cache(1, 9 + C)
    model.encode(prompt, cache)
    return prompt, canvas, model.denoise(canvas, cache)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(source, FP8 with experts, FP8 without experts) checkpoint directories, all written by the CLI."""
    root = tmp_path_factory.mktemp("quant")
    src = make_reference_checkpoint(root / "src", std=0.05, seed=3)
    full, dense = root / "fp8", root / "fp8-dense"
    assert main(["quantize", "--model", str(src), "--out", str(full), "--quiet"]) == 0
    assert main(["quantize", "--model", str(src), "--out", str(dense), "--skip-experts", "--quiet"]) == 0
    return src, full, dense


def test_quantized_checkpoint_is_the_dequantized_model(quantized):
    src, full, _ = quantized
    q = checkpoint.load(full, quiet=True)
    ref = checkpoint.load(src, quiet=True)
    cfg = json.loads((full / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "fp8" and cfg["weight_block_size"] == [32, 32]  # the largest that divides all
    state = q.model.state_dict()
    fp8 = [k for k, v in state.items() if v.dtype == FP8]
    assert any("experts.gate_up_proj" in k for k in fp8) and any("self_conditioning" in k for k in fp8)
    assert q.model.embed_tokens.weight.dtype == torch.float32  # the tied head is not quantized
    # put the dequantized weights into the unquantized model: dgemma's FP8 forward is that model, bit for bit
    plain = ref.model.state_dict()
    for k in fp8:
        plain[k] = dequantize_blocks(state[k], state[k + "_scale_inv"], torch.float32)
    # fresh (aligned) tensors on both sides: MKL may round differently for a weight mapped at an odd file offset
    ref.model.load_state_dict({k: v.clone() for k, v in plain.items()}, assign=True)
    V, C = q.config.text.vocab_size, q.config.canvas_length
    assert torch.equal(_logits(q.model, V, C)[2], _logits(ref.model, V, C)[2])


def test_quantized_file_is_a_quarter_of_fp32_for_what_it_quantizes(quantized):
    src, full, _ = quantized
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(full / "model.safetensors", "pt") as b:
        name = "model.decoder.layers.0.experts.gate_up_proj"
        assert a.get_slice(name).get_dtype() == "F32" and b.get_slice(name).get_dtype() == "F8_E4M3"
        assert b.get_tensor(name + "_scale_inv").dtype == torch.float32
        assert b.get_tensor("model.decoder.embed_tokens.weight").dtype == torch.float32


def test_transformers_loads_the_dense_fp8_checkpoint_and_gives_dgemmas_logits(quantized):
    # on a CPU transformers dequantizes FP8 while loading; it does so for every projection, not for fused experts
    _, _, dense = quantized
    ours = checkpoint.load(dense, quiet=True)
    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(dense, dtype=torch.float32).eval()
    V, C = ours.config.text.vocab_size, ours.config.canvas_length
    prompt, canvas, got = _logits(ours.model, V, C)
    with torch.no_grad():
        want = ref(input_ids=prompt, decoder_input_ids=canvas).logits
    assert torch.equal(got, want)
    # and the same tokens through `dgemma generate`
    torch.manual_seed(11)
    out = ref.generate(prompt, max_new_tokens=2 * C, max_denoising_steps=5, t_min=0.4, t_max=0.8)
    expected = out.sequences[0, prompt.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(expected) if t == 1), None)
    expected = expected if cut is None else expected[: cut + 1]
    args = ["generate", "--model", str(dense), "--prompt-ids", ",".join(map(str, prompt[0].tolist())),
            "--max-new-tokens", str(2 * C), "--max-denoising-steps", "5", "--seed", "11", "--t-min", "0.4",
            "--t-max", "0.8", "--device", "cpu", "--json"]
    r = subprocess.run([sys.executable, "-m", "dgemma.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"][0]["token_ids"] == expected


GPU_LAYOUT_SCRIPT = """
import sys, torch, transformers
from safetensors.torch import load_file
# transformers keeps FP8 weights (FP8Linear, FP8Experts) only when it sees a GPU; pretend to, and only load
torch.cuda.is_available = lambda: True
torch.cuda.get_device_capability = lambda *a: (9, 0)
model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(sys.argv[1], device_map="cpu")
state = model.state_dict()
wrong = [k for k, v in load_file(sys.argv[1] + "/model.safetensors").items()
         if not k.startswith("model.encoder.vision") and (k not in state or state[k].dtype != v.dtype
                                                          or not torch.equal(state[k].float(), v.float()))]
layer = model.model.decoder.layers[0]
print(len(wrong), type(layer.experts).__name__, type(layer.self_attn.q_proj).__name__, type(layer.router.proj).__name__,
      torch.equal(model.model.encoder.language_model.layers[0].experts.gate_up_proj_scale_inv,
                  layer.experts.gate_up_proj_scale_inv))
"""


def test_transformers_fp8_modules_take_every_tensor_as_written(quantized, tmp_path):
    """The GPU path: transformers' FP8Linear / FP8Experts must receive each FP8 weight and scale unchanged (the
    encoder's tied layers included). Run in a child process, since it fakes a CUDA device to get that path."""
    _, full, _ = quantized
    script = tmp_path / "layout.py"
    script.write_text(GPU_LAYOUT_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(full)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "FP8Experts", "FP8Linear", "Linear", "True"]


def test_bf16_checkpoint_keeps_bf16_beside_fp8(quantized, tmp_path):
    src, _, _ = quantized
    bf16, out = tmp_path / "bf16", tmp_path / "fp8"
    assert main(["convert", "--model", str(src), "--out", str(bf16), "--dtype", "bfloat16"]) == 0
    assert main(["quantize", "--model", str(bf16), "--out", str(out), "--block-size", "16", "--quiet"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.decoder.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("model.decoder.layers.0.mlp.up_proj.weight").get_dtype() == "F8_E4M3"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [16, 16]
    loaded = checkpoint.load(out, quiet=True)
    assert loaded.model.dtype == torch.float32  # the CPU computes in fp32


def test_bad_requests_fail_with_one_line_and_write_nothing(quantized, tmp_path, capsys):
    src, full, _ = quantized
    out = tmp_path / "out"
    cases = [
        (["--model", str(src), "--out", str(out), "--block-size", "48"], "does not split into 48 x 48 blocks"),
        (["--model", str(src), "--out", str(src)], "--out must differ"),
        (["--model", str(full), "--out", str(out)], "already quantized"),
        (["--model", str(tmp_path / "nope"), "--out", str(out)], "not a directory"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["quantize", "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, message", [
    (dict(quant_method="awq"), "quantization method 'awq' is not supported"),
    (dict(activation_scheme="static"), "activation scheme 'static' is not supported"),
    (dict(weight_block_size=[64, 64]), "does not split into 64 x 64 blocks"),
])
def test_unsupported_quantization_configs_are_clear_errors(quantized, tmp_path, changes, message):
    _, full, _ = quantized
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(_edit_config(full, tmp_path / "ckpt", **changes), quiet=True)


def test_config_claiming_fp8_over_unquantized_tensors_is_an_error(quantized, tmp_path):
    src, full, _ = quantized
    import shutil

    dst = tmp_path / "lying"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = json.loads((full / "config.json").read_text())["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="missing tensor|says it is FP8"):
        checkpoint.load(dst, quiet=True)


def test_training_refuses_a_quantized_model(quantized, tmp_path, capsys):
    _, full, _ = quantized
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert main(["train", "--model", str(full), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--quiet", "--template", "raw"]) == 2
    assert "is quantized (fp8)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_quantizing_twice_in_memory_is_refused(quantized):
    src, _, _ = quantized
    model = checkpoint.load(src, quiet=True).model
    quantize_model(model, 16)
    with pytest.raises(QuantError, match="already quantized"):
        quantize_model(model)


def test_fast_cpu_dequantization_is_torchs_conversion_bit_for_bit():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # every E4M3 value but NaN, subnormals and both zeros included
    q = codes.view(FP8).reshape(2, 127)
    for scale in (torch.tensor([[1.0]]), torch.tensor([[3.1e-5]]), torch.tensor([[200.0]])):  # 200: the slow path
        got = dequantize_blocks(q, scale, torch.float32)
        want = q.float() * scale
        assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
