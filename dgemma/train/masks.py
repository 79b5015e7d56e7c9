"""Training attention masks, as named functions. All return bool tensors where True means "may attend".

Training runs the encoder once over the whole clean sequence and the decoder over one noisy canvas per example,
reading the encoder's K/V. The decoder's keys are laid out as [encoder keys (L) ; canvas keys (C)]. The masks
reproduce, for every query, exactly the keys that inference (dgemma/model/masks.py with the KV cache) shows it.
"""

from __future__ import annotations

import torch


def encoder_training_mask(seq_len: int, window: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Causal mask over a right-padded clean sequence: query q sees key s iff s <= q and, for sliding layers,
    s > q - window. -> (1, 1, L, L).

    Rows are right-padded, so a real query never sees a pad key; pad queries see real keys and themselves (no
    empty row) and are left out of the loss."""
    q = torch.arange(seq_len, device=device)[:, None]  # (L, 1)
    s = torch.arange(seq_len, device=device)[None, :]  # (1, L)
    allowed = s <= q
    if window is not None:
        allowed &= s > q - window
    return allowed[None, None]


def block_diffusion_decoder_mask(canvas_starts: torch.Tensor, seq_len: int, canvas_length: int,
                                 window: int | None) -> torch.Tensor:
    """Mask of the noisy canvas b of each example over the keys [encoder keys (L) ; canvas keys (C)].

    canvas_starts (B,): the slot where canvas b begins (prompt length + b * canvas_length). Every canvas query
    sees:
      1. the encoder keys before the canvas (the prompt and the clean canvases 0..b-1), i.e. slots s < start;
         sliding layers (window given) only the last window - 1 of them, s >= start - (window - 1), the rule of
         `sliding_kv_start` at inference;
      2. the whole canvas, bidirectionally.
    Encoder keys at and after the canvas start (the clean canvas b itself, later canvases, padding) are hidden.
    -> (B, 1, C, L + C); the same row for every canvas query.
    """
    B = canvas_starts.shape[0]
    s = torch.arange(seq_len, device=canvas_starts.device)[None, :]  # (1, L)
    start = canvas_starts[:, None]  # (B, 1)
    context = s < start
    if window is not None:
        context &= s >= start - (window - 1)
    canvas = torch.ones(B, canvas_length, dtype=torch.bool, device=canvas_starts.device)
    row = torch.cat([context, canvas], dim=1)  # (B, L + C)
    return row[:, None, None, :].expand(B, 1, canvas_length, seq_len + canvas_length)


def reference_decoder_mask(canvas_starts: list[int], seq_len: int, canvas_length: int,
                           window: int | None) -> torch.Tensor:
    """Slow cell-by-cell statement of the decoder rule, for tests. Walks every (query, key) pair and asks, in
    inference terms: is this key in the cache range the sliding/full layer reads when the canvas is denoised
    after `start` committed tokens, or is it a canvas key?"""
    B, C, L = len(canvas_starts), canvas_length, seq_len
    out = torch.zeros(B, 1, C, L + C, dtype=torch.bool)
    for b, start in enumerate(canvas_starts):
        first = 0 if window is None else max(0, start - (window - 1))
        for q in range(C):
            for key in range(L + C):
                if key >= L:
                    out[b, 0, q, key] = True  # canvas key
                else:
                    out[b, 0, q, key] = first <= key < start  # committed context the cache holds
    return out


def reference_encoder_mask(seq_len: int, window: int | None) -> torch.Tensor:
    """Slow cell-by-cell causal (sliding) mask, for tests."""
    out = torch.zeros(1, 1, seq_len, seq_len, dtype=torch.bool)
    for q in range(seq_len):
        for s in range(seq_len):
            out[0, 0, q, s] = s <= q and (window is None or s > q - window)
    return out
