"""The released quantized layouts: NVIDIA ModelOpt NVFP4 and compressed-tensors FP8 (FP8_DYNAMIC).

Tiny checkpoints are written in exactly the releases' layouts (per-expert tensors, the releases' exclude/ignore
lists, bf16 for what is not quantized), with the packed values and scales produced by the formats' own libraries
(nvidia-modelopt's NVFP4QTensor, compressed-tensors' compressor). dgemma's dequantized weights must equal those
libraries' dequantization bit for bit, and its logits those of the plain model built from the dequantized weights."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dgemma.io import checkpoint
from dgemma.model.moe import Experts
from dgemma.quant import compressed, nvfp4

from .conftest import make_reference_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread_module")
transformers = pytest.importorskip("transformers")

# the NVFP4 release's exclude list, as its config.json names it
RELEASE_EXCLUDE = ["lm_head", "*mlp*", "*router*", "*self_attn*", "*self_conditioning*", "*embed_vision*",
                   "*vision_tower*"]
# the FP8-dynamic release's ignore list: embeddings (the tied head), routers, self-conditioning, vision
RELEASE_IGNORE = ["lm_head", "re:.*embed.*", "re:.*router.*", "re:.*self_conditioning.*", "re:.*vision_tower.*"]
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _per_expert(fused: dict[str, torch.Tensor], layer: int, e: int) -> dict[str, torch.Tensor]:
    """The release's per-expert matrices (out, in) from the fused (E, 2I, H) / (E, H, I) tensors."""
    gate_up = fused[f"model.decoder.layers.{layer}.experts.gate_up_proj"][e]
    inter = gate_up.shape[0] // 2
    return {"gate_proj": gate_up[:inter], "up_proj": gate_up[inter:],
            "down_proj": fused[f"model.decoder.layers.{layer}.experts.down_proj"][e]}


def _write(dst, tensors: dict[str, torch.Tensor], src, quantization_config: dict) -> None:
    """Two shards and an index, like the release; config.json gets the quantization_config."""
    dst.mkdir(parents=True)
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, dst / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "generation_config.json", dst / "generation_config.json")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    src = make_reference_checkpoint(root / "src", std=0.05, seed=5)  # with a tiny vision tower, as released
    return root, src, load_file(src / "model.safetensors"), json.loads((src / "config.json").read_text())


def _nvfp4(source, dst, exclude: list[str], scalar_shape: tuple = ()):
    """An NVFP4 checkpoint packed by ModelOpt: each expert on its own, plus every other linear map that `exclude`
    does not name; the rest bf16, as released. Returns (directory, ModelOpt's dequantization (fp32) of every
    quantized matrix, keyed by its module name)."""
    qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    _, src, state, cfg = source
    layers, num_experts = cfg["text_config"]["num_hidden_layers"], cfg["text_config"]["num_experts"]
    excluded = [p.strip("*") for p in exclude]
    out, oracle = {}, {}
    torch.manual_seed(0)

    def quantize(name: str, w: torch.Tensor) -> None:
        packed, scale, scale_2 = qtensor.NVFP4QTensor.quantize(w.bfloat16(), nvfp4.GROUP)
        out[name + ".weight"] = packed._quantized_data
        out[name + ".weight_scale"] = scale
        out[name + ".weight_scale_2"] = scale_2.reshape(scalar_shape)
        out[name + ".input_scale"] = (torch.rand(()) * 0.01 + 1e-3).reshape(scalar_shape)
        oracle[name] = packed.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2,
                                         block_sizes={-1: nvfp4.GROUP})

    for k, v in state.items():
        linear = k.startswith("model.decoder.") and k.endswith("proj.weight") and ".experts." not in k
        if linear and not any(x in k for x in excluded):
            quantize(k.removesuffix(".weight"), v)
        elif ".experts." not in k:
            out[k] = v.bfloat16()  # excluded: bf16, as released
    for layer in range(layers):
        for e in range(num_experts):
            for proj, w in _per_expert(state, layer, e).items():
                quantize(f"model.decoder.layers.{layer}.experts.{e}.{proj}", w)
    qc = convert_hf_quant_config_format({"producer": {"name": "modelopt", "version": "0.47.0"},
                                         "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                                                          "group_size": 16, "exclude_modules": exclude}})
    _write(dst, out, src, qc)
    return dst, oracle


@pytest.fixture(scope="module")
def nvfp4_release(source):
    return _nvfp4(source, source[0] / "nvfp4", RELEASE_EXCLUDE)


def _fp8_dynamic(source, dst, experts_per_expert: bool = True):
    """An FP8_DYNAMIC checkpoint compressed by compressed-tensors: attention and dense MLP quantized, and the experts
    split per expert and quantized (the community releases' layout) or left fused in bf16 (what llm-compressor
    writes when it meets transformers' fused 3-D experts). Returns (directory, the oracle's dequantized matrices)."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized import (
        FloatQuantizationCompressor,
    )
    from compressed_tensors.quantization import (
        QuantizationConfig,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    assert ct.__version__.startswith("0.20.0")
    _, src, state, cfg = source
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    layers, num_experts = cfg["text_config"]["num_hidden_layers"], cfg["text_config"]["num_experts"]

    def quantize(name: str, w: torch.Tensor) -> None:
        w = w.bfloat16()
        scale, zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), scheme.weights)
        packed = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                      scheme)
        out[name + ".weight"], out[name + ".weight_scale"] = packed["weight"], packed["weight_scale"]
        oracle[name] = FloatQuantizationCompressor.decompress(packed, scheme)["weight"]

    out, oracle = {}, {}
    for k, v in state.items():
        quantized = k.endswith("_proj.weight") and (".self_attn." in k or ".mlp." in k)
        if quantized:
            quantize(k.removesuffix(".weight"), v)
        elif ".experts." not in k or not experts_per_expert:
            out[k] = v.bfloat16()
    for layer in range(layers if experts_per_expert else 0):
        for e in range(num_experts):
            for proj, w in _per_expert(state, layer, e).items():
                quantize(f"model.decoder.layers.{layer}.experts.{e}.{proj}", w)
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=RELEASE_IGNORE, format="float-quantized",
                            quantization_status="compressed").model_dump()
    _write(dst, out, src, json.loads(json.dumps(qc)))
    return dst, oracle


@pytest.fixture(scope="module")
def fp8_release(source):
    return _fp8_dynamic(source, source[0] / "fp8-dynamic")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _experts_from_oracle(oracle: dict, layer: int, num_experts: int):
    prefix = f"model.decoder.layers.{layer}.experts"
    gate_up = torch.stack([torch.cat([oracle[f"{prefix}.{e}.gate_proj"], oracle[f"{prefix}.{e}.up_proj"]])
                           for e in range(num_experts)])
    down = torch.stack([oracle[f"{prefix}.{e}.down_proj"] for e in range(num_experts)])
    return gate_up, down


def _logits(model, V, C, seed=2):
    prompt = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(seed))
    canvas = torch.randint(0, V, (1, C), generator=torch.Generator().manual_seed(seed + 1))
    cache = model.new_cache(1, 9 + C)
    model.encode(prompt, cache)
    return model.denoise(canvas, cache)


def _plain_model(path, replace: dict[str, torch.Tensor]):
    """The bf16 checkpoint's model (as plain dgemma loads it) with some parameters replaced by fp32 tensors."""
    plain = checkpoint.load(path, quiet=True)
    state = {k: v.clone() for k, v in plain.model.state_dict().items()}
    for k, v in replace.items():
        assert state[k].shape == v.shape, k
        state[k] = v.float().clone()
    plain.model.load_state_dict(state, assign=True)
    return plain


def _bf16_copy(source, dst):
    """The source checkpoint in bf16, as the releases store what they leave unquantized."""
    _, src, state, _ = source
    dst.mkdir(exist_ok=True)
    save_file({k: v.bfloat16() for k, v in state.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_nvfp4_experts_dequantize_bit_for_bit_as_modelopt(nvfp4_release):
    path, oracle = nvfp4_release
    ck = checkpoint.load(path, quiet=True)
    for i, layer in enumerate(ck.model.layers):
        experts = layer.experts
        assert isinstance(experts, nvfp4.NVFP4Experts)
        assert experts.gate_up_proj.dtype == torch.uint8 and experts.gate_up_proj_weight_scale.dtype == nvfp4.FP8
        gate_up, down = experts.weights(torch.float32)
        want_gate_up, want_down = _experts_from_oracle(oracle, i, experts.num_experts)
        assert torch.equal(_bits(gate_up), _bits(want_gate_up)) and torch.equal(_bits(down), _bits(want_down))
        assert type(layer.self_attn.q_proj) is torch.nn.Linear and type(layer.router.proj) is torch.nn.Linear
    assert ck.model.quantization_config["quant_method"] == "modelopt"


def test_nvfp4_model_is_the_dequantized_model(nvfp4_release, source, tmp_path):
    path, oracle = nvfp4_release
    ck = checkpoint.load(path, quiet=True)
    replace = {}
    for i in range(len(ck.model.layers)):
        gate_up, down = _experts_from_oracle(oracle, i, ck.model.layers[i].experts.num_experts)
        replace[f"layers.{i}.experts.gate_up_proj"], replace[f"layers.{i}.experts.down_proj"] = gate_up, down
    plain = _plain_model(_bf16_copy(source, tmp_path / "bf16"), replace)
    V, C = ck.config.text.vocab_size, ck.config.canvas_length
    got, want = _logits(ck.model, V, C), _logits(plain.model, V, C)
    assert (got - want).abs().max() <= 1e-4
    # the packed experts take 0.5625 bytes a weight (0.5 for the codes, 1/16 for the FP8 group scales)
    experts = ck.model.layers[0].experts
    packed = sum(p.numel() * p.element_size() for n, p in experts.named_parameters() if "input_scale" not in n
                 and not n.endswith("scale_2"))
    assert packed == (experts.gate_up_proj.numel() + experts.down_proj.numel()) * 2 * 0.5625


def test_nvfp4_linear_maps_too_when_the_exclude_list_spares_them(source, tmp_path):
    """A ModelOpt NVFP4 checkpoint that quantizes attention as well (and stores its scalars as [1])."""
    path, oracle = _nvfp4(source, tmp_path / "attn", ["lm_head", "*mlp*", "*router*", "*self_conditioning*",
                                                      "*vision*"], scalar_shape=(1,))
    ck = checkpoint.load(path, quiet=True)
    q = ck.model.layers[1].self_attn.q_proj
    assert isinstance(q, nvfp4.NVFP4Linear) and type(ck.model.layers[1].mlp.up_proj) is torch.nn.Linear
    got = nvfp4.dequantize(q.weight, q.weight_scale, q.weight_scale_2, torch.float32)
    assert torch.equal(_bits(got), _bits(oracle["model.decoder.layers.1.self_attn.q_proj"]))
    replace = {name.removeprefix("model.decoder.") + ".weight": w for name, w in oracle.items() if ".experts." not in name}
    for i in range(len(ck.model.layers)):
        gate_up, down = _experts_from_oracle(oracle, i, ck.model.layers[i].experts.num_experts)
        replace[f"layers.{i}.experts.gate_up_proj"], replace[f"layers.{i}.experts.down_proj"] = gate_up, down
    plain = _plain_model(_bf16_copy(source, tmp_path / "bf16"), replace)
    V, C = ck.config.text.vocab_size, ck.config.canvas_length
    assert (_logits(ck.model, V, C) - _logits(plain.model, V, C)).abs().max() <= 1e-4


def test_nvfp4_reads_hf_quant_config_json_when_config_json_has_none(nvfp4_release, tmp_path):
    path, _ = nvfp4_release
    dst = tmp_path / "old-export"
    shutil.copytree(path, dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                            "exclude_modules": RELEASE_EXCLUDE}}))
    ck = checkpoint.load(dst, quiet=True)
    assert isinstance(ck.model.layers[0].experts, nvfp4.NVFP4Experts)


def test_fp8_dynamic_dequantizes_bit_for_bit_as_compressed_tensors(fp8_release):
    path, oracle = fp8_release
    ck = checkpoint.load(path, quiet=True)
    for i, layer in enumerate(ck.model.layers):
        q = layer.self_attn.q_proj
        assert isinstance(q, compressed.ChannelFP8Linear) and q.weight_scale.dtype == torch.bfloat16
        want = oracle[f"model.decoder.layers.{i}.self_attn.q_proj"]
        # compressed-tensors rounds the product to the scale's dtype (bf16); the CPU then computes in fp32
        got = compressed.dequantize(q.weight, q.weight_scale, torch.float32)
        assert want.dtype == torch.bfloat16 and torch.equal(_bits(got), _bits(want.float()))
        gate_up, down = layer.experts.weights(torch.float32)
        want_gate_up, want_down = (w.float() for w in _experts_from_oracle(oracle, i, layer.experts.num_experts))
        assert torch.equal(_bits(gate_up), _bits(want_gate_up)) and torch.equal(_bits(down), _bits(want_down))
        assert type(layer.router.proj) is torch.nn.Linear  # ignored, as released
    assert type(ck.model.self_conditioning.gate_proj) is torch.nn.Linear


def test_fp8_dynamic_model_is_the_dequantized_model(fp8_release, source, tmp_path):
    path, oracle = fp8_release
    ck = checkpoint.load(path, quiet=True)
    replace = {}
    for name, w in oracle.items():
        if ".experts." not in name:
            replace[name.removeprefix("model.decoder.") + ".weight"] = w
    for i in range(len(ck.model.layers)):
        gate_up, down = _experts_from_oracle(oracle, i, ck.model.layers[i].experts.num_experts)
        replace[f"layers.{i}.experts.gate_up_proj"], replace[f"layers.{i}.experts.down_proj"] = gate_up, down
    plain = _plain_model(_bf16_copy(source, tmp_path / "bf16"), replace)
    V, C = ck.config.text.vocab_size, ck.config.canvas_length
    assert (_logits(ck.model, V, C) - _logits(plain.model, V, C)).abs().max() <= 1e-4


def test_fp8_dynamic_with_fused_experts_reads_them_as_plain_weights(source, tmp_path):
    """Experts stored fused are not quantized, whatever the config's targets say (tools match per-expert Linears)."""
    path, oracle = _fp8_dynamic(source, tmp_path / "fused", experts_per_expert=False)
    ck = checkpoint.load(path, quiet=True)
    assert type(ck.model.layers[0].experts) is Experts and ck.model.layers[0].experts.gate_up_proj.dtype == torch.float32
    assert isinstance(ck.model.layers[0].mlp.down_proj, compressed.ChannelFP8Linear)
    replace = {name.removeprefix("model.decoder.") + ".weight": w for name, w in oracle.items()}
    plain = _plain_model(_bf16_copy(source, tmp_path / "bf16"), replace)
    V, C = ck.config.text.vocab_size, ck.config.canvas_length
    assert (_logits(ck.model, V, C) - _logits(plain.model, V, C)).abs().max() <= 1e-4


def _edited(path, dst, config=None, drop: str | None = None, retype: str | None = None):
    """A copy of a checkpoint with its quantization_config edited, one tensor dropped or one stored as F32."""
    # the shards are linked, not copied, unless a tensor is edited (then that shard is rewritten in place of its link)
    shutil.copytree(path, dst, copy_function=os.symlink)
    for link in dst.glob("*.json"):
        link.unlink()
        shutil.copy(path / link.name, link)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    for name in (drop, retype):
        if name is None:
            continue
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        shard = dst / index["weight_map"][name]
        tensors = load_file(shard)
        shard.unlink()
        if name == drop:
            del tensors[name], index["weight_map"][name]
        else:
            tensors[name] = tensors[name].float()
        save_file(tensors, shard)
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(quant_algo="FP8"), r"quant_algo 'FP8' is not supported"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=32), r"group_size must be 16"),
    (lambda q: q.update(ignore=RELEASE_EXCLUDE + ["*layers.1.experts.2.*"]),
     r"quantizes some of model.decoder.layers.1.experts's experts but not others"),
    (lambda q: q.update(quant_method="gptq"), r"quantization method 'gptq' is not supported"),
])
def test_nvfp4_configs_dgemma_cannot_run_are_one_line_errors(nvfp4_release, tmp_path, edit, message):
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(_edited(nvfp4_release[0], tmp_path / "c", config=edit), quiet=True)


@pytest.mark.parametrize("edit, message", [
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor"),
     r"config_groups.group_0.weights.strategy is 'tensor'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4, type="int"),
     r"config_groups.group_0.weights.num_bits is 4"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False),
     r"config_groups.group_0.input_activations.dynamic is False"),
    (lambda q: q.update(format="pack-quantized"), r"quantization_config.format 'pack-quantized' is not supported"),
    (lambda q: q.update(quantization_status="frozen"), r"quantization_status 'frozen'"),
])
def test_compressed_tensors_schemes_dgemma_does_not_implement_are_refused(fp8_release, tmp_path, edit, message):
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(_edited(fp8_release[0], tmp_path / "c", config=edit), quiet=True)


def test_missing_or_mistyped_expert_tensors_are_one_line_errors(nvfp4_release, fp8_release, tmp_path):
    name = "model.decoder.layers.2.experts.3.down_proj.weight_scale"
    with pytest.raises(checkpoint.CheckpointError, match=f"missing tensor {name}"):
        checkpoint.load(_edited(nvfp4_release[0], tmp_path / "a", drop=name), quiet=True)
    with pytest.raises(checkpoint.CheckpointError, match=f"tensor {name} is F32, but .* says it is F8_E4M3"):
        checkpoint.load(_edited(nvfp4_release[0], tmp_path / "b", retype=name), quiet=True)
    dense = "model.decoder.layers.0.self_attn.o_proj.weight"
    with pytest.raises(checkpoint.CheckpointError, match=f"tensor {dense} is F32, but .* says it is F8_E4M3"):
        checkpoint.load(_edited(fp8_release[0], tmp_path / "c", retype=dense), quiet=True)


def test_kv_cache_scales_are_noted_not_used(nvfp4_release, tmp_path, capsys):
    ck = checkpoint.load(_edited(nvfp4_release[0], tmp_path / "c", config=lambda q: q.update(
        kv_cache_scheme={"dynamic": False, "num_bits": 8, "type": "float"})))
    assert isinstance(ck.model.layers[0].experts, nvfp4.NVFP4Experts)
    assert "KV-cache scales are not used" in capsys.readouterr().err


def test_exclude_patterns_may_name_the_encoders_copy(nvfp4_release, tmp_path):
    # layer 1's experts excluded by their encoder name: dgemma then wants them unquantized (fused), which this file
    # does not have
    edit = lambda q: q.update(ignore=q["ignore"] + ["model.encoder.language_model.layers.1.experts*"])
    with pytest.raises(checkpoint.CheckpointError, match="missing tensor model.decoder.layers.1.experts.gate_up_proj"):
        checkpoint.load(_edited(nvfp4_release[0], tmp_path / "d", config=edit), quiet=True)


def test_read_only_formats_are_not_written_back(nvfp4_release, tmp_path):
    ck = checkpoint.load(nvfp4_release[0], quiet=True)
    with pytest.raises(checkpoint.CheckpointError, match="does not write them"):
        checkpoint.save(tmp_path / "out", ck.model, ck.config, ck.generation)
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dequantization_on_cuda_matches_the_cpu(nvfp4_release, fp8_release):
    for path in (nvfp4_release[0], fp8_release[0]):
        cpu = checkpoint.load(path, quiet=True)
        gpu = checkpoint.load(path, device="cuda", dtype=torch.float32, quiet=True)
        for a, b in zip(cpu.model.layers, gpu.model.layers):
            for x, y in zip(a.experts.weights(torch.float32), b.experts.weights(torch.float32)):
                assert torch.equal(_bits(x), _bits(y.cpu()))


RSS_SCRIPT = """
import sys
import torch
from dgemma.io import checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

checkpoint.load(sys.argv[2], quiet=True)  # warm up: torch's one-time lazy initialisation is not loading cost
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS:")
ck = checkpoint.load(sys.argv[1], quiet=True)
touched = [int(p.reshape(-1).view(torch.uint8).max()) for p in ck.model.state_dict().values()]  # every page, no copy
peak = status("VmHWM:")
weights = sum(p.numel() * p.element_size() for p in ck.model.state_dict().values())
print((peak - base) / weights)
"""


def test_nvfp4_loading_streams_per_expert_into_packed_tensors(tmp_path, nvfp4_release):
    """1,536 per-expert tensors: peak memory while loading stays near the loaded (packed) model's size,
    so nothing holds all the tensors at once (let alone in fp32)."""
    import subprocess
    import sys

    from dgemma.io.checkpoint import hf_state_dict
    from dgemma.presets import default_generation, preset_config, random_model

    cfg = preset_config("tiny", vocab_size=8_000, hidden_size=512, intermediate_size=512, num_experts=64,
                        moe_intermediate_size=256, num_hidden_layers=2,
                        layer_types=["sliding_attention", "full_attention"])
    model = random_model(cfg)
    out = {k: v.bfloat16() for k, v in hf_state_dict(model).items() if ".experts." not in k}
    g = torch.Generator().manual_seed(0)
    h, i = 512, 256
    for layer in range(2):
        for e in range(64):
            for proj, (rows, cols) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                name = f"model.decoder.layers.{layer}.experts.{e}.{proj}"
                out[name + ".weight"] = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
                out[name + ".weight_scale"] = (torch.rand(rows, cols // 16, generator=g) + 0.5).to(nvfp4.FP8)
                out[name + ".weight_scale_2"] = torch.tensor(1e-3)
                out[name + ".input_scale"] = torch.tensor(1e-2)
    del model
    dst = tmp_path / "big"
    src = tmp_path / "cfg"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg.to_hf()))
    (src / "generation_config.json").write_text(json.dumps(default_generation(cfg).to_hf()))
    qc = json.loads((nvfp4_release[0] / "config.json").read_text())["quantization_config"]
    _write(dst, out, src, qc)
    assert len(out) > 1500
    del out
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(dst), str(nvfp4_release[0])], capture_output=True,
                         text=True, check=True)
    ratio = float(run.stdout.strip())
    print(f"peak RSS while loading: {ratio:.2f}x the loaded weights")
    assert ratio < 1.3, f"peak RSS while loading was {ratio:.2f}x the loaded weights"
