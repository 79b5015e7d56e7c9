"""The paged KV cache: per-layer pools of fixed-size blocks, behind the interface the model uses from KVCache.

k[i], v[i]: (num_blocks, kv_heads_i, block_size, head_dim_i). Row r's logical slot s lives at slot s % block_size
of block tables[r][s // block_size]; engine/block_manager.py decides which blocks a row owns and shares. The model
needs no change: plan() reads `lengths`, `valid`, `any_padding`, `batch_size`, `device` and `check_room` as from
KVCache, and the writer scatters each layer's new K/V into the rows' blocks, then gathers the attended range
[kv_start, end) of each row into a contiguous (R, kv_heads, S, head_dim) buffer, exactly the tensor KVCache returns
for those rows. That gather is a copy per layer and pass (KVCache copies too for a subset of rows, but whole rows
at once): benchmarks/paged_gather.py measures it. A paged attention kernel would read the blocks in place instead.
"""

from __future__ import annotations

import os

import torch

from .cache import CacheFullError
from .config import TextConfig
from .errors import DgemmaError


class KVBudgetError(DgemmaError, ValueError):
    """A --kv-cache-gib too small for the model's longest sequence."""


def pool_shapes(config: TextConfig, num_blocks: int, block_size: int) -> list[tuple[int, int, int, int]]:
    """The shape of each layer's K (and V) pool."""
    return [(num_blocks, config.layer_kv_heads(i), block_size, config.layer_head_dim(i))
            for i in range(config.num_hidden_layers)]


def bytes_per_block(config: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    """The K and V bytes of one block over all layers."""
    per_slot = sum(heads * dim for _, heads, _, dim in pool_shapes(config, 1, 1))
    return 2 * per_slot * block_size * torch.empty((), dtype=dtype).element_size()


def blocks_for_budget(config: TextConfig, block_size: int, dtype: torch.dtype, gib: float, min_slots: int) -> int:
    """How many blocks --kv-cache-gib holds; KVBudgetError when they cannot hold `min_slots` slots (one sequence at
    the longest context the server allows)."""
    per_block = bytes_per_block(config, block_size, dtype)
    num_blocks = int(gib * 2**30) // per_block
    needed = -(-min_slots // block_size)
    if num_blocks < needed:
        raise KVBudgetError(f"--kv-cache-gib {gib:g} holds {num_blocks} KV blocks of {block_size} tokens; one "
                            f"sequence of {min_slots} tokens needs {needed} ({needed * per_block / 2**30:.3g} GiB)")
    return num_blocks


def default_kv_cache_gib(config: TextConfig, block_size: int, dtype: torch.dtype, rows: int, max_model_len: int,
                         device: torch.device | str) -> float:
    """The default --kv-cache-gib: what `rows` preallocated rows of `max_model_len` slots took, capped at half the
    memory free now (on the GPU when the model is there), but never below one sequence of max_model_len."""
    per_block = bytes_per_block(config, block_size, dtype)
    want = rows * -(-max_model_len // block_size) * per_block
    floor = -(-max_model_len // block_size) * per_block
    return max(min(want, _free_bytes(torch.device(device)) // 2), floor) / 2**30


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it: no cap
        return 2**62


class PagedKVCache:
    """KV pools plus, per row, its block table and committed length (see the module docstring).

    `capacity` bounds a row's slots (the max model length); `valid` (rows, capacity) is all True (the engine never
    left-pads). Block 0 backs a row's unassigned table entries: keys the row may gather there are masked out.
    With `extra_blocks` 1 the pools hold one more block, `spare_block`, which the block manager never hands out:
    engine/graphs.py's padding rows read and write there."""

    def __init__(self, config: TextConfig, num_blocks: int, block_size: int, batch_size: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, extra_blocks: int = 0):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.spare_block = num_blocks if extra_blocks else None
        self.batch_size = batch_size
        self.capacity = capacity
        self.lengths = [0] * batch_size
        self.num_row_blocks = [0] * batch_size
        shapes = pool_shapes(config, num_blocks + extra_blocks, block_size)
        self.k = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.v = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.tables = torch.zeros(batch_size, -(-capacity // block_size), dtype=torch.long, device=device)
        self.valid = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)
        self.any_padding = False

    @property
    def device(self) -> torch.device:
        return self.valid.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def assign(self, row: int, blocks: list[int], length: int) -> None:
        """Bind a sequence to `row`: its block table and the number of its tokens already in the cache."""
        if len(blocks) > self.tables.shape[1]:
            raise CacheFullError(f"KV cache row {row} holds {self.capacity} slots; {len(blocks)} blocks given")
        if length > len(blocks) * self.block_size:
            raise CacheFullError(f"KV cache row {row}: {length} tokens in {len(blocks)} blocks of {self.block_size}")
        self.tables[row].zero_()
        self.tables[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        self.num_row_blocks[row] = len(blocks)
        self.lengths[row] = length

    def copy_block(self, source: int, target: int) -> None:
        """Copy one block's K/V in every layer (a prompt's partial last block, shared by copy: the rest of it takes
        each sequence's own canvas)."""
        for pool in self.k + self.v:
            pool[target] = pool[source]

    def reset_row(self, row: int) -> None:
        """Unbind a row (its blocks go back through the block manager)."""
        self.assign(row, [], 0)

    def check_room(self, rows: list[int], num_tokens: int) -> None:
        for r in rows:
            slots = min(self.num_row_blocks[r] * self.block_size, self.capacity)
            if self.lengths[r] + num_tokens > slots:
                raise CacheFullError(f"KV cache row {r} has {slots} slots in its blocks; {self.lengths[r]} used, "
                                     f"{num_tokens} more needed")

    def _locate(self, table: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logical slots (R, S) of rows whose tables are `table` (R, max_blocks) -> (block ids, offsets), (R, S)."""
        return table.gather(1, slots // self.block_size), slots % self.block_size

    def writer(self, rows: list[int] | None, slot: int | torch.Tensor, kv_start: dict[bool, int], end: int,
               table: torch.Tensor | None = None):
        """A K/V updater for one forward pass, as KVCache.writer: writes the new K/V (R, nkv, T, hd) at each row's
        `slot` (an int with rows=None: every row, in lockstep) and returns each row's keys/values over
        [kv_start, end) (R, nkv, S, hd), gathered from its blocks. `table` (R, max_blocks), with rows=None: the
        rows' block tables themselves (engine/graphs.py's static buffers) instead of rows of `tables`."""
        if table is None:
            rows = list(range(self.batch_size)) if rows is None else rows
            table = self.tables[torch.tensor(rows, device=self.device)]  # (R, max_blocks)
        rows = range(table.shape[0])
        if not isinstance(slot, torch.Tensor):
            slot = torch.full((len(rows),), slot, dtype=torch.long, device=self.device)
        reads = {}  # is_sliding -> (block ids (R, 1, S), offsets (R, 1, S)), made once per pass
        for sliding, start in kv_start.items():
            span = torch.arange(start, end, device=self.device).expand(len(rows), -1)  # (R, S)
            reads[sliding] = tuple(t[:, None] for t in self._locate(table, span))
        writes = {}  # T -> (block ids (R, T), offsets (R, T))

        def update(layer_idx: int, is_sliding: bool, k: torch.Tensor, v: torch.Tensor):
            t = k.shape[2]
            if t not in writes:
                writes[t] = self._locate(table, slot[:, None] + torch.arange(t, device=self.device))
            blocks, offsets = writes[t]
            kv = []
            for pool, new in ((self.k[layer_idx], k), (self.v[layer_idx], v)):
                # advanced indices around a slice put (R, T) first: assign (R, T, nkv, hd)
                pool[blocks, :, offsets] = new.transpose(1, 2)
                heads = torch.arange(pool.shape[1], device=self.device)[None, :, None]  # (1, nkv, 1)
                read_blocks, read_offsets = reads[is_sliding]
                kv.append(pool[read_blocks, heads, read_offsets])  # (R, nkv, S, hd)
            return kv[0], kv[1]

        return update
