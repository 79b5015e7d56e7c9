"""The serving engine's decoder pass on static buffers, bucketed, and on CUDA replayed as CUDA graphs
(`dgemma serve --cuda-graphs`, off by default).

A step's decoder pass is hundreds of kernel launches; on a GPU a small model spends longer issuing them than
running them, and a graph replay issues them all at once. A graph replays fixed shapes at fixed addresses, while
the engine's rows join and leave between steps, each at its own cache length. So the pass runs in a bucket: the
rows rounded up to a power of two (at most max_num_seqs) and the attended keys to a length bucket (twice the
canvas, doubling, capped at max_model_len). Each bucket owns its inputs (the canvas, the self-conditioning signal,
each row's cache length and block table); a step copies its rows into them and runs the bucket's pass, whose
RoPE positions, masks and K/V reads are computed from those inputs inside the pass. The bucket's padding rows
read and write only the cache's spare block (PagedKVCache extra block), never a live one.

On CUDA each bucket is captured once, after one eager pass on a side stream (libraries create their handles and
workspaces lazily), and replayed after. Everything else (the static buffers, the bucketing, the padding, the masks)
runs on any device, so a CPU runs the same code without capture: there attention runs row by row over each row's
own keys, as the eager path does (attention.RowSpans), so the tokens equal the eager path's. On a GPU a bucket
attends over its padded key range with masks, which rounds differently from the eager path's range; a replay
gives the tokens of the same bucket run eagerly (tests/test_engine_graphs.py, which needs a GPU for that part).

The head (the LM head, the sampler, the constraint and the pins) stays eager: it is a few dozen kernels per step,
and the constraint's DP runs on the host between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DgemmaError
from ..model import DiffusionGemma
from ..model.masks import decoder_mask, row_key_starts
from ..model.model import ForwardPlan
from ..paged_cache import PagedKVCache


class GraphsError(DgemmaError, ValueError):
    """CUDA graphs asked for a model or device that cannot capture the decoder pass."""


def row_buckets(max_rows: int) -> list[int]:
    """Powers of two below max_rows, then max_rows."""
    out, n = [], 1
    while n < max_rows:
        out.append(n)
        n *= 2
    return out + [max_rows]


def length_buckets(canvas_length: int, capacity: int) -> list[int]:
    """Attended key lengths: twice the canvas, doubling, below `capacity`, then `capacity`."""
    out, n = [], 2 * canvas_length
    while n < capacity:
        out.append(n)
        n *= 2
    return out + [capacity]


def check_capturable(model: DiffusionGemma) -> None:
    """GraphsError unless the decoder pass of `model` can be captured on its device (CUDA, bf16, no host reads)."""
    if model.device.type == "cuda" and not model.graphs_capturable():
        raise GraphsError("--cuda-graphs needs a bf16 model whose experts keep their token counts on the device "
                          "(not int4 experts)")


@dataclass
class BucketPlan:
    """What the head passes back to `DecoderGraphs.decode`: the cache rows of the pass (a ForwardPlan's role)."""

    rows: list[int]

    def select(self, index: list[int]) -> BucketPlan:
        return BucketPlan([self.rows[i] for i in index])


@dataclass
class _Bucket:
    rows: int
    length: int
    canvas: torch.Tensor  # (Rb, C) long
    signal: torch.Tensor  # (Rb, C, H)
    starts: torch.Tensor  # (Rb,) each row's cache length: its canvas goes at [start, start + C)
    table: torch.Tensor  # (Rb, blocks per row) block ids; padding rows: the spare block
    valid: torch.Tensor  # (Rb, length) all True (the engine never left-pads)
    graph: object = None  # torch.cuda.CUDAGraph once captured
    out: torch.Tensor | None = None  # the captured pass's output (Rb, C, H)
    passes: int = 0


class DecoderGraphs:
    def __init__(self, model: DiffusionGemma, cache: PagedKVCache, max_rows: int, capture: bool | None = None):
        if cache.spare_block is None:
            raise ValueError("DecoderGraphs needs a PagedKVCache with a spare block (extra_blocks=1)")
        self.model, self.cache = model, cache
        self.device = model.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture:
            check_capturable(model)
        self.canvas_length = model.canvas_length
        self.window = model.config.sliding_window
        self.row_buckets = row_buckets(max_rows)
        self.length_buckets = length_buckets(self.canvas_length, cache.capacity)
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.zero = {True: 0, False: 0}  # every bucket attends from slot 0: one key range for every row

    def plan(self, rows: list[int]) -> BucketPlan:
        return BucketPlan(list(rows))

    def bucket_for(self, num_rows: int, kv_end: int) -> tuple[int, int]:
        rows = next(b for b in self.row_buckets if b >= num_rows)
        length = next(b for b in self.length_buckets if b >= kv_end)
        return rows, length

    def decode(self, canvas: torch.Tensor, signal: torch.Tensor | None, plan: BucketPlan) -> torch.Tensor:
        """The decoder pass of canvas (R, C) with its signal (R, C, H) or None (zeros) over the cache rows of
        `plan` -> final-normed hidden states (R, C, H), a view the next pass overwrites."""
        rows, C = plan.rows, self.canvas_length
        R = len(rows)
        lengths = [self.cache.lengths[r] for r in rows]
        self.cache.check_room(rows, C)
        b = self._bucket(*self.bucket_for(R, max(lengths) + C))
        b.canvas[:R].copy_(canvas)
        if signal is None:  # the first step: the signal is zeros, which the pass maps as it maps no signal
            b.signal[:R].zero_()
        else:
            b.signal[:R].copy_(signal)
        index = torch.tensor(rows, device=self.device)
        b.starts.copy_(torch.tensor(lengths + [0] * (b.rows - R)), non_blocking=True)
        b.table[:R].copy_(self.cache.tables[index])
        b.table[R:] = self.cache.spare_block  # padding rows: a live row's table may be left there from a pass before
        b.passes += 1
        if b.graph is not None:
            b.graph.replay()
            return b.out[:R]
        if self.capture:
            return self._capture(b)[:R]
        return self._forward(b, self._spans(b, lengths))[:R]

    def _bucket(self, rows: int, length: int) -> _Bucket:
        key = (rows, length)
        if key not in self.buckets:
            C, H, dev = self.canvas_length, self.model.config.hidden_size, self.device
            table = torch.full((rows, self.cache.tables.shape[1]), self.cache.spare_block, dtype=torch.long,
                               device=dev)
            self.buckets[key] = _Bucket(rows, length, torch.zeros(rows, C, dtype=torch.long, device=dev),
                                        torch.zeros(rows, C, H, dtype=self.model.dtype, device=dev),
                                        torch.zeros(rows, dtype=torch.long, device=dev), table,
                                        torch.ones(rows, length, dtype=torch.bool, device=dev))
        return self.buckets[key]

    def _spans(self, b: _Bucket, lengths: list[int]) -> dict[bool, list[tuple[int, int]]] | None:
        """On a CPU, each row's own key range within the bucket's (model.plan's spans): padding rows their canvas."""
        if self.device.type != "cpu":
            return None
        C, pad = self.canvas_length, [(0, self.canvas_length)] * (b.rows - len(lengths))
        return {s: [(a, n + C) for a, n in zip(starts, lengths)] + pad
                for s, starts in row_key_starts(lengths, self.window).items()}

    def _forward(self, b: _Bucket, spans: dict[bool, list[tuple[int, int]]] | None) -> torch.Tensor:
        """The bucket's pass, from its buffers alone (so that a graph can replay it)."""
        C = self.canvas_length
        positions = b.starts[:, None] + torch.arange(C, device=self.device)  # (Rb, C)
        masks = {s: decoder_mask(b.valid, b.starts, C, 0, b.length, self.window if s else None)
                 for s in (True, False)}
        writer = self.cache.writer(None, b.starts, self.zero, b.length, table=b.table)
        plan = ForwardPlan(positions, masks, writer, list(range(b.rows)), self.zero, b.length, self.cache, spans)
        return self.model.decode(b.canvas, b.signal, plan)

    def _capture(self, b: _Bucket) -> torch.Tensor:
        """One eager pass on a side stream (it writes the K/V the replay writes again), then capture and replay."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(b, None)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            b.out = self._forward(b, None)
        graph.replay()
        b.graph = graph
        return b.out

    def stats(self) -> dict:
        """Per bucket (rows, length): passes run and whether it is captured."""
        return {key: {"passes": b.passes, "captured": b.graph is not None} for key, b in self.buckets.items()}
