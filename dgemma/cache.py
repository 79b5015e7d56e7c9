"""The preallocated KV cache shared by the encoder (writes) and the decoder (reads)."""

from __future__ import annotations

import torch

from .config import TextConfig


class CacheFullError(RuntimeError):
    pass


class KVCache:
    """Per-layer K and V buffers, allocated once.

    k[i], v[i]: (batch, kv_heads_i, capacity, head_dim_i). Slots [0, length) hold committed tokens (prompt and
    committed canvases). The decoder writes its canvas K/V into the scratch slots [length, length + canvas) and
    never advances `length`, so denoising leaves the cache unchanged; the encoder then overwrites the same slots
    when it commits the canvas. `valid` (batch, capacity) is False at left-padding slots.
    """

    def __init__(self, config: TextConfig, batch_size: int, capacity: int, dtype: torch.dtype, device: torch.device | str):
        self.capacity = capacity
        self.batch_size = batch_size
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(config.num_hidden_layers):
            shape = (batch_size, config.layer_kv_heads(i), capacity, config.layer_head_dim(i))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.valid = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)

    @property
    def device(self) -> torch.device:
        return self.valid.device

    def check_room(self, num_tokens: int) -> None:
        if self.length + num_tokens > self.capacity:
            raise CacheFullError(f"KV cache holds {self.capacity} slots; {self.length} used, {num_tokens} more needed")

    def reserve(self, capacity: int) -> None:
        """Grow the buffers to hold at least `capacity` slots (doubling, to keep reallocations rare)."""
        if capacity <= self.capacity:
            return
        new_capacity = max(capacity, 2 * self.capacity)
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                new = old.new_zeros(old.shape[0], old.shape[1], new_capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                bufs[i] = new
        valid = self.valid.new_ones(self.batch_size, new_capacity)
        valid[:, : self.capacity] = self.valid
        self.valid = valid
        self.capacity = new_capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def writer(self, slot: int, kv_start: dict[bool, int]):
        """A K/V updater for one forward: writes new K/V at `slot` and returns the range each layer attends over.
        kv_start maps is_sliding -> first slot that layer reads."""

        def update(layer_idx: int, is_sliding: bool, k: torch.Tensor, v: torch.Tensor):
            end = slot + k.shape[2]
            self.k[layer_idx][:, :, slot:end] = k
            self.v[layer_idx][:, :, slot:end] = v
            start = kv_start[is_sliding]
            return self.k[layer_idx][:, :, start:end], self.v[layer_idx][:, :, start:end]

        return update
