"""int4 weight-only quantization: the group arithmetic, the kernels against it, `dgemma quantize --format int4`, and
the written checkpoint's round trip (on a CPU; the CUDA kernels are checked under the gpu mark)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dgemma.io import checkpoint
from dgemma.cli import main
from dgemma.model.moe import Experts
from dgemma.presets import preset_config, random_model
from dgemma.quant import int4
from dgemma.quant.fp8 import QuantError, quantized_projections
from dgemma.testing import write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_groups_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(3, 32, 128) * torch.logspace(-3, 1, 128)  # groups of very different sizes
    w[1, :, :32] = 0.25  # constant groups
    codes, scale, zero = int4.quantize_groups(w, 32)
    assert codes.dtype == torch.uint8 and codes.max() <= 15 and scale.shape == (3, 32, 4) == zero.shape
    d = int4.dequantize_groups(codes, scale, zero)
    step = scale.float().repeat_interleave(32, -1)
    # half a step, plus the bf16 rounding of zero (and of the scale, times at most 8 steps)
    bound = step / 2 + zero.float().abs().repeat_interleave(32, -1) * 2**-8 + step * 8 * 2**-8 + 1e-12
    assert ((d - w).abs() <= bound).all()
    assert torch.allclose(d[1, :, :32], torch.full((32, 32), 0.25))
    assert torch.equal(int4.unpack_nibbles(int4.pack_nibbles(codes)), codes)
    assert int4.pack_nibbles(torch.tensor([[1, 2]])).item() == 0x21  # even column in the low nibble
    with pytest.raises(QuantError, match="inf or NaN"):
        int4.quantize_groups(torch.tensor([[float("nan")] * 32]), 32)


@pytest.mark.parametrize("n,k,g", [(32, 64, 32), (48, 256, 64), (16, 384, 128)])
def test_kernel_is_the_reference_arithmetic_and_unpacks_exactly(n, k, g):
    torch.manual_seed(n + k)
    w = torch.randn(n, k)
    codes, scale, zero = int4.quantize_groups(w, g)
    packed = int4.kernel_pack(codes)
    sz = int4.scales_and_zeros(scale, zero, torch.bfloat16)
    x = torch.randn(5, k)
    w = int4.dequantize_groups(codes, scale, zero)
    got = int4.int4_mm(x, packed, g, sz)
    assert got.dtype == torch.float32
    # the kernel's activations are bf16 and its result is rounded to bf16 (int4_mm's docstring)
    want = x.bfloat16().float() @ w.t()
    assert ((got - want).abs() <= 2**-8 * (x.abs() @ w.abs().t()) + 1e-6).all()
    assert torch.equal(int4.kernel_unpack(packed, n, k, g), codes)


def _logits(model, V, C, seed=2):
    prompt = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(seed))
    canvas = torch.randint(0, V, (2, C), generator=torch.Generator().manual_seed(seed + 1))
    cache = model.new_cache(2, 9 + C)
    with torch.no_grad():
        model.encode(prompt, cache)
        return model.denoise(canvas, cache)


def _close(got, ref, base):
    """int4's logits against the reference's: equal but for the order of fp32 sums (which can move a bf16 rounding
    by one step), so a tiny fraction of how far the 4-bit weights moved them from the unquantized model's."""
    drift, quant = (got - ref).norm(), (ref - base).norm()
    assert quant > 0 and drift < 0.02 * quant, (drift, quant)


def _bf16(x):
    return x.to(torch.bfloat16).float()


class _RefLinear(torch.nn.Module):
    """The reference arithmetic of Int4Linear: the dequantized weight, bf16 activations, an fp32 sum, bf16 out."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        return _bf16(_bf16(x) @ self.w.t())


class _RefExperts(Experts):
    def __init__(self, gate_up, down):
        torch.nn.Module.__init__(self)
        self.num_experts, self.gu, self.d = gate_up.shape[0], gate_up, down

    def expert_mlps(self, x_sorted, flat_expert):
        out, start = [], 0
        for e, n in enumerate(torch.bincount(flat_expert, minlength=self.num_experts).tolist()):
            gate, up = _bf16(_bf16(x_sorted[start:start + n]) @ self.gu[e].t()).chunk(2, -1)
            out.append(_bf16(_bf16(torch.nn.functional.gelu(gate, approximate="tanh") * up) @ self.d[e].t()))
            start += n
        return torch.cat(out)


def _dequantized_copy(model, group_size):
    """`model` with each quantized module replaced by the reference arithmetic on its dequantized int4 weights."""
    out = copy.deepcopy(model)
    deq = lambda w: int4.dequantize_groups(*int4.quantize_groups(w, group_size))
    for parent, name, m in quantized_projections(out, True):
        new = (_RefExperts(deq(m.gate_up_proj.data), deq(m.down_proj.data)) if isinstance(m, Experts)
               else _RefLinear(deq(m.weight.data)))
        setattr(parent, name, new)
    return out


def test_int4_model_computes_the_dequantized_model():
    cfg = preset_config("tiny")
    model = random_model(cfg, std=0.05, seed=1)
    ref = _dequantized_copy(model, 32)
    base = _logits(model, cfg.text.vocab_size, cfg.canvas_length)
    config = int4.quantize_model(model)
    assert config["group_size"] == 32 and config["quant_method"] == "dgemma-int4"
    assert isinstance(model.layers[0].experts, int4.Int4Experts)
    assert isinstance(model.self_conditioning.up_proj, int4.Int4Linear)
    assert model.embed_tokens.weight.dtype == torch.float32 and model.layers[0].router.proj.weight.dtype == torch.float32
    V, C = cfg.text.vocab_size, cfg.canvas_length
    _close(_logits(model, V, C), _logits(ref, V, C), base)


def test_shapes_the_kernels_cannot_take_are_refused_before_anything_changes():
    cfg = preset_config("tiny")
    model = random_model(cfg)
    with pytest.raises(QuantError, match="group size must be one of"):
        int4.quantize_model(model, group_size=16)
    with pytest.raises(QuantError, match="does not fit the int4 kernels"):
        int4.quantize_model(model, group_size=64)  # the experts' down_proj has 32 inputs
    assert isinstance(model.layers[0].experts, Experts) and not isinstance(model.layers[0].experts, int4.Int4Experts)
    assert getattr(model, "quantization_config", None) is None


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    src = write_tiny_checkpoint(root)
    out = root / "int4"
    assert main(["quantize", "--model", str(src), "--out", str(out), "--format", "int4", "--quiet"]) == 0
    return src, out


def test_cli_checkpoint_loads_to_the_same_model_and_saves_back_the_same_bytes(quantized, tmp_path):
    src, out = quantized
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "dgemma-int4" and cfg["group_size"] == 32
    stored = load_file(out / "model.safetensors")
    name = "model.decoder.layers.0.experts.gate_up_proj"
    assert stored[name].dtype == torch.uint8 and stored[name + "_scale"].dtype == torch.bfloat16
    assert stored["model.decoder.embed_tokens.weight"].dtype == torch.float32
    # the stored codes are the reference quantization of the source weights
    source = load_file(src / "model.safetensors")
    codes, scale, zero = int4.quantize_groups(source[name], 32)
    assert torch.equal(stored[name], int4.pack_nibbles(codes))
    assert torch.equal(stored[name + "_scale"], scale) and torch.equal(stored[name + "_zero"], zero)
    q = checkpoint.load(out, quiet=True)
    plain = checkpoint.load(src, quiet=True).model
    ref = _dequantized_copy(plain, 32)
    V, C = q.config.text.vocab_size, q.config.canvas_length
    _close(_logits(q.model, V, C), _logits(ref, V, C), _logits(plain, V, C))
    again = checkpoint.save(tmp_path / "again", q.model, q.config, q.generation)
    resaved = load_file(again / "model.safetensors")
    assert resaved.keys() == stored.keys() and all(torch.equal(resaved[k], stored[k]) for k in stored)
    size = lambda d: (d / "model.safetensors").stat().st_size
    assert size(out) < 0.5 * size(src)  # the tiny model is mostly its (unquantized) embedding


def _rewrite_config(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    edit(raw["quantization_config"])
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda qc: qc.update(quant_method="awq"), "'awq' is not supported"),
    (lambda qc: qc.update(group_size=16), "group_size must be one of"),
    (lambda qc: qc.update(bits=8), "only 4-bit codes"),
    (lambda qc: qc.update(desc_act=True), "unknown dgemma-int4 quantization_config key 'desc_act'"),
    (lambda qc: qc.update(group_size=64), "does not fit the int4 kernels"),
])
def test_unknown_or_impossible_configs_are_refused(quantized, tmp_path, edit, message):
    _, out = quantized
    bad = _rewrite_config(out, tmp_path / "bad", edit)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(bad, quiet=True)


def test_codes_stored_as_floats_are_refused(quantized, tmp_path):
    _, out = quantized
    bad = _rewrite_config(out, tmp_path / "bad", lambda qc: None)
    tensors = load_file(bad / "model.safetensors")
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].float()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(checkpoint.CheckpointError, match="holds int4 codes"):
        checkpoint.load(bad, quiet=True)


def test_cli_refuses_flags_of_the_other_format(quantized, tmp_path, capsys):
    src, _ = quantized
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "x"), "--format", "int4",
                 "--block-size", "32"]) == 2
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "x"), "--format", "int4",
                 "--group-size", "48"]) == 2
    assert "--group-size must be one of" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int4_kernel_is_the_reference_arithmetic(quantized):
    _, out = quantized
    w = torch.randn(64, 256, device="cuda")
    codes, scale, zero = int4.quantize_groups(w, 64)
    packed = int4.kernel_pack(codes)
    sz = int4.scales_and_zeros(scale, zero, torch.bfloat16)
    x = torch.randn(7, 256, device="cuda").bfloat16()
    w = int4.dequantize_groups(codes, scale, zero)
    want = x.float() @ w.t()
    got = int4.int4_mm(x, packed, 64, sz).float()
    assert ((got - want).abs() <= 2**-7 * (x.float().abs() @ w.abs().t()) + 1e-3).all()
    assert torch.equal(int4.kernel_unpack(packed, 64, 256, 64), codes)
    q = checkpoint.load(out, device="cuda", quiet=True)  # packed for CUDA from the same file
    cpu = checkpoint.load(out, quiet=True)
    V, C = q.config.text.vocab_size, q.config.canvas_length
    assert torch.allclose(_logits(q.model, V, C).float().cpu(), _logits(cpu.model, V, C), atol=0.1)


def test_an_int4_model_moved_off_its_packing_device_says_so():
    cfg = preset_config("tiny")
    model = random_model(cfg)
    int4.quantize_model(model)
    model.to("meta")  # any other device: the CPU-packed codes would reach a kernel that reads another layout
    with pytest.raises(QuantError, match="int4 models do not move between devices"):
        model.layers[0].self_attn.q_proj(torch.zeros(1, cfg.text.hidden_size, device="meta"))
