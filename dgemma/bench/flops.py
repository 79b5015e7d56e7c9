"""The cost model of one denoising step: the matmul FLOPs it must do and the bytes it must move at least."""

from __future__ import annotations

from ..config import TextConfig


def decoder_step_flops(text: TextConfig, canvas: int, context: int, self_conditioned: bool = True) -> float:
    """Matmul FLOPs of one decoder pass over a canvas with `context` cached tokens (per sequence)."""
    h, c = text.hidden_size, canvas
    total = 0.0
    for i in range(text.num_hidden_layers):
        hd, kv = text.layer_head_dim(i), text.layer_kv_heads(i)
        nh = text.num_attention_heads
        proj = h * nh * hd * 2 + h * kv * hd * (2 if text.is_sliding(i) else 1)
        keys = (min(context, text.sliding_window - 1) if text.is_sliding(i) else context) + c
        total += 2 * c * proj + 2 * 2 * c * keys * nh * hd
        total += 2 * c * 3 * h * text.intermediate_size
        total += 2 * c * (text.top_k_experts * 3 * h * text.moe_intermediate_size + h * text.num_experts)
    total += 2 * c * h * text.vocab_size  # tied head
    if self_conditioned:
        total += 2 * c * text.vocab_size * h + 2 * c * 3 * h * text.intermediate_size  # soft embedding + SC MLP
    return total


def decoder_step_bytes(text: TextConfig, weights_bytes: int, context: int, batch_size: int, dtype_bits: int) -> int:
    """Bytes one denoising step must move at least: every weight once (a 256-token canvas reaches every expert)
    and the cached K/V each sequence attends over."""
    kv_elements = 0
    for i in range(text.num_hidden_layers):
        keys = min(context, text.sliding_window) if text.is_sliding(i) else context
        kv_elements += 2 * keys * text.layer_kv_heads(i) * text.layer_head_dim(i)
    return weights_bytes + kv_elements * batch_size * dtype_bits // 8
