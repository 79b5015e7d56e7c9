"""The paged KV cache's block manager: fixed-size blocks, a block table per sequence, and automatic prefix caching.

The K/V of every layer live in pools of `block_size`-slot blocks (paged_cache.PagedKVCache); a sequence's logical
slot s is slot s % block_size of block table.blocks[s // block_size]. This module is the policy and holds no
tensors: which blocks a sequence owns, which full blocks are cached under a hash, and which to evict.

Prefix caching. A full block is hashed by (its token ids, its predecessor's hash, the images it holds): its K/V
then depend on nothing else, since the encoder is causal. A new prompt walks the chain of its full blocks and takes
every cached one it finds (BlockManager.match_prefix); the encoder starts after them. Blocks are reference-counted:
a block whose last sequence is freed stays cached, free and evictable, least recently released first (the tail
of a prefix before its head: a tail without its head is never hit). Free blocks that hold no cached content are
taken before any cached one is evicted.

Choices, documented:
- block_size should divide the canvas length (256; any size is correct): a committed canvas then fills whole
  blocks after the one the prompt left partial, a sequence never has more than one partial block, and its scratch canvas spans canvas/block_size
  or one more blocks. 16 (the default) reuses prefixes to the nearest 16 tokens; CUDA paged-attention kernels may
  want 256 (flash-attn 2 pages in multiples of 256, as nano-vllm uses), also a divisor of the canvas.
- At least one prompt token is encoded: a prompt reuses at most (len - 1) // block_size full blocks. DiffusionGemma
  reads no logits from the encoder, so the whole prompt could be reused; keeping one token means prefill always
  runs the encoder (one code path: images, infill and positions need no zero-token case), at the cost of one block
  encoded again when a prompt ends on a block boundary. That block is a duplicate and stays unregistered. (A
  request admitted while another with the same prompt runs takes even its last tokens from it: share, kv.py.)
- Images: a block's hash includes the content key of every image overlapping it (image_spans: a key of its
  preprocessed patches, which fix its features and number of soft tokens) and the image's offset. Reuse never ends
  strictly inside an image, so the suffix holds whole images: the vision tower runs on whole images, and each
  image's soft tokens still all attend to each other (use_bidirectional_attention "vision").
- Sliding-window layers are paged like the full ones: every layer keeps every block. A sliding layer reads only the
  last window - 1 committed slots, yet sliding layers hold most of the K/V (26b-a4b: 25 of 30 layers, 91% of the
  bytes per token), so a second pool for them holding window + canvas slots per sequence (as vLLM's hybrid
  allocator) would take about 8x less memory at 32k tokens; its prefix hits then need the blocks of the window
  before the reused prefix's end. Not done yet.

Runner integration (engine/kv.py does this; the model does not change, paged_cache.PagedKVCache has KVCache's
interface):
1. Admission: scheduler asks can_allocate(prompt, images, len(prompt) + canvas); allocate() returns the table
   with table.num_cached_tokens prompt tokens already in the cache. The runner binds it to a free row
   (cache.assign(row, table.blocks, table.num_tokens)) and encodes prompt[num_cached_tokens:] only, then
   commit(table, those tokens), which hashes the blocks it filled.
2. Canvas: the decoder writes the canvas K/V into scratch slots [length, length + canvas) of blocks reserved for
   them and never advances the length; those slots are in the row's private blocks (a shared block is full, so all
   of it is below the length). On commit the encoder overwrites the same slots: commit(table, canvas), then
   reserve(table, table.num_tokens + canvas) and cache.assign again for the next canvas. Admission counts the
   blocks a request may ever take (blocks_needed) beside what the running ones may still take, so reserve never
   fails and nothing is preempted. kv.py commits canvases with register=False (see there: exactness).
3. Finish or cancel: free(table); the row is free. Its registered prompt blocks stay cached.
4. Chunked prefill (issue 30 item 2): allocate once, then encode prompt[a:b] chunk by chunk, each followed by
   commit(table, prompt[a:b]); a chunk ending on a block boundary makes its blocks reusable at once.
5. /metrics: stats() (hit rate over prompt tokens, block usage, evictions).
Exactness: a reused block holds, bit for bit, the K/V its first sequence computed. Encoding a prompt in two calls
is not bit-identical to one call on a CPU (from the first layer's output on, about 1e-6 on the tiny preset), so
"the same tokens with and without the cache" needs the cold path to encode in the chunks a warm one would: kv.py
encodes every prompt on one grid of prefill_chunk tokens and reuses prefixes in multiples of it (align).
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..images import ImageError, image_groups

DEFAULT_BLOCK_SIZE = 16


class OutOfBlocksError(RuntimeError):
    """An allocation the caller did not check first (can_allocate / can_reserve): a scheduling bug."""


def content_key(*tensors: torch.Tensor) -> bytes:
    """A 16-byte key of tensors' dtypes, shapes and contents: an image's preprocessed patches and positions."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


@dataclass(frozen=True)
class ImageSpan:
    """An image's tokens at prompt positions [start, end), with its content key (content_key)."""

    start: int
    end: int
    key: bytes


def image_spans(prompt: list[int], images: list, image_token: int) -> tuple[ImageSpan, ...]:
    """The ImageSpans of a prompt whose image tokens are expanded (images.expand_image_tokens): the i-th run of
    image tokens is images[i] (images.ImagePatches), keyed by its patches and positions."""
    groups = image_groups(torch.tensor([prompt], dtype=torch.long), image_token)[0]  # (T,)
    runs = int(groups.max()) + 1 if prompt else 0
    if runs != len(images):
        raise ImageError(f"the prompt has {runs} runs of image tokens for {len(images)} images")
    spans = []
    for i, image in enumerate(images):
        at = torch.nonzero(groups == i)[:, 0]
        spans.append(ImageSpan(int(at[0]), int(at[-1]) + 1, content_key(image.pixels, image.positions)))
    return tuple(spans)


@dataclass
class BlockTable:
    """One sequence's blocks. tokens: what the encoder has put in the cache (prompt, then committed canvases);
    hashes: the chain hash of each full block, in order; num_cached_tokens: prompt tokens found in the cache."""

    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    images: tuple[ImageSpan, ...] = ()
    hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0
    sealed: bool = False  # no more blocks are hashed (BlockManager.commit with register=False)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class Block:
    ref_count: int = 0
    hash: bytes | None = None  # set while the block is the registered holder of this hash
    tokens: tuple[int, ...] = ()
    extras: tuple = ()


@dataclass(frozen=True)
class PrefixCacheStats:
    num_blocks: int
    used_blocks: int  # held by a sequence
    cached_blocks: int  # free, holding a cached prefix block (evictable)
    query_tokens: int  # prompt tokens looked up
    hit_tokens: int  # of them found in the cache
    evictions: int
    peak_used_blocks: int = 0  # the most blocks held by sequences at once

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks


def block_hash(tokens: tuple[int, ...], parent: bytes | None, extras: tuple) -> bytes:
    """The chain hash of a full block: its token ids, its predecessor's hash (None for the first block) and its
    extras ((image key, image start relative to the block) for each image overlapping it)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(array("q", tokens).tobytes())
    for key, offset in extras:
        h.update(struct.pack("<qq", len(key), offset))
        h.update(key)
    return h.digest()


def _span_extras(images: tuple[ImageSpan, ...], lo: int, hi: int) -> tuple:
    """(image key, image start relative to lo) of each image overlapping [lo, hi)."""
    return tuple((im.key, im.start - lo) for im in images if im.start < hi and im.end > lo)


def _block_extras(images: tuple[ImageSpan, ...], index: int, block_size: int) -> tuple:
    return _span_extras(images, index * block_size, (index + 1) * block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.prefix_caching = prefix_caching  # False: nothing is registered, so nothing is reused
        self.blocks = [Block() for _ in range(num_blocks)]
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.empty: list[int] = list(range(num_blocks - 1, -1, -1))  # free, no cached content; pop() takes 0 first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free and cached, least recently released first
        self.query_tokens = self.hit_tokens = self.evictions = self.peak_used = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.empty) + len(self.evictable)

    def blocks_for(self, num_slots: int) -> int:
        return -(-num_slots // self.block_size)

    # --- prefix lookup ---
    def _cached_chain(self, prompt: list[int], images: tuple[ImageSpan, ...], align: int = 0) -> list[int]:
        """Block ids of the prompt's longest cached run of full blocks, within the reuse rules (module docstring);
        `align` (a multiple of block_size; default block_size): the reused length is a multiple of it."""
        bs = self.block_size
        align = align or bs
        if align % bs:
            raise ValueError(f"align {align} is not a multiple of the block size {bs}")
        limit = (len(prompt) - 1) // bs  # at least one token left to encode
        found: list[int] = []
        parent = None
        for i in range(limit):
            tokens = tuple(prompt[i * bs:(i + 1) * bs])
            extras = _block_extras(images, i, bs)
            parent = block_hash(tokens, parent, extras)
            bid = self.cached.get(parent)
            if bid is None or self.blocks[bid].tokens != tokens or self.blocks[bid].extras != extras:
                break
            found.append(bid)
        cut = len(found) * bs // align * align
        while any(im.start < cut < im.end for im in images):  # never end inside an image
            cut = min(im.start for im in images if im.start < cut < im.end) // align * align
        return found[:cut // bs]

    def match_prefix(self, prompt: list[int], images: tuple[ImageSpan, ...] = (), align: int = 0) -> int:
        """How many leading prompt tokens are in the cache and would be reused (a multiple of block_size, or of
        `align`, at most len(prompt) - 1). Changes nothing."""
        return len(self._cached_chain(prompt, tuple(images), align)) * self.block_size

    # --- allocation ---
    def _take(self) -> int:
        if self.empty:
            bid = self.empty.pop()
        elif self.evictable:
            bid, _ = self.evictable.popitem(last=False)
            block = self.blocks[bid]
            del self.cached[block.hash]
            block.hash, block.tokens, block.extras = None, (), ()
            self.evictions += 1
        else:
            raise OutOfBlocksError("no free KV block")
        self.blocks[bid].ref_count = 1
        self.peak_used = max(self.peak_used, self.num_blocks - self.num_free)
        return bid

    def _needed(self, chain: list[int], num_slots: int) -> int:
        """Free blocks an allocation takes: its new blocks, and its cached blocks that are now free."""
        return self.blocks_for(num_slots) - len(chain) + sum(1 for b in chain if b in self.evictable)

    def blocks_needed(self, prompt: list[int], images: tuple[ImageSpan, ...] = (), num_slots: int = 0,
                      align: int = 0) -> int:
        """The free blocks a new sequence with this prompt takes to hold `num_slots` slots in all."""
        return self._needed(self._cached_chain(prompt, tuple(images), align), max(num_slots, len(prompt)))

    def can_allocate(self, prompt: list[int], images: tuple[ImageSpan, ...] = (), num_slots: int = 0,
                     align: int = 0) -> bool:
        """Whether a new sequence with this prompt and `num_slots` slots in all (prompt plus scratch canvas) fits."""
        return self.blocks_needed(prompt, images, num_slots, align) <= self.num_free

    def allocate(self, prompt: list[int], images: tuple[ImageSpan, ...] = (), num_slots: int = 0,
                 align: int = 0) -> BlockTable:
        """A new sequence's table: the prompt's cached blocks (a multiple of `align` tokens, see _cached_chain),
        then fresh ones up to `num_slots` slots (at least the prompt). table.tokens holds the reused tokens; the
        caller encodes the rest and commits them."""
        images = tuple(images)
        num_slots = max(num_slots, len(prompt))
        chain = self._cached_chain(prompt, images, align)
        if self._needed(chain, num_slots) > self.num_free:
            raise OutOfBlocksError(f"{self._needed(chain, num_slots)} KV blocks needed, {self.num_free} free")
        for bid in chain:
            if self.blocks[bid].ref_count == 0:
                del self.evictable[bid]
            self.blocks[bid].ref_count += 1
        reused = len(chain) * self.block_size
        table = BlockTable(blocks=list(chain), tokens=list(prompt[:reused]), images=images,
                           hashes=[self.blocks[b].hash for b in chain], num_cached_tokens=reused)
        table.blocks += [self._take() for _ in range(self.blocks_for(num_slots) - len(chain))]
        self.query_tokens += len(prompt)
        self.hit_tokens += reused
        self.peak_used = max(self.peak_used, self.num_blocks - self.num_free)
        return table

    def can_reserve(self, table: BlockTable, num_slots: int) -> bool:
        return self.blocks_for(num_slots) - len(table.blocks) <= self.num_free

    def reserve(self, table: BlockTable, num_slots: int) -> None:
        """Grow the table to hold `num_slots` slots (the committed tokens plus the next scratch canvas)."""
        extra = self.blocks_for(num_slots) - len(table.blocks)
        if extra > self.num_free:
            raise OutOfBlocksError(f"{extra} KV blocks needed, {self.num_free} free")
        table.blocks += [self._take() for _ in range(extra)]

    def commit(self, table: BlockTable, tokens: list[int], register: bool = True) -> None:
        """The encoder appended `tokens` to the sequence's slots: hash and cache every block they filled.
        register=False: these tokens and all that follow them stay out of the prefix cache (table.sealed)."""
        bs = self.block_size
        if table.num_tokens + len(tokens) > len(table.blocks) * bs:
            raise OutOfBlocksError(f"{table.num_tokens + len(tokens)} tokens committed to "
                                   f"{len(table.blocks)} blocks of {bs}: reserve first")
        table.tokens += tokens
        table.sealed = table.sealed or not register or not self.prefix_caching
        if table.sealed:
            return
        for i in range(len(table.hashes), table.num_tokens // bs):
            block_tokens = tuple(table.tokens[i * bs:(i + 1) * bs])
            extras = _block_extras(table.images, i, bs)
            h = block_hash(block_tokens, table.hashes[-1] if table.hashes else None, extras)
            table.hashes.append(h)
            if h not in self.cached:  # else a duplicate of a cached block (module docstring): stays unregistered
                block = self.blocks[table.blocks[i]]
                block.hash, block.tokens, block.extras = h, block_tokens, extras
                self.cached[h] = table.blocks[i]

    def adopt(self, table: BlockTable, tokens: list[int]) -> bool:
        """Take `tokens`, the sequence's next whole blocks, from the cache if every one of them is there (another
        sequence with the same prefix encoded them since this one was allocated): the fresh blocks the table holds
        for them go back, the cached ones take their place, and it returns True; else it changes nothing. The
        caller rebinds the table to its row (PagedKVCache.assign) and encodes the tokens only on False."""
        bs = self.block_size
        start = table.num_tokens // bs
        if table.sealed or not self.prefix_caching or table.num_tokens % bs or len(tokens) % bs or not tokens:
            return False
        found, parent = [], table.hashes[-1] if table.hashes else None
        for i in range(start, start + len(tokens) // bs):
            block_tokens = tuple(tokens[(i - start) * bs:(i - start + 1) * bs])
            extras = _block_extras(table.images, i, bs)
            parent = block_hash(block_tokens, parent, extras)
            bid = self.cached.get(parent)
            if bid is None or self.blocks[bid].tokens != block_tokens or self.blocks[bid].extras != extras:
                return False
            found.append((i, bid, parent))
        for i, bid, h in found:
            self._swap(table, i, bid)
            table.hashes.append(h)
        table.tokens += tokens
        table.num_cached_tokens += len(tokens)
        self.hit_tokens += len(tokens)
        return True

    def tail_key(self, table: BlockTable, tokens: list[int]) -> bytes | None:
        """A key of `tokens`, a prompt's last ones, after what the table holds: its chain hash, the tokens and the
        images they overlap. Two sequences with one key encode them in the same call (kv.py). None without prefix
        caching or where the table's tokens do not end on a block boundary."""
        lo = table.num_tokens
        if not self.prefix_caching or table.sealed or lo % self.block_size:
            return None
        return block_hash(tuple(tokens), table.hashes[-1] if table.hashes else None,
                          _span_extras(table.images, lo, lo + len(tokens)))

    def share(self, table: BlockTable, source: BlockTable, tokens: list[int]) -> int | None:
        """Take `tokens`, the sequence's last prompt tokens, from `source`, which holds them after the same prefix,
        encoded in the same call (tail_key): the full blocks they fill are shared, reference-counted and not
        registered. -> source's block holding the rest, for the caller to copy into the table's own (None when
        the tokens end on a block boundary)."""
        bs = self.block_size
        start, end = table.num_tokens, table.num_tokens + len(tokens)
        if start % bs or source.tokens[start:end] != tokens:
            raise ValueError("share: the source does not hold these tokens after a block boundary")
        for i in range(start // bs, end // bs):
            self._swap(table, i, source.blocks[i])
        table.tokens += tokens
        table.sealed = True  # as the source's last chunk (kv.py): nothing after it is registered
        table.num_cached_tokens += len(tokens)
        self.hit_tokens += len(tokens)
        return source.blocks[end // bs] if end % bs else None

    def _swap(self, table: BlockTable, index: int, bid: int) -> None:
        """The table's fresh block at `index` (reserved, never written nor registered) goes back; `bid` replaces it."""
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self.evictable[bid]
        block.ref_count += 1
        fresh = self.blocks[table.blocks[index]]
        fresh.ref_count -= 1
        if fresh.ref_count == 0:
            self.empty.append(table.blocks[index])
        table.blocks[index] = bid

    def free(self, table: BlockTable) -> None:
        """Release a finished, cancelled or preempted sequence's blocks; cached ones stay until evicted."""
        for bid in reversed(table.blocks):  # tail first: evicted before the head it depends on
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.evictable[bid] = None
                else:
                    self.empty.append(bid)
        table.blocks, table.hashes, table.tokens = [], [], []

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self.num_blocks, self.num_blocks - self.num_free, len(self.evictable),
                                self.query_tokens, self.hit_tokens, self.evictions, self.peak_used)
