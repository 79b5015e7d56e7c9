"""Attention with q/k RMSNorm, a scale-free v-norm and scaling 1.0.

Sliding layers have their own `v_proj`. Full layers use `global_head_dim` and K doubles as V: the value is the
k_proj output before k_norm and RoPE, passed through the v-norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import TextConfig
from .layers import RMSNorm, apply_rope


@dataclass
class RowSpans:
    """A mask over rows whose key ranges differ (the serving engine's rows, at different cache lengths), with each
    row's own range [start, end) within the attended keys: the keys the row attends over when it runs alone.

    On a CPU, attention then runs row by row over those ranges, so each row's keys are laid out as they are alone
    and the kernel rounds as it does alone. (PyTorch's CPU flash kernel sums over keys in vector lanes by their
    index: a row's keys shifted, or followed by masked keys past a lane boundary, are summed in another order, about
    2e-6 off on an AVX-512 CPU, enough to move a sample.)"""

    mask: torch.Tensor  # (R, 1, T or 1, S), True = attend
    spans: list[tuple[int, int]]


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_sliding = config.is_sliding(layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.layer_kv_heads(layer_idx)
        self.head_dim = config.layer_head_dim(layer_idx)
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False) if self.is_sliding else None
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, config.rms_norm_eps, with_scale=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, H) -> q (B, nh, T, hd), k and v (B, nkv, T, hd)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim))
        q = apply_rope(q, cos, sin).transpose(1, 2)
        k_raw = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v_raw = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        v = self.v_norm(v_raw).transpose(1, 2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | RowSpans | None) -> torch.Tensor:
        """q (B, nh, T, hd); k, v (B, nkv, S, hd); mask bool (B or 1, 1, T, S), True = attend, or RowSpans (each
        row over its own keys). -> (B, T, H)."""
        B, _, T, _ = q.shape
        if isinstance(mask, RowSpans):
            out = torch.cat([self.sdpa(q[r:r + 1], k[r:r + 1, :, a:b], v[r:r + 1, :, a:b],
                                         mask.mask[r:r + 1, :, :, a:b].contiguous())
                             for r, (a, b) in enumerate(mask.spans)])
        else:
            out = self.sdpa(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))  # (B, T, H)

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Scaled dot-product attention (scale 1.0) of q (B, nh, T, hd) over k, v (B, nkv, S, hd) -> (B, nh, T, hd)."""
        B = q.shape[0]
        groups = self.num_heads // self.num_kv_heads
        if mask is not None and groups > 1:
            # With a mask, expand K/V to every query head (as the reference does in this case) rather than
            # `enable_gqa`: the kernels round differently, and sampling is sensitive to the last bit.
            k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(B, self.num_heads, k.shape[2], k.shape[3])
            v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(B, self.num_heads, v.shape[2], v.shape[3])
            groups = 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=groups > 1)
