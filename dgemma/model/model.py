"""The DiffusionGemma text model: one shared Gemma-4 stack run in two modes.

- encode(tokens, cache): causal over the cache plus the new tokens; appends their K/V to the cache.
- denoise(canvas, cache, self_cond_logits): bidirectional over the cached K/V plus the canvas; reads the cache and
  leaves it as it was. Returns soft-capped logits (B, C, V) in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..cache import KVCache
from ..config import TextConfig
from .attention import Attention, RowSpans
from .layers import GatedMLP, RMSNorm, default_inv_freq, proportional_inv_freq, rope_cos_sin
from .masks import decoder_mask, encoder_mask, open_image_blocks, row_key_starts
from .moe import Experts, Router

# (layer_idx, is_sliding, k, v) -> (keys, values) the layer attends over
KVUpdate = Callable[[int, bool, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ForwardPlan:
    """What a forward pass needs besides its tokens, fixed by the rows' cache lengths (as nano-vllm's Context):
    RoPE positions ((T,) in lockstep, else (R, T)), attention masks keyed by is_sliding (None: all visible), the
    K/V writer, the cache rows, and the attended key range [kv_start[is_sliding], kv_end). `spans`, keyed by
    is_sliding (CPU, rows at different lengths): each row's own key range within it, the range it attends over
    alone; attention then runs row by row (attention.RowSpans), so a row's tokens do not depend on its batch."""

    positions: torch.Tensor
    masks: dict[bool, torch.Tensor | None]
    writer: KVUpdate
    rows: list[int]
    kv_start: dict[bool, int]
    kv_end: int
    cache: KVCache
    spans: dict[bool, list[tuple[int, int]]] | None = None

    def select(self, index: list[int]) -> ForwardPlan:
        """The plan for a subset of its rows (index into `rows`), e.g. the rows still denoising."""
        if len(index) == len(self.rows):
            return self
        device = self.cache.device
        at = torch.tensor(index, device=device)
        rows = [self.rows[i] for i in index]
        masks = {k: (m if m is None or m.shape[0] == 1 else m[at]) for k, m in self.masks.items()}
        positions = self.positions if self.positions.dim() == 1 else self.positions[at]
        starts = torch.tensor([self.cache.lengths[r] for r in rows], device=device)
        writer = self.cache.writer(rows, starts, self.kv_start, self.kv_end)
        spans = None if self.spans is None else {k: [v[i] for i in index] for k, v in self.spans.items()}
        return ForwardPlan(positions, masks, writer, rows, self.kv_start, self.kv_end, self.cache, spans)


class Layer(nn.Module):
    """Attention, then the dense MLP and the MoE in parallel, post norms and the layer scalar.

    The encoder and decoder share every weight; only the layer scalar is stored per mode (the released checkpoint
    keeps both buffers)."""

    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.is_sliding = config.is_sliding(layer_idx)
        self.layer_idx = layer_idx
        self.self_attn = Attention(config, layer_idx)
        self.mlp = GatedMLP(h, config.intermediate_size)
        self.router = Router(config)
        self.experts = Experts(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(self, x, cos, sin, mask, kv_update: KVUpdate, encoder: bool) -> torch.Tensor:
        # 1. attention
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        keys, values = kv_update(self.layer_idx, self.is_sliding, k, v)
        x = x + self.post_attention_layernorm(self.self_attn.attend(q, keys, values, mask))
        # 2. dense MLP and MoE in parallel; the router reads the residual itself
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])  # (B*T, H)
        weights, index = self.router(flat)
        sparse = self.experts(self.pre_feedforward_layernorm_2(flat), weights, index).reshape(x.shape)
        sparse = self.post_feedforward_layernorm_2(sparse)
        # 3. post norm, residual, layer scalar
        x = x + self.post_feedforward_layernorm(dense + sparse)
        return x * (self.encoder_layer_scalar if encoder else self.layer_scalar)


class SelfConditioning(GatedMLP):
    """post_norm(canvas_embeds + MLP(pre_norm(signal))), with a scale-free post norm."""

    def __init__(self, config: TextConfig):
        super().__init__(config.hidden_size, config.intermediate_size)
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)

    def forward(self, embeds: torch.Tensor, signal: torch.Tensor | None) -> torch.Tensor:
        if signal is None:  # first step: the signal is zeros, and the MLP (no biases) maps zeros to zeros
            return self.post_norm(embeds)
        return self.post_norm(embeds + super().forward(self.pre_norm(signal)))


class DiffusionGemma(nn.Module):
    def __init__(self, config: TextConfig, canvas_length: int = 256):
        super().__init__()
        self.config = config
        self.canvas_length = canvas_length
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Layer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE frequency buffers; needed after building the model on the meta device."""
        c = self.config
        with torch.device(device or "cpu"):
            sliding = default_inv_freq(c.head_dim, c.sliding_rope_theta)
            full = proportional_inv_freq(c.global_head_dim, c.full_rope_theta, c.full_partial_rotary_factor)
        self.register_buffer("sliding_inv_freq", sliding, persistent=False)
        self.register_buffer("full_inv_freq", full, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def _embed_scale(self) -> torch.Tensor:
        """sqrt(hidden) rounded to the weights' dtype, kept on their device: creating it per call would copy from
        the host, which a CUDA graph cannot capture."""
        w = self.embed_tokens.weight
        key = (w.dtype, w.device)
        if getattr(self, "_scale_key", None) != key:
            self._scale = torch.tensor(self.config.embed_scale, dtype=w.dtype, device=w.device)
            self._scale_key = key
        return self._scale

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens) * self._embed_scale()

    def soft_embed(self, logits: torch.Tensor) -> torch.Tensor:
        """Self-conditioning signal: softmax(logits) @ E * sqrt(hidden). logits (B, C, V) -> (B, C, H)."""
        return self.embed_probs(torch.softmax(logits, dim=-1, dtype=torch.float32))

    def embed_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (B, C, V) -> probs @ E * sqrt(hidden), (B, C, H)."""
        return (probs.to(self.dtype) @ self.embed_tokens.weight) * self._embed_scale()

    def rope(self, positions: torch.Tensor) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """positions (T,) -> {is_sliding: (cos, sin)}."""
        return {True: rope_cos_sin(positions, self.sliding_inv_freq, self.dtype),
                False: rope_cos_sin(positions, self.full_inv_freq, self.dtype)}

    def run_layers(self, x, positions, masks: dict[bool, torch.Tensor | None], kv_update: KVUpdate, encoder: bool,
                   spans: dict[bool, list[tuple[int, int]]] | None = None):
        """The shared stack. x (B, T, H); masks (and spans, ForwardPlan) keyed by is_sliding. Returns the
        final-normed hidden states."""
        rope = self.rope(positions)
        if spans is not None:
            masks = {s: RowSpans(m, spans[s]) for s, m in masks.items()}
        for layer in self.layers:
            cos, sin = rope[layer.is_sliding]
            x = layer(x, cos, sin, masks[layer.is_sliding], kv_update, encoder)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied head with the final soft cap, in fp32. hidden (B, T, H) -> (B, T, V)."""
        logits = F.linear(hidden, self.embed_tokens.weight).float()
        cap = self.config.final_logit_softcapping
        if cap is not None and logits.requires_grad:
            logits = torch.tanh(logits / cap) * cap
        elif cap is not None:  # in place when not training: this (B, C, V) tensor is the largest of a step
            logits.div_(cap).tanh_().mul_(cap)
        return logits

    def head_into(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The tied head *without* the soft cap, written into `out` (T, V) fp32. hidden (T, H). (The sampler's
        temper_and_score applies the cap on its way through the logits.)"""
        w = self.embed_tokens.weight
        if w.dtype == torch.float32:
            return torch.mm(hidden, w.t(), out=out)
        return out.copy_(F.linear(hidden, w))

    def plan(self, cache: KVCache, rows: list[int] | None, num_new: int, encoder: bool) -> ForwardPlan:
        """The forward plan for `num_new` tokens appended (encoder) or placed as scratch (decoder) after each row's
        committed tokens. rows=None: every row, in lockstep (one length, plain slices)."""
        window = self.config.sliding_window
        lockstep = rows is None
        rows_list = list(range(cache.batch_size)) if lockstep else list(rows)
        lengths = [cache.lengths[r] for r in rows_list]
        cache.check_room(rows_list, num_new)
        device = cache.device
        if lockstep and len(set(lengths)) != 1:
            raise ValueError("rows have different lengths; pass rows=")
        kv_end = max(lengths) + num_new
        row_start = row_key_starts(lengths, window)  # as alone
        kv_start = {s: min(firsts) for s, firsts in row_start.items()}
        starts = torch.tensor(lengths, device=device)
        valid = cache.valid if lockstep else cache.valid[torch.tensor(rows_list, device=device)]
        if encoder:
            masks = {s: encoder_mask(valid, starts, num_new, kv_start[s], kv_end, window if s else None)
                     for s in (True, False)}
        elif lockstep and not cache.any_padding:
            masks = {True: None, False: None}  # every key in range is visible: unmasked fast path
        else:
            masks = {s: decoder_mask(valid, starts, num_new, kv_start[s], kv_end, window if s else None)
                     for s in (True, False)}
        spans = None
        if lockstep:
            positions = torch.arange(lengths[0], lengths[0] + num_new, device=device)  # (T,)
            writer = cache.writer(None, lengths[0], kv_start, kv_end)
        else:
            positions = starts[:, None] + torch.arange(num_new, device=device)  # (R, T)
            writer = cache.writer(rows_list, starts, kv_start, kv_end)
            if device.type == "cpu" and len(set(lengths)) > 1:
                spans = {s: [(a - kv_start[s], n + num_new - kv_start[s]) for a, n in zip(row_start[s], lengths)]
                         for s in (True, False)}
        return ForwardPlan(positions, masks, writer, rows_list, kv_start, kv_end, cache, spans)

    def encode(self, tokens: torch.Tensor, cache: KVCache, rows: list[int] | None = None,
               embeds: torch.Tensor | None = None, image_groups: torch.Tensor | None = None) -> torch.Tensor:
        """Append `tokens` (R, T) to the cache rows `rows` (default: all rows, in lockstep), causally.
        Returns final hidden states (R, T, H).

        A prompt with images passes its input embeddings (`embeds` (R, T, H), images' features at their tokens)
        and, when the config attends bidirectionally within images, `image_groups` (R, T) (images.image_groups)."""
        plan = self.plan(cache, rows, tokens.shape[1], encoder=True)
        masks = plan.masks
        if image_groups is not None and self.config.bidirectional_vision and bool((image_groups >= 0).any()):
            starts = torch.tensor([cache.lengths[r] for r in plan.rows])
            masks = {s: open_image_blocks(m, image_groups, starts, plan.kv_start[s]) for s, m in masks.items()}
        x = self.embed(tokens) if embeds is None else embeds
        hidden = self.run_layers(x, plan.positions, masks, plan.writer, encoder=True, spans=plan.spans)
        for r in plan.rows:
            cache.lengths[r] += tokens.shape[1]
        return hidden

    def denoise(self, canvas: torch.Tensor, cache: KVCache, self_cond_logits: torch.Tensor | None = None,
                signal: torch.Tensor | None = None, rows: list[int] | None = None) -> torch.Tensor:
        """One decoder pass over `canvas` (R, C) reading the cache rows `rows`. Returns logits (R, C, V) in fp32.

        The self-conditioning signal comes from `self_cond_logits` (previous step's logits) or directly as
        `signal` (R, C, H); with neither it is zeros."""
        if self_cond_logits is not None:
            signal = self.soft_embed(self_cond_logits)
        return self.logits(self.denoise_hidden(canvas, cache, signal, rows))

    def denoise_hidden(self, canvas: torch.Tensor, cache: KVCache, signal: torch.Tensor | None = None,
                       rows: list[int] | None = None) -> torch.Tensor:
        """denoise() up to the head: the final-normed decoder states (R, C, H)."""
        plan = self.plan(cache, rows, canvas.shape[1], encoder=False)
        return self.decode(canvas, signal, plan)

    def decode(self, canvas: torch.Tensor, signal: torch.Tensor | None, plan: ForwardPlan) -> torch.Tensor:
        """The decoder pass of a denoising step under a prepared plan: canvas (R, C) and the self-conditioning
        signal (R, C, H) or None (zeros) -> final-normed hidden states (R, C, H)."""
        x = self.self_conditioning(self.embed(canvas), signal)
        return self.run_layers(x, plan.positions, plan.masks, plan.writer, encoder=False, spans=plan.spans)

    def graphs_capturable(self) -> bool:
        """Whether a CUDA graph can capture this model's passes: on CUDA, in bf16 (torch's grouped GEMM keeps the
        MoE's group sizes on the device only in its native bf16 kernel), and with experts that do not read their
        token counts on the host (int4 experts do: presets and quant/int4.py set `cuda_graph_capturable`)."""
        return (self.device.type == "cuda" and self.dtype == torch.bfloat16
                and getattr(self, "cuda_graph_capturable", True))

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return KVCache(self.config, batch_size, capacity, self.dtype, self.device)
