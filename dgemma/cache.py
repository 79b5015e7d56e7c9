"""The preallocated KV cache shared by the encoder (writes) and the decoder (reads)."""

from __future__ import annotations

import torch

from .config import TextConfig


class CacheFullError(RuntimeError):
    """More tokens than a KV cache row holds: its caller sized or reserved it wrong (a bug, not a user error)."""


class KVCache:
    """Per-layer K and V buffers, allocated once; one row per sequence.

    k[i], v[i]: (rows, kv_heads_i, capacity, head_dim_i). In row r, slots [0, lengths[r]) hold committed tokens
    (prompt and committed canvases). The decoder writes its canvas K/V into the scratch slots
    [lengths[r], lengths[r] + canvas) and never advances the length, so denoising leaves the cache unchanged; the
    encoder then overwrites the same slots when it commits the canvas. `valid` (rows, capacity) is False at
    left-padding slots. Lengths are kept on the host: the scheduler needs them there, and reading them never
    synchronises with the device.
    """

    def __init__(self, config: TextConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.capacity = capacity
        self.batch_size = batch_size
        self.lengths = [0] * batch_size
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(config.num_hidden_layers):
            shape = (batch_size, config.layer_kv_heads(i), capacity, config.layer_head_dim(i))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.valid = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)
        self.any_padding = False  # host flag: some slot before a row's length is padding

    @property
    def device(self) -> torch.device:
        return self.valid.device

    @property
    def length(self) -> int:
        """The common length of all rows (offline generation keeps rows in lockstep)."""
        if len(set(self.lengths)) != 1:
            raise ValueError("rows have different lengths; pass rows= explicitly")
        return self.lengths[0]

    @length.setter
    def length(self, value: int) -> None:
        self.lengths = [value] * self.batch_size

    def check_room(self, rows: list[int], num_tokens: int) -> None:
        for r in rows:
            if self.lengths[r] + num_tokens > self.capacity:
                raise CacheFullError(f"KV cache row {r} holds {self.capacity} slots; {self.lengths[r]} used, "
                                     f"{num_tokens} more needed")

    def set_left_padding(self, valid_prefix: torch.Tensor) -> None:
        """Mark padding slots: valid_prefix (rows, T) is False where a left-padded prompt has no token."""
        self.valid[:, : valid_prefix.shape[1]] = valid_prefix
        self.any_padding = bool((~valid_prefix).any())

    def reset_row(self, row: int) -> None:
        """Free a row for a new sequence (its old K/V are simply overwritten later)."""
        self.lengths[row] = 0
        self.valid[row] = True

    def reserve(self, capacity: int) -> None:
        """Grow the buffers to hold at least `capacity` slots (doubling, to keep reallocations rare)."""
        if capacity <= self.capacity:
            return
        new_capacity = max(capacity, 2 * self.capacity)
        used = max(self.lengths)
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                new = old.new_zeros(old.shape[0], old.shape[1], new_capacity, old.shape[3])
                new[:, :, :used] = old[:, :, :used]
                bufs[i] = new
        valid = self.valid.new_ones(self.batch_size, new_capacity)
        valid[:, : self.capacity] = self.valid
        self.valid = valid
        self.capacity = new_capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def writer(self, rows: list[int] | None, slot: int | torch.Tensor, kv_start: dict[bool, int], end: int):
        """A K/V updater for one forward pass.

        Writes the new K/V (R, nkv, T, hd) at each row's `slot` and returns the keys/values over [kv_start, end)
        that the layer attends over (masks hide what a row must not see). With rows=None all rows are in lockstep
        and `slot` is an int: plain slices, no copies. Otherwise `slot` is a (R,) tensor and rows are gathered."""
        if rows is None:
            def update(layer_idx: int, is_sliding: bool, k: torch.Tensor, v: torch.Tensor):
                t = k.shape[2]
                self.k[layer_idx][:, :, slot:slot + t] = k
                self.v[layer_idx][:, :, slot:slot + t] = v
                start = kv_start[is_sliding]
                return self.k[layer_idx][:, :, start:end], self.v[layer_idx][:, :, start:end]
            return update

        row_index = torch.tensor(rows, device=self.device)

        def update_rows(layer_idx: int, is_sliding: bool, k: torch.Tensor, v: torch.Tensor):
            t = k.shape[2]
            slots = slot[:, None] + torch.arange(t, device=self.device)  # (R, T)
            # advanced indices around a slice put (R, T) first: assign (R, T, nkv, hd)
            self.k[layer_idx][row_index[:, None], :, slots] = k.transpose(1, 2)
            self.v[layer_idx][row_index[:, None], :, slots] = v.transpose(1, 2)
            start = kv_start[is_sliding]
            return (self.k[layer_idx][row_index, :, start:end], self.v[layer_idx][row_index, :, start:end])

        return update_rows
