"""Attention masks, as named functions. All return bool tensors where True means "may attend".

Slots are cache indices; a token's RoPE position equals its slot (left padding occupies slots too, and RoPE only
sees position differences, so a left-padded row computes what the unpadded row would, up to rounding).
"""

from __future__ import annotations

import torch


def encoder_mask(valid: torch.Tensor, q_start: int, q_len: int, kv_start: int, window: int | None) -> torch.Tensor:
    """Causal mask for `q_len` new tokens at slots [q_start, q_start+q_len) over keys at [kv_start, q_start+q_len).

    A query at slot q sees key s when s <= q, the key is not padding, and (sliding layers) s > q - window.
    A padding query also sees itself, so no row is empty (an empty row would put NaN into its K/V).
    valid (B, capacity) -> mask (B, 1, q_len, kv_len).
    """
    q = torch.arange(q_start, q_start + q_len, device=valid.device)[:, None]  # (T, 1)
    s = torch.arange(kv_start, q_start + q_len, device=valid.device)[None, :]  # (1, S)
    allowed = s <= q
    if window is not None:
        allowed = allowed & (s > q - window)
    mask = allowed[None] & valid[:, None, kv_start:q_start + q_len]  # (B, T, S)
    return (mask | (s == q)[None])[:, None]


def decoder_mask(valid: torch.Tensor, cache_len: int, canvas_len: int, kv_start: int) -> torch.Tensor | None:
    """Bidirectional mask for a canvas at slots [cache_len, cache_len+canvas_len) over keys [kv_start, end).

    The canvas sees every non-padding cached key in range and all of itself. Returns None when nothing is masked,
    so attention can take its unmasked fast path. valid (B, capacity) -> (B, 1, 1, S) or None.
    """
    keys_valid = valid[:, kv_start:cache_len]
    if bool(keys_valid.all()):
        return None
    canvas = torch.ones(valid.shape[0], canvas_len, dtype=torch.bool, device=valid.device)
    return torch.cat([keys_valid, canvas], dim=1)[:, None, None, :]


def sliding_kv_start(cache_len: int, window: int) -> int:
    """First cached slot a sliding layer reads when appending at `cache_len`: the last `window - 1` cached tokens
    (each new token then sees at most `window` keys including itself)."""
    return max(0, cache_len - (window - 1))
