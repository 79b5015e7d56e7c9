"""What a model's weights take in each format dgemma reads, computed from its tensor shapes on the meta device.

    sizes = format_sizes(preset_config("26b-a4b"))   # {"bf16": bytes, "fp8": bytes, ...}; nothing is allocated

dgemma's own formats (block FP8, int4) are counted by running their transforms on a meta model and summing the
state dict they would save, so the count is the transform's, not a second description of it. The two formats dgemma
only reads are counted from their stored layouts (see nvfp4.py and compressed.py):

- NVIDIA ModelOpt NVFP4: each expert's gate, up and down matrix as U8 (N, K/2), an F8_E4M3 scale per 16 weights,
  and two F32 scalars; everything else bf16.
- compressed-tensors FP8-dynamic: every attention and dense-MLP projection and each expert's matrices as F8_E4M3
  with one bf16 scale per output row; self-conditioning, embeddings, routers and norms bf16.

Every count is the text stack's weights as held in memory (the tied embedding once). The vision tower and the
KV cache come on top; `kv_cache_bytes` sizes the cache.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model.moe import Experts

FORMATS = ("fp32", "bf16", "fp8", "compressed-fp8", "nvfp4", "int4")
DESCRIPTIONS = {
    "fp32": "fp32 (dgemma's CPU compute dtype)",
    "bf16": "bf16 (the release)",
    "fp8": "dgemma block FP8 (projections + experts, {block}x{block} blocks)",
    "compressed-fp8": "compressed-tensors FP8-dynamic (projections + experts, per-row scales)",
    "nvfp4": "NVIDIA NVFP4 (experts only, as NVIDIA's release)",
    "int4": "dgemma int4 (projections + experts, groups of {group})",
}


def meta_model(config: ModelConfig):
    from ..model import DiffusionGemma

    with torch.device("meta"):
        return DiffusionGemma(config.text, config.canvas_length)


def _nbytes(state: dict[str, torch.Tensor], dense_bytes: int) -> int:
    """Quantized tensors at their own element size, every other floating tensor at `dense_bytes` per element."""
    total = 0
    for name, t in state.items():
        quantized = (not t.is_floating_point() or t.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv")
                     or t.dtype == torch.bfloat16 and name.endswith(("_scale", "_zero")))
        total += t.numel() * (t.element_size() if quantized else dense_bytes)
    return total


def _expert_matrices(config: ModelConfig) -> list[tuple[int, int]]:
    """(N, K) of every expert matrix, one expert at a time: gate (I, H), up (I, H), down (H, I) per expert."""
    t = config.text
    h, i = t.hidden_size, t.moe_intermediate_size
    return [(i, h), (i, h), (h, i)] * t.num_experts * t.num_hidden_layers


def _projection_matrices(model) -> list[tuple[int, int]]:
    """(N, K) of every attention and dense-MLP projection (not self-conditioning)."""
    out = []
    for layer in model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m = getattr(layer.self_attn, name)
            if m is not None:
                out.append(tuple(m.weight.shape))
        for name in ("gate_proj", "up_proj", "down_proj"):
            out.append(tuple(getattr(layer.mlp, name).weight.shape))
    return out


def format_sizes(config: ModelConfig, int4_group: int | None = None, fp8_block: int | None = None) -> dict[str, int]:
    """Bytes of the text stack's weights in each of FORMATS (nothing allocated)."""
    from . import fp8, int4

    model = meta_model(config)
    dense = {k: v for k, v in model.state_dict().items()}
    sizes = {"fp32": _nbytes(dense, 4), "bf16": _nbytes(dense, 2)}
    expert_params = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in model.modules()
                        if isinstance(m, Experts))
    experts = _expert_matrices(config)
    assert sum(n * k for n, k in experts) == expert_params
    # NVFP4: experts 4-bit + an FP8 scale per 16 + two fp32 scalars per matrix; the rest bf16
    sizes["nvfp4"] = (sizes["bf16"] - 2 * expert_params
                      + sum(n * k // 2 + n * k // 16 + 8 for n, k in experts))
    # compressed-tensors FP8-dynamic: projections and experts FP8 with a bf16 scale per output row
    quantized = _projection_matrices(model) + experts
    sizes["compressed-fp8"] = (sizes["bf16"] - 2 * sum(n * k for n, k in quantized)
                               + sum(n * k + 2 * n for n, k in quantized))
    q = meta_model(config)
    fp8.quantize_model(q, fp8_block)
    sizes["fp8"] = _nbytes(q.state_dict(), 2)
    sizes["fp8_block_size"] = q.quantization_config["weight_block_size"][0]
    q = meta_model(config)
    int4.quantize_model(q, int4_group)
    sizes["int4"] = _nbytes(q.state_dict(), 2)
    sizes["int4_group_size"] = q.quantization_config["group_size"]
    return sizes


def kv_cache_bytes(config: ModelConfig, tokens: int, dtype: torch.dtype = torch.bfloat16, rows: int = 1) -> int:
    """The KV cache generate() allocates for `tokens` positions (prompt + canvases), sized on the meta device."""
    from ..cache import KVCache

    return KVCache(config.text, rows, tokens, dtype, "meta").nbytes()


def print_sizes(name: str, config: ModelConfig, sizes: dict[str, int], context: int, limit_gb: float = 18.0) -> None:
    kv = kv_cache_bytes(config, context)
    params = config.text.num_parameters()
    print(f"{name}: {params / 1e9:.2f}B text parameters ({config.text.num_parameters(active=True) / 1e9:.2f}B "
          f"active); weights as held in memory, text stack only (no vision tower)")
    print(f"KV cache for {context} tokens at batch 1 in bf16: {kv / 1e9:.2f} GB")
    print(f"{'format':72s} {'weights GB':>10s} {'GiB':>7s} {'+KV GB':>7s} {'x bf16':>7s}  fits {limit_gb:g} GB")
    for fmt in FORMATS:
        desc = DESCRIPTIONS[fmt].format(group=sizes["int4_group_size"], block=sizes["fp8_block_size"])
        b = sizes[fmt]
        fits = "yes" if (b + kv) / 1e9 <= limit_gb else "no"
        print(f"{desc:72s} {b / 1e9:10.2f} {b / 2**30:7.2f} {(b + kv) / 1e9:7.2f} {b / sizes['bf16']:7.3f}  {fits}")
