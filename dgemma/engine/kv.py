"""The engine's KV memory: the paged cache, its block manager and each request's block table (the steps of
block_manager.py's design note), and the prompt chunks the encoder runs.

Exactness. Encoding a prompt in two calls is not bit-identical to one call on a CPU, so every prompt is encoded
in chunks on one fixed grid: cut at every multiple of `prefill_chunk` (a multiple of the block size) that is not
strictly inside an image, whatever is cached. A prefix reused from the cache is itself a multiple of
`prefill_chunk` long and never ends inside an image (BlockManager align), so a warm request runs the very calls
the cold one runs after that point, on bit-identical K/V: the tokens are the same with and without the cache.
A prompt's last chunk [a, len) is a call of its own length, while a longer prompt sharing those tokens encodes a
whole chunk from a, and calls of different lengths give the same positions K/V that differ in the last bits (about
1e-6 on the tiny preset, 1e-5 on small): so the last chunk's blocks are registered only when len is on the grid,
else a third prompt could reuse them beside blocks of the other call (tests/test_prefix_cache.py).
Committed canvases are encoded in calls of their own (at the sequence's length, one per canvas), which a later
prompt resending them would not repeat; so their blocks are not registered in the prefix cache (commit with
register=False) and a prompt's reuse ends where its previous turn's output began.

Admission never overcommits: a request is admitted when the blocks it may ever hold (its prompt and every canvas
it may commit, less the cached blocks it reuses) fit in the free blocks left after what the running requests may
still take. Blocks are still taken only as canvases commit, so short outputs leave the rest free for the cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..control.infill import check_suffix
from ..model import DiffusionGemma
from ..paged_cache import PagedKVCache
from .block_manager import BlockManager, BlockTable, ImageSpan, PrefixCacheStats, image_spans
from .request import Request, RequestError

DEFAULT_PREFILL_CHUNK = 64  # tokens per encoder call of a prompt: the prefix cache reuses multiples of it


@dataclass
class Prefill:
    """A request whose prompt is being encoded: the [a, b) chunks of it still to run, and its images."""

    request: Request
    chunks: list[tuple[int, int]]
    patches: list  # images.ImagePatches of the prompt, in order (empty without images)
    spans: tuple[ImageSpan, ...]


class KVPool:
    def __init__(self, model: DiffusionGemma, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, prefill_chunk: int, prefix_caching: bool = True, spare_block: bool = False):
        if prefill_chunk < block_size or prefill_chunk % block_size:
            raise ValueError(f"prefill_chunk {prefill_chunk} must be a multiple of the block size {block_size}")
        self.model = model
        self.chunk = prefill_chunk
        self.canvas_length = model.canvas_length
        self.cache = PagedKVCache(model.config, num_blocks, block_size, max_num_seqs, max_model_len, model.dtype,
                                  model.device, extra_blocks=int(spare_block))
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.tables: dict[str, BlockTable] = {}  # request id -> its blocks
        self.totals: dict[str, int] = {}  # request id -> the most slots it may hold
        self.tails: dict[bytes, str] = {}  # a prompt's last chunk (BlockManager.tail_key) -> a request that encoded it
        self.tail_keys: dict[str, bytes] = {}  # request id -> the key it holds in tails

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def stats(self) -> PrefixCacheStats:
        return self.blocks.stats()

    # -- sizes ---------------------------------------------------------------------------------------------------
    def total_slots(self, request: Request) -> int:
        """The most slots a request may hold: its prompt and every canvas it may commit (an infill request's first
        scratch span fits in them: check_suffix bounds it by max_tokens)."""
        return len(request.prompt) + request.max_canvases * self.canvas_length

    def scratch(self, request: Request) -> int:
        """The decoder's scratch slots after the prompt: a canvas, or the span middle_length reads for infill."""
        steering = request.params.steering
        if steering is None or steering.suffix is None:
            return self.canvas_length
        longest = check_suffix(steering.suffix, self.canvas_length, request.max_new)
        return max(self.canvas_length, longest + len(steering.suffix))

    def check_fits(self, request: Request) -> None:
        """RequestError when the request could not fit even in an empty cache."""
        need = self.blocks.blocks_for(self.total_slots(request))
        if need > self.blocks.num_blocks:
            raise RequestError(f"the prompt and max_tokens need {need} KV blocks of {self.blocks.block_size} tokens; "
                               f"the cache holds {self.blocks.num_blocks} (--kv-cache-gib)", "max_tokens")

    def _images(self, request: Request) -> tuple[tuple[ImageSpan, ...], list]:
        images = request.params.images
        if images is None:
            return (), []
        patches = [im for row in images.rows for im in row]
        return image_spans(request.prompt, patches, images.tokens.image), patches

    def _promised(self) -> int:
        """Blocks the admitted requests may still take."""
        return sum(max(0, self.blocks.blocks_for(self.totals[rid]) - len(table.blocks))
                   for rid, table in self.tables.items())

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def can_admit(self, request: Request) -> bool:
        spans, _ = self._images(request)
        need = self.blocks.blocks_needed(request.prompt, spans, self.total_slots(request), self.chunk)
        return need + self._promised() <= self.blocks.num_free

    def begin(self, request: Request) -> Prefill:
        """Admission: the request's table (its cached prefix, then blocks for the rest of the prompt and its first
        scratch span), bound to its row, and the chunks of the prompt left to encode."""
        spans, patches = self._images(request)
        prompt = request.prompt
        table = self.blocks.allocate(prompt, spans, len(prompt) + self.scratch(request), self.chunk)
        self.tables[request.request_id] = table
        self.totals[request.request_id] = max(self.total_slots(request), len(table.blocks) * self.blocks.block_size)
        self.cache.assign(request.row, table.blocks, table.num_tokens)
        return Prefill(request, self.chunks(len(prompt), table.num_cached_tokens, spans), patches, spans)

    def chunks(self, length: int, start: int, spans: tuple[ImageSpan, ...]) -> list[tuple[int, int]]:
        """prompt[start:length] cut at every multiple of prefill_chunk not strictly inside an image (start is one)."""
        cuts = [p for p in range(start + self.chunk, length, self.chunk)
                if not any(s.start < p < s.end for s in spans)]
        bounds = [start] + cuts + [length]
        return list(zip(bounds, bounds[1:]))

    def adopt_cached(self, prefill: Prefill) -> None:
        """Take the prompt's next chunks from the prefix cache where another request encoded them after this one was
        admitted (the n choices of one prompt, or requests sharing a prefix that arrive together): they are the very
        calls this request would run, on the same grid, so their K/V are bit-identical. The last chunk, which is
        not in the prefix cache (module docstring), is taken from a running request whose prompt is the same up to
        its end: its full blocks are shared and its partial block copied (the rest of that block takes this
        request's own canvas)."""
        request = prefill.request
        table = self.tables[request.request_id]
        adopted = False
        while len(prefill.chunks) > 1 and self.blocks.adopt(table, request.prompt[slice(*prefill.chunks[0])]):
            prefill.chunks.pop(0)
            adopted = True
        if len(prefill.chunks) == 1:
            a, b = prefill.chunks[0]
            holder = self.tails.get(self.blocks.tail_key(table, request.prompt[a:b]))
            if holder is not None:
                partial = self.blocks.share(table, self.tables[holder], request.prompt[a:b])
                if partial is not None:
                    self.cache.copy_block(partial, table.blocks[b // self.blocks.block_size])
                prefill.chunks.pop(0)
                adopted = True
        if adopted:
            self.cache.assign(request.row, table.blocks, table.num_tokens)

    def encode_chunk(self, prefill: Prefill) -> None:
        """Encode the next chunk of the prompt into the request's blocks, with the images that start in it (they
        end in it too: no cut falls inside an image), and hash the blocks it filled."""
        a, b = prefill.chunks.pop(0)
        last = not prefill.chunks
        request = prefill.request
        tokens = torch.tensor([request.prompt[a:b]], dtype=torch.long, device=self.model.device)  # (1, b - a)
        images = request.params.images
        if images is None:
            self.model.encode(tokens, self.cache, rows=[request.row])
        else:
            inside = [p for p, s in zip(prefill.patches, prefill.spans) if a <= s.start < b]
            dataclasses.replace(images, rows=[inside]).encode(self.model, tokens, self.cache, rows=[request.row])
        table = self.tables[request.request_id]
        key = self.blocks.tail_key(table, request.prompt[a:b]) if last else None
        on_grid = not last or b % self.chunk == 0  # the call a longer prompt sharing these tokens makes too
        self.blocks.commit(table, request.prompt[a:b], register=on_grid)
        if key is not None:  # the same prompt's requests admitted meanwhile share its last chunk (adopt_cached)
            self.tails[key] = request.request_id
            self.tail_keys[request.request_id] = key

    def append(self, request: Request, tokens: list[int]) -> None:
        """A committed canvas was encoded into the request's scratch slots: account for it (unregistered, see the
        module docstring) and reserve the next canvas's scratch slots."""
        table = self.tables[request.request_id]
        self.blocks.commit(table, tokens, register=False)
        self.blocks.reserve(table, table.num_tokens + self.canvas_length)
        self.cache.assign(request.row, table.blocks, table.num_tokens)

    def free(self, request: Request) -> None:
        """A finished or cancelled request's blocks go back (its cached prompt blocks stay until evicted)."""
        table = self.tables.pop(request.request_id, None)
        self.totals.pop(request.request_id, None)
        key = self.tail_keys.pop(request.request_id, None)
        if key is not None and self.tails.get(key) == request.request_id:
            del self.tails[key]
        if table is not None:
            self.blocks.free(table)
            if request.row is not None:
                self.cache.reset_row(request.row)
