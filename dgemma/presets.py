"""Model presets with random weights, for tests, benchmarks and training from scratch."""

from __future__ import annotations

import torch
from torch import nn

from .config import FULL, SLIDING, ConfigError, GenerationConfig, ModelConfig, TextConfig
from .model import DiffusionGemma
from .model.moe import Experts


def _layers(n: int, full_every: int) -> list[str]:
    return [FULL if (i + 1) % full_every == 0 or i == n - 1 else SLIDING for i in range(n)]


PRESETS: dict[str, dict] = {
    # a few hundred thousand parameters: unit tests and smoke runs
    "tiny": dict(text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                           num_global_key_value_heads=1, sliding_window=64, num_experts=4, top_k_experts=2,
                           moe_intermediate_size=32, layer_types=_layers(2, 2), max_position_embeddings=8192),
                 canvas_length=32),
    # ~40M active parameters, canvas 256, 8 experts top-2, vocab 32k
    "small": dict(text=dict(vocab_size=32_000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
                            num_global_key_value_heads=2, sliding_window=512, num_experts=8, top_k_experts=2,
                            moe_intermediate_size=384, layer_types=_layers(8, 4), max_position_embeddings=32_768),
                  canvas_length=256),
    # ~200M active parameters
    "medium": dict(text=dict(vocab_size=32_000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=64, global_head_dim=128,
                             num_global_key_value_heads=2, sliding_window=1024, num_experts=16, top_k_experts=2,
                             moe_intermediate_size=1024, layer_types=_layers(12, 6), max_position_embeddings=32_768),
                   canvas_length=256),
}

# Shapes of released models, for `dgemma bench` and the size report only (not for training from scratch):
RELEASE_PRESETS: dict[str, dict] = {
    # DiffusionGemma 26B-A4B, the release's text stack (TextConfig's defaults are its shapes): 30 layers, hidden
    # 2816, 16 heads / 8 KV (head_dim 256; full layers 512 with 2 KV heads), 128 experts top-8 of 704 beside a 2112
    # dense MLP, vocab 262,144. Too big to build on a CPU in fp32: `build_on_device` makes it where it runs.
    "26b-a4b": dict(text=dict(), canvas_length=256),
}


def preset_config(name: str, **text_overrides) -> ModelConfig:
    presets = {**PRESETS, **RELEASE_PRESETS}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
    spec = presets[name]
    text = dict(spec["text"])
    canvas_length = text_overrides.pop("canvas_length", spec["canvas_length"])
    text.update(text_overrides)
    return ModelConfig(text=TextConfig(**text), canvas_length=canvas_length)


INIT_STD = 0.02  # the reference's initializer_range: normal(0, 0.02) for a fresh model's matrices


@torch.no_grad()
def init_weights(model: DiffusionGemma, std: float = INIT_STD, seed: int | None = 0) -> DiffusionGemma:
    """Initialise like the reference: normal(0, std) for projections, embeddings and experts; ones for norm
    scales, router scales and layer scalars."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(generator=gen).mul_(std)  # = randn(shape) * std, bit for bit, without two temporaries
        else:
            p.fill_(1.0)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.fill_(1.0)
    return model


def random_model(config: ModelConfig, std: float = INIT_STD, seed: int | None = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> DiffusionGemma:
    model = DiffusionGemma(config.text, config.canvas_length)
    init_weights(model, std, seed)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def build_on_device(config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                    quantize: str | None = None, std: float = INIT_STD, seed: int = 0) -> DiffusionGemma:
    """A random-weight model built where it will run: the modules are made on the meta device, then each one is
    materialised on `device` in `dtype`, filled like init_weights (normal(0, std) matrices, ones elsewhere). With
    `quantize` ("fp8", "int4", or "nvfp4": the experts only), each module to quantize is made in bf16 and quantized
    before the next is made, so the peak beyond the finished model is one module's bf16 weights (a layer's experts,
    1.5 GB at the release's shapes); the rest is made last, in `dtype`.

    On device="meta" nothing is allocated: the same steps run on shapes only (the tests check the 26B path so)."""
    from .quant import fp8, int4, nvfp4
    from .runtime import release_free_memory

    device = torch.device(device)
    with torch.device("meta"):
        model = DiffusionGemma(config.text, config.canvas_length)
    gen = None if device.type == "meta" else torch.Generator(device).manual_seed(seed)

    def materialise(module: nn.Module, made_in: torch.dtype = dtype) -> None:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_meta:
                    t = torch.empty(p.shape, dtype=made_in, device=device)
                    t.normal_(generator=gen).mul_(std) if t.ndim >= 2 else t.fill_(1.0)
                    sub._parameters[name] = nn.Parameter(t, requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_meta:
                    sub._buffers[name] = torch.ones(b.shape, dtype=dtype, device=device)  # the layer scalars

    if quantize is not None:
        if quantize not in ("fp8", "int4", "nvfp4"):
            raise ConfigError(f"quantize must be 'fp8', 'int4' or 'nvfp4', got {quantize!r}")
        size = int4.pick_group_size(model) if quantize == "int4" else fp8.pick_block(model)
        targets = fp8.quantized_projections(model, True)
        while targets:  # popped, not iterated: a list holding every dense module would keep them all alive
            parent, name, module = targets.pop(0)
            if quantize == "nvfp4" and not isinstance(module, Experts):
                continue  # as NVIDIA's release: the experts only
            materialise(module, torch.bfloat16)  # only until it is quantized: half an fp32 layer's transient
            if quantize == "nvfp4":
                new = nvfp4.NVFP4Experts.quantize(module)
            elif quantize == "int4":
                new = (int4.Int4Experts.quantize(module, size) if isinstance(module, Experts)
                       else int4.Int4Linear.quantize(module, size))
            else:
                new = fp8.FP8Experts(module, (size, size)) if isinstance(module, Experts) else \
                    fp8.FP8Linear(module, (size, size))
            setattr(parent, name, new)
            del module
            if device.type == "cpu":  # hand the dense weights' freed pages back before the next module is made
                release_free_memory()
        model.quantization_config = (int4.make_config(size, True) if quantize == "int4" else
                                     {"quant_method": nvfp4.QUANT_METHOD, "quant_algo": "NVFP4"}
                                     if quantize == "nvfp4" else
                                     {"quant_method": fp8.QUANT_METHOD, "activation_scheme": "dynamic",
                                      "weight_block_size": [size, size], "modules_to_not_convert": fp8.NOT_CONVERTED})
        model.cuda_graph_capturable = quantize != "int4"  # int4 experts read their token counts on the host
    materialise(model)
    if device.type != "meta":
        model.reset_rope(device)
    return model.eval()


def default_generation(config: ModelConfig) -> GenerationConfig:
    return GenerationConfig(eos_token_id=list(config.text.eos_token_id), pad_token_id=config.text.pad_token_id)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
