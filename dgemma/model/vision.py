"""The Gemma 4 vision tower and `embed_vision`: image patches -> soft tokens in the text model's embedding space.

Module and parameter names follow the released checkpoint under `model.encoder.` (`vision_tower.*`,
`embed_vision.*`), so loading is a prefix strip. One image at a time, without padding patches: the reference pads
every image to the processor's patch budget and masks the padding out of attention and pooling, which gives the
same features for the real patches.

The tower, per image (numbers reused in the code):
  1. Patch embedding: input_proj(2 * (pixels - 0.5)) plus learned x and y position embeddings.
  2. Bidirectional encoder layers: attention (q/k RMSNorm, a scale-free v-norm, scaling 1.0, 2-D RoPE: the first
     half of each head rotates with the patch's x, the second half with its y), then a gated-GELU MLP; pre and
     post norms around both.
  3. Pooling: average each k x k block of patches (k = pooling_kernel_size) into one soft token, times
     sqrt(hidden), in fp32; then the optional standardisation (std_bias, std_scale).
  4. embed_vision: a scale-free RMSNorm and a linear projection to the text hidden size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import VisionConfig
from .layers import RMSNorm, gelu_tanh


class ClippableLinear(nn.Module):
    """A bias-free linear layer whose input and output are clamped to stored bounds when the config asks for it
    (`use_clipped_linears`); the weight lives at `.linear.weight` as in the release."""

    def __init__(self, config: VisionConfig, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = config.use_clipped_linears
        if self.clipped:
            for name in ("input_min", "output_min"):
                self.register_buffer(name, torch.tensor(-float("inf")))
            for name in ("input_max", "output_max"):
                self.register_buffer(name, torch.tensor(float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, config.hidden_size))

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """pixels (P, 3*p*p) in [0, 1]; positions (P, 2) as (x, y) -> (P, D)."""
        # 1. the model, not the processor, maps pixels to [-1, 1]
        x = self.input_proj((2 * (pixels - 0.5)).to(self.input_proj.weight.dtype))
        table = self.position_embedding_table
        return x + (table[0][positions[:, 0]] + table[1][positions[:, 1]])


def axial_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions (P, 2) -> cos, sin (P, head_dim) laid out [x, x, y, y]: each half of a head is a half-split RoPE
    of one axis."""
    fx = positions[:, 0, None].float() * inv_freq  # (P, hd/4)
    fy = positions[:, 1, None].float() * inv_freq
    cos = torch.cat([fx.cos(), fx.cos(), fy.cos(), fy.cos()], dim=-1)
    sin = torch.cat([fx.sin(), fx.sin(), fy.sin(), fy.sin()], dim=-1)
    return cos.to(dtype), sin.to(dtype)


def _rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (P, nh, hd); cos/sin (P, hd). The x half and the y half of each head rotate separately."""
    half = x.shape[-1] // 2
    c, s = cos[:, None], sin[:, None]
    return torch.cat([_rope_half(x[..., :half], c[..., :half], s[..., :half]),
                      _rope_half(x[..., half:], c[..., half:], s[..., half:])], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.q_proj = ClippableLinear(config, h, self.num_heads * self.head_dim)
        self.k_proj = ClippableLinear(config, h, self.num_kv_heads * self.head_dim)
        self.v_proj = ClippableLinear(config, h, self.num_kv_heads * self.head_dim)
        self.o_proj = ClippableLinear(config, self.num_heads * self.head_dim, h)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.v_norm = RMSNorm(self.head_dim, eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (P, D) -> (P, D); every patch sees every patch of its image."""
        P = x.shape[0]
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(P, self.num_heads, self.head_dim)), cos, sin)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(P, self.num_kv_heads, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(P, self.num_kv_heads, self.head_dim))
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, P, hd)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out[0].transpose(0, 1).reshape(P, self.num_heads * self.head_dim))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.gate_proj = ClippableLinear(config, config.hidden_size, config.intermediate_size)
        self.up_proj = ClippableLinear(config, config.hidden_size, config.intermediate_size)
        self.down_proj = ClippableLinear(config, config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(config) for _ in range(config.num_hidden_layers)])


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        half = self.config.head_dim // 2  # each half of a head is one axis's RoPE
        with torch.device(device or "cpu"):
            inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One image: pixels (P, 3*p*p), positions (P, 2) long, a full grid of patches in raster order ->
        soft tokens (P / k^2, D) in fp32 (before embed_vision)."""
        x = self.patch_embedder(pixels, positions)  # 1.
        cos, sin = axial_cos_sin(positions, self.inv_freq, x.dtype)
        for layer in self.encoder.layers:  # 2.
            x = layer(x, cos, sin)
        # 3. average pooling of k x k patch blocks, in fp32, indexed by each patch's (x, y)
        k = self.config.pooling_kernel_size
        width = int(positions[:, 0].max()) + 1
        block = positions[:, 0] // k + (width // k) * (positions[:, 1] // k)  # (P,)
        num_tokens = positions.shape[0] // (k * k)
        pooled = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        pooled.index_add_(0, block, x.float() / (k * k))
        pooled = pooled * self.config.hidden_size**0.5
        if self.config.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled


class VisionEmbedder(nn.Module):
    """Soft tokens -> the text model's embedding space: a scale-free RMSNorm, then a projection."""

    def __init__(self, config: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(config.hidden_size, text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class Vision(nn.Module):
    """The tower and its projection, named as under the release's `model.encoder.`."""

    def __init__(self, config: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config)
        self.embed_vision = VisionEmbedder(config, text_hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_vision.embedding_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_vision.embedding_projection.weight.device

    @torch.inference_mode()
    def features(self, images: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """[(pixels (P_i, 3*p*p), positions (P_i, 2))] -> every image's soft tokens in the text embedding space,
        concatenated in order: (sum_i P_i / k^2, H_text), in the model's dtype."""
        out = []
        size = self.config.position_embedding_size
        for pixels, positions in images:
            if int(positions.max()) >= size:  # the reference fails here too (an index past its table)
                raise ValueError(f"an image {int(positions.max()) + 1} patches wide or high is past this tower's "
                                 f"{size} position embeddings")
            pixels = pixels.to(self.device, self.dtype)
            soft = self.vision_tower(pixels, positions.to(self.device))
            out.append(self.embed_vision(soft.to(self.dtype)))  # 4.
        return torch.cat(out)
