"""The weight-size report (computed from shapes on the meta device) against models actually built, and the 26B
preset's build path run on shapes only."""

from __future__ import annotations

import pytest
import torch

from dgemma.cli import main
from dgemma.presets import build_on_device, preset_config, random_model
from dgemma.quant import fp8, int4
from dgemma.quant.sizes import format_sizes

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _held(model) -> int:
    """Bytes the model holds in parameters and buffers, less the RoPE tables (computed, never saved)."""
    return sum(t.numel() * t.element_size() for name, t in [*model.named_parameters(), *model.named_buffers()]
               if not name.endswith("inv_freq"))


def test_sizes_are_what_built_models_hold_and_save():
    cfg = preset_config("tiny")
    sizes = format_sizes(cfg)
    assert _held(random_model(cfg)) == sizes["fp32"]
    assert _held(random_model(cfg, dtype=torch.bfloat16)) == sizes["bf16"]
    for fmt, transform in (("fp8", fp8), ("int4", int4)):
        model = random_model(cfg, dtype=torch.bfloat16)
        transform.quantize_model(model)
        saved = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert saved == sizes[fmt], fmt
        if fmt == "int4":  # in memory: the CPU-packed codes and (K/g, N, 2) bf16 scales take what is saved
            assert _held(model) == sizes[fmt]
    # NVFP4 quantizes the experts only: 4.5 bits a weight, plus two fp32 scalars a matrix
    t = cfg.text
    experts = t.num_hidden_layers * t.num_experts * 3 * t.hidden_size * t.moe_intermediate_size
    matrices = t.num_hidden_layers * t.num_experts * 3
    assert sizes["nvfp4"] == sizes["bf16"] - 2 * experts + experts * 9 // 16 + 8 * matrices


def test_26b_preset_is_the_release_and_builds_on_shapes_only():
    cfg = preset_config("26b-a4b")
    t = cfg.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_experts, t.top_k_experts, t.moe_intermediate_size,
            t.intermediate_size, t.vocab_size, t.global_head_dim, t.num_global_key_value_heads) == \
        (2816, 30, 128, 8, 704, 2112, 262_144, 512, 2)
    assert t.layer_types.count("full_attention") == 5 and t.layer_types[-1] == "full_attention"
    model = build_on_device(cfg, "meta", torch.bfloat16, "int4")  # allocates nothing
    assert all(p.is_meta for p in model.parameters())
    params = sum(p.numel() for p in build_on_device(cfg, "meta", torch.bfloat16).parameters())
    assert 25e9 < params < 26e9 and abs(params - t.num_parameters()) < 1e-4 * params  # (that count skips norms)
    assert isinstance(model.layers[0].experts, int4.Int4Experts) and model.quantization_config["group_size"] == 64
    sizes = format_sizes(cfg)
    assert sizes["bf16"] == 2 * (params + 2 * t.num_hidden_layers)  # and two layer-scalar buffers per layer
    assert sizes["int4"] < 18e9 and sizes["nvfp4"] < 18e9 < sizes["fp8"]


@pytest.mark.parametrize("quantize", [None, "int4", "fp8", "nvfp4"])
def test_build_on_device_runs(quantize):
    cfg = preset_config("tiny")
    model = build_on_device(cfg, "cpu", torch.float32, quantize)
    cache = model.new_cache(1, 9 + cfg.canvas_length)
    with torch.no_grad():
        model.encode(torch.randint(3, 500, (1, 9)), cache)
        logits = model.denoise(torch.randint(0, 500, (1, cfg.canvas_length)), cache)
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert model.embed_tokens.weight.dtype == torch.float32 and model.full_inv_freq.dtype == torch.float32


def test_bench_sizes_only_prints_the_table(capsys):
    assert main(["bench", "--preset", "tiny", "--sizes-only"]) == 0
    out = capsys.readouterr().out
    assert "dgemma int4 (projections + experts, groups of 32)" in out and "NVIDIA NVFP4" in out


def test_bench_refuses_a_26b_fp32_cpu_run(capsys):
    assert main(["bench", "--preset", "26b-a4b", "--device", "cpu"]) == 2
    assert "101 GB" in capsys.readouterr().err


def test_bench_knows_the_release_presets():
    from dgemma.bench.cli import BENCH_PRESETS
    from dgemma.presets import PRESETS, RELEASE_PRESETS

    assert set(BENCH_PRESETS) == set(PRESETS) | set(RELEASE_PRESETS)


def test_nvfp4_quantize_matrix_picks_the_nearest_e2m1_value_of_each_group():
    """`bench --quantize nvfp4`'s quantizer: dequantized, each weight is the E2M1 value (times its group's scale as
    dequantize rounds it) nearest to it, and the largest weight of the matrix lands on 6 x 448 x scale_2."""
    from dgemma.quant import nvfp4

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, scale, scale_2 = nvfp4.quantize_matrix(w)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 32) and scale.shape == (32, 4)
    assert torch.isclose(scale_2 * 6 * 448, w.abs().max())
    deq = nvfp4.dequantize(packed, scale, scale_2, torch.float32)
    block = (scale.float() * scale_2).repeat_interleave(nvfp4.GROUP, dim=1)  # (32, 64)
    candidates = torch.tensor(nvfp4.E2M1_VALUES) * block[..., None]  # (32, 64, 16)
    nearest = candidates.gather(-1, (candidates - w[..., None]).abs().argmin(-1, keepdim=True))[..., 0]
    assert torch.equal(deq, nearest)



def test_build_on_device_frees_each_dense_module_before_making_the_next(monkeypatch):
    """The build's peak beyond the finished model is one module's dense weights: when a layer's experts are
    quantized, every earlier layer's dense experts are already gone."""
    import gc
    import weakref

    seen: list[weakref.ref] = []
    quantize = int4.Int4Experts.quantize.__func__

    def watched(cls, experts, group_size):
        gc.collect()
        assert all(ref() is None for ref in seen), "an earlier layer's dense experts are still alive"
        seen.append(weakref.ref(experts))
        return quantize(cls, experts, group_size)

    monkeypatch.setattr(int4.Int4Experts, "quantize", classmethod(watched))
    build_on_device(preset_config("tiny", num_hidden_layers=3, layer_types=["sliding_attention"] * 2 +
                                  ["full_attention"]), "cpu", torch.float32, "int4")
    assert len(seen) == 3
