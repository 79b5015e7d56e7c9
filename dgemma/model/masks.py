"""Attention masks, as named functions. All return bool tensors where True means "may attend".

Slots are cache indices; a token's RoPE position equals its slot (left padding occupies slots too, and RoPE only
sees position differences, so a left-padded row computes what the unpadded row would, up to rounding). Each row
may have its own length: `starts` holds, per row, the slot where the new tokens go.
"""

from __future__ import annotations

import torch


def encoder_mask(valid: torch.Tensor, starts: torch.Tensor, q_len: int, kv_start: int, kv_end: int,
                 window: int | None) -> torch.Tensor:
    """Causal mask for `q_len` new tokens per row at slots [start, start+q_len), over keys [kv_start, kv_end).

    A query at slot q sees key s when s <= q, the key is not padding, and (sliding layers) s > q - window.
    A padding query also sees itself, so no row is empty (an empty row would put NaN into its K/V).
    valid (R, capacity), starts (R,) -> mask (R, 1, q_len, kv_end - kv_start).
    """
    q = (starts[:, None] + torch.arange(q_len, device=valid.device))[:, :, None]  # (R, T, 1)
    s = torch.arange(kv_start, kv_end, device=valid.device)[None, None, :]  # (1, 1, S)
    allowed = (s <= q) & valid[:, None, kv_start:kv_end]
    if window is not None:
        allowed = allowed & (s > q - window)
    return (allowed | (s == q))[:, None]


def open_image_blocks(mask: torch.Tensor, groups: torch.Tensor, starts: torch.Tensor, kv_start: int) -> torch.Tensor:
    """An encoder mask with each image's soft tokens also seeing each other (use_bidirectional_attention "vision").

    mask (R, 1, T, S) over keys [kv_start, ...); groups (R, T) the image index of each new token, -1 for text;
    starts (R,) the slot of each row's first new token. Returns a new mask."""
    same = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] >= 0)  # (R, T, T)
    mask = mask.clone()
    T = groups.shape[1]
    for r, start in enumerate(starts.tolist()):  # a prompt's prefill only
        at = start - kv_start
        mask[r, 0, :, at:at + T] |= same[r]
    return mask


def decoder_mask(valid: torch.Tensor, starts: torch.Tensor, canvas_len: int, kv_start: int, kv_end: int,
                 window: int | None) -> torch.Tensor:
    """Bidirectional mask for each row's canvas at slots [start, start+canvas_len), over keys [kv_start, kv_end).

    The canvas sees all of itself and every non-padding cached key before it; sliding layers see only the last
    `window - 1` cached slots. valid (R, capacity), starts (R,) -> (R, 1, 1, S)."""
    s = torch.arange(kv_start, kv_end, device=valid.device)[None, :]  # (1, S)
    start = starts[:, None]  # (R, 1)
    cached = (s < start) & valid[:, kv_start:kv_end]
    if window is not None:
        cached = cached & (s >= start - (window - 1))
    canvas = (s >= start) & (s < start + canvas_len)
    return (cached | canvas)[:, None, None, :]


def sliding_kv_start(cache_len: int, window: int) -> int:
    """First cached slot a sliding layer reads when appending at `cache_len`: the last `window - 1` cached tokens
    (each new token then sees at most `window` keys including itself)."""
    return max(0, cache_len - (window - 1))


def row_key_starts(lengths: list[int], window: int) -> dict[bool, list[int]]:
    """Keyed by is_sliding: the first cached slot each row attends when it runs alone, appending at its length."""
    return {True: [sliding_kv_start(n, window) for n in lengths], False: [0] * len(lengths)}
