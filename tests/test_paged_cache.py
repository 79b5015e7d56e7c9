"""The paged KV cache against the contiguous one: the same model passes give bit-identical logits and K/V, for rows
at different lengths, in lockstep, with a prefix shared between sequences, and after its blocks were evicted."""

from __future__ import annotations

import pytest
import torch

from dgemma.cache import CacheFullError
from dgemma.engine.block_manager import BlockManager, BlockTable
from dgemma.paged_cache import KVBudgetError, PagedKVCache, blocks_for_budget, bytes_per_block
from dgemma.presets import preset_config, random_model

C = 8  # canvas
BS = 4  # block size: divides the canvas, and small enough that every row spans many blocks
CAPACITY = 64


@pytest.fixture(scope="module")
def model():
    # window 6: sliding layers attend over less than the cache, so their key range starts past 0
    return random_model(preset_config("tiny", sliding_window=6, canvas_length=C), std=0.1, seed=0)


def paged(model, num_blocks: int, rows: int) -> tuple[BlockManager, PagedKVCache]:
    cache = PagedKVCache(model.config, num_blocks, BS, rows, CAPACITY, model.dtype, model.device)
    return BlockManager(num_blocks, BS), cache


def admit(model, bm: BlockManager, cache: PagedKVCache, row: int, prompt: list[int]) -> BlockTable:
    """What the runner will do at admission: allocate (reusing cached blocks), encode the rest, commit it."""
    table = bm.allocate(prompt, num_slots=len(prompt) + C)
    cache.assign(row, table.blocks, table.num_tokens)
    rest = prompt[table.num_cached_tokens:]
    model.encode(torch.tensor([rest]), cache, rows=[row])
    bm.commit(table, rest)
    assert cache.lengths[row] == table.num_tokens == len(prompt)
    return table


def commit_canvas(model, bm, cache, rows: list[int], tables: list[BlockTable], canvas: torch.Tensor) -> None:
    """What the runner will do at a canvas commit: encode it, hash its blocks, reserve the next canvas's slots."""
    model.encode(canvas, cache, rows=rows)
    for row, table, tokens in zip(rows, tables, canvas.tolist()):
        bm.commit(table, tokens)
        bm.reserve(table, table.num_tokens + C)
        cache.assign(row, table.blocks, table.num_tokens)


def row_kv(cache, row: int) -> list[torch.Tensor]:
    """A row's committed K and V per layer, (nkv, length, hd), from either cache."""
    n = cache.lengths[row]
    if isinstance(cache, PagedKVCache):
        slots = torch.arange(n)
        blocks = cache.tables[row][slots // BS]
        return [pool[blocks, :, slots % BS].transpose(0, 1) for pool in cache.k + cache.v]
    return [t[row, :, :n] for t in cache.k + cache.v]


def assert_same_kv(a, b, pairs: list[tuple[int, int]]) -> None:
    for ra, rb in pairs:
        assert a.lengths[ra] == b.lengths[rb]
        assert all(torch.equal(x, y) for x, y in zip(row_kv(a, ra), row_kv(b, rb)))


def prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def test_rows_at_different_lengths_are_bit_identical(model):
    """Prompts of 5, 17 and 9 tokens in blocks taken in an interleaved order, two canvases each, batched in a
    shuffled row order: logits and K/V equal the contiguous cache's bit for bit."""
    ps = prompts(5, 17, 9)
    ref = model.new_cache(3, CAPACITY)
    bm, cache = paged(model, 64, 3)
    blocker = bm.allocate(list(range(3, 3 + 2 * BS)))  # so the rows' blocks do not start at 0 or sit in order
    tables = [admit(model, bm, cache, r, p) for r, p in enumerate(ps)]
    bm.free(blocker)
    for r, p in enumerate(ps):
        model.encode(torch.tensor([p]), ref, rows=[r])
    assert_same_kv(cache, ref, [(r, r) for r in range(3)])
    rows = [2, 0, 1]
    g = torch.Generator().manual_seed(2)
    logits = None
    for _ in range(2):  # denoise twice (self-conditioned), commit, again
        canvas = torch.randint(0, 500, (3, C), generator=g)
        for _step in range(2):
            a = model.denoise(canvas, ref, logits, rows=rows)
            b = model.denoise(canvas, cache, logits, rows=rows)
            assert torch.equal(a, b)
            logits = a
        masked = []  # one attention call over the longest row's range, the rest masked (the path off a CPU)
        for c in (ref, cache):
            plan = model.plan(c, rows, C, encoder=False)
            plan.spans = None
            masked.append(model.decode(canvas, None, plan))
        assert torch.equal(*masked)
        model.encode(canvas, ref, rows=rows)
        commit_canvas(model, bm, cache, rows, [tables[r] for r in rows], canvas)
        assert_same_kv(cache, ref, [(r, r) for r in range(3)])
    assert cache.lengths == ref.lengths == [5 + 2 * C, 17 + 2 * C, 9 + 2 * C]


@torch.no_grad()
def test_lockstep_rows_are_bit_identical(model):
    """rows=None (offline generation's lockstep path): the writer gets one int slot for every row."""
    ps = prompts(11, 11, seed=3)
    ref = model.new_cache(2, CAPACITY)
    model.encode(torch.tensor(ps), ref)
    bm, cache = paged(model, 32, 2)
    tables = [bm.allocate(p, num_slots=len(p) + C) for p in ps]
    for r, t in enumerate(tables):
        cache.assign(r, t.blocks, 0)
    model.encode(torch.tensor(ps), cache)
    canvas = torch.randint(0, 500, (2, C), generator=torch.Generator().manual_seed(4))
    assert torch.equal(model.denoise(canvas, ref), model.denoise(canvas, cache))
    assert_same_kv(cache, ref, [(0, 0), (1, 1)])


@torch.no_grad()
def test_shared_prefix_encodes_only_the_suffix(model):
    """B's prompt starts with A's first 16 tokens: B takes A's 4 full blocks (shared, two references) and encodes
    its own 7 tokens. B's logits equal, bit for bit, a contiguous cache holding A's prefix K/V and B's suffix, and
    match encoding B's whole prompt up to rounding (a 7-token encode rounds differently from a 23-token one: the
    MoE's per-expert matmuls change shape). The decoder and the commit leave the shared blocks as they were."""
    a_prompt, b_suffix = prompts(21, 7, seed=5)
    b_prompt = a_prompt[:16] + b_suffix
    bm, cache = paged(model, 64, 2)
    a = admit(model, bm, cache, 0, a_prompt)
    shared = a.blocks[:4]
    before = [pool[shared].clone() for pool in cache.k + cache.v]
    assert bm.match_prefix(b_prompt) == 16
    b = admit(model, bm, cache, 1, b_prompt)
    assert b.num_cached_tokens == 16 and b.blocks[:4] == shared and b.blocks[4] not in a.blocks
    assert all(bm.blocks[i].ref_count == 2 for i in shared)

    ref = model.new_cache(1, CAPACITY)  # the same computation on the contiguous cache: A's prefix, then B's rest
    model.encode(torch.tensor([a_prompt]), ref)
    ref.lengths[0] = 16
    model.encode(torch.tensor([b_suffix]), ref)
    cold = model.new_cache(1, CAPACITY)  # B encoded whole
    model.encode(torch.tensor([b_prompt]), cold)

    canvas = torch.randint(0, 500, (1, C), generator=torch.Generator().manual_seed(6))
    logits = model.denoise(canvas, cache, rows=[1])
    assert torch.equal(logits, model.denoise(canvas, ref))
    assert (logits - model.denoise(canvas, cold)).abs().max() < 1e-5
    assert_same_kv(cache, ref, [(1, 0)])
    commit_canvas(model, bm, cache, [1, 0], [b, a], torch.cat([canvas, canvas]))
    assert all(torch.equal(x, pool[shared]) for x, pool in zip(before, cache.k + cache.v))


@torch.no_grad()
def test_after_eviction_a_prompt_is_encoded_again_and_exact(model):
    """A pool of 14 blocks. A (21 tokens + canvas: 8 blocks, 5 of them full and cached) finishes; C, unrelated,
    needs 11 blocks: it takes the 9 empty ones and evicts A's 2 least recently released, tail first. B, sharing A's
    first 16 tokens, then reuses the 3 blocks that survived; its K/V and logits are still the contiguous cache's."""
    a_prompt, c_prompt, b_suffix = prompts(21, 36, 7, seed=7)
    b_prompt = a_prompt[:16] + b_suffix
    bm, cache = paged(model, 14, 2)
    a = admit(model, bm, cache, 0, a_prompt)
    a_blocks = list(a.blocks)
    bm.free(a)
    cache.reset_row(0)
    assert bm.match_prefix(b_prompt) == 16
    c = admit(model, bm, cache, 0, c_prompt)
    assert bm.stats().evictions == 2 and set(a_blocks[3:5]) <= set(c.blocks)
    assert bm.match_prefix(b_prompt) == 12
    bm.free(c)
    cache.reset_row(0)
    b = admit(model, bm, cache, 1, b_prompt)
    assert b.blocks[:3] == a_blocks[:3] and b.num_cached_tokens == 12

    ref = model.new_cache(1, CAPACITY)
    model.encode(torch.tensor([a_prompt]), ref)
    ref.lengths[0] = 12
    model.encode(torch.tensor([b_prompt[12:]]), ref)
    assert_same_kv(cache, ref, [(1, 0)])
    canvas = torch.randint(0, 500, (1, C), generator=torch.Generator().manual_seed(8))
    assert torch.equal(model.denoise(canvas, cache, rows=[1]), model.denoise(canvas, ref))


@torch.no_grad()
def test_a_row_cannot_write_past_its_blocks(model):
    bm, cache = paged(model, 8, 1)
    prompt = list(range(3, 13))
    table = bm.allocate(prompt)  # 10 tokens, no room asked for a canvas: 3 blocks, 12 slots
    cache.assign(0, table.blocks, 0)
    model.encode(torch.tensor([prompt]), cache)
    bm.commit(table, prompt)
    with pytest.raises(CacheFullError, match="12 slots"):
        model.denoise(torch.zeros(1, C, dtype=torch.long), cache)
    bm.reserve(table, 10 + C)
    cache.assign(0, table.blocks, 10)
    model.denoise(torch.zeros(1, C, dtype=torch.long), cache)


def test_block_bytes_and_budget():
    cfg = preset_config("tiny").text  # 1 sliding layer (2 KV heads of 16), 1 full (1 of 32)
    assert bytes_per_block(cfg, 16, torch.float32) == 2 * (2 * 16 + 1 * 32) * 16 * 4
    assert bytes_per_block(cfg, 16, torch.bfloat16) == 2 * (2 * 16 + 1 * 32) * 16 * 2
    cache = PagedKVCache(cfg, 10, 16, 2, 64, torch.float32, "meta")
    assert cache.nbytes() == 10 * bytes_per_block(cfg, 16, torch.float32)
    assert blocks_for_budget(cfg, 16, torch.float32, 1 / 1024, 64) == 2**20 // 8192
    with pytest.raises(KVBudgetError, match="--kv-cache-gib"):
        blocks_for_budget(cfg, 16, torch.float32, 1e-5, 4096)


@torch.no_grad()
def test_blocks_with_images_are_shared_only_for_the_same_image():
    """Encoder passes with image features (their soft tokens attending to each other, as the release's encoder
    does). B shares A's first 16 tokens and image and brings a second image in its own suffix; C has A's tokens but
    another image, and reuses only the block before it. Both match the contiguous cache bit for bit."""
    from dgemma.engine.block_manager import content_key, image_spans
    from dgemma.images import ImagePatches, image_groups

    model = random_model(preset_config("tiny", sliding_window=6, canvas_length=C, bidirectional_vision=True),
                         std=0.1, seed=0)
    IMG, H = 9, model.config.hidden_size
    g = torch.Generator().manual_seed(9)
    patches = [ImagePatches(torch.rand(n, 12, generator=g), torch.zeros(n, 2, dtype=torch.long), n) for n in (6, 4, 6)]
    features = {content_key(p.pixels, p.positions): torch.randn(p.num_soft_tokens, H, generator=g) for p in patches}

    def encode(cache, row: int, tokens: list[int], spans, start: int) -> None:
        """Encode tokens[start:] into `row`, each image's soft tokens taking its features (all of them: reuse never
        ends inside an image)."""
        ids = torch.tensor([tokens])
        embeds = model.embed(ids)
        for span in spans:
            embeds[0, span.start:span.end] = features[span.key]
        model.encode(ids[:, start:], cache, rows=[row], embeds=embeds[:, start:],
                     image_groups=image_groups(ids[:, start:], IMG))

    text = prompts(21, seed=10)[0]
    a_prompt = text[:5] + [IMG] * 6 + text[11:]
    b_prompt = a_prompt[:16] + [4, 5] + [IMG] * 4 + [6]
    bm, cache = paged(model, 64, 3)
    ref = model.new_cache(3, CAPACITY)
    canvas = torch.randint(0, 500, (1, C), generator=g)
    for row, (prompt, images, reused) in enumerate([(a_prompt, [patches[0]], 0), (b_prompt, patches[:2], 16),
                                                     (a_prompt, [patches[2]], 4)]):
        spans = image_spans(prompt, images, IMG)
        table = bm.allocate(prompt, spans, len(prompt) + C)
        assert table.num_cached_tokens == reused
        cache.assign(row, table.blocks, reused)
        encode(cache, row, prompt, spans, reused)
        bm.commit(table, prompt[reused:])
        if reused:  # the contiguous cache: A's K/V up to the reused length, then this prompt's rest
            encode(ref, row, a_prompt, image_spans(a_prompt, [patches[0]], IMG), 0)
            ref.lengths[row] = reused
        encode(ref, row, prompt, spans, reused)
        assert_same_kv(cache, ref, [(row, row)])
        assert torch.equal(model.denoise(canvas, cache, rows=[row]), model.denoise(canvas, ref, rows=[row]))
