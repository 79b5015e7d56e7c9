"""Small building blocks of the text stack: RMSNorm, the gated-GELU MLP and rotary embeddings."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32; `with_scale=False` is the scale-free variant (v-norm, router, post-norm)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == torch.bfloat16:
            # one fused kernel (fp32 inside) instead of ~8 small ones: bf16 is not bit-exact with anything anyway
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        # pow(-0.5) rather than rsqrt: it matches the reference bit for bit on CPU.
        out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    """down(gelu(gate(x)) * up(x)): the dense MLP of every layer and of the self-conditioning block."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Standard RoPE frequencies over the whole head."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def proportional_inv_freq(head_dim: int, theta: float, partial_rotary_factor: float) -> torch.Tensor:
    """Proportional RoPE: the first `factor * head_dim / 2` frequencies rotate, with exponents over the *whole*
    head_dim; the remaining frequencies are zero (those dimensions pass through unrotated)."""
    rope_angles = int(partial_rotary_factor * head_dim // 2)
    rotated = 1.0 / (theta ** (torch.arange(0, 2 * rope_angles, 2, dtype=torch.int64).float() / head_dim))
    return torch.cat([rotated, torch.zeros(head_dim // 2 - rope_angles)])


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) or (B, T) -> cos, sin of shape (..., T, head_dim), in the half-split layout."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # (..., T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, nh, hd); cos/sin (T, hd) or (B, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)
