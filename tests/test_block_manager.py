"""The block manager's bookkeeping on its own: prefix matching, reference counts, LRU eviction, images, counters."""

from __future__ import annotations

import random

import pytest
import torch

from dgemma.engine.block_manager import (BlockManager, ImageSpan, OutOfBlocksError, block_hash, content_key,
                                         image_spans)

BS = 4


def run(bm: BlockManager, prompt: list[int], images=(), canvas: int = 8, canvases: list[list[int]] = ()):
    """Admit a prompt, 'encode' what is not cached, commit canvases as the runner will; -> the table."""
    table = bm.allocate(prompt, images, len(prompt) + canvas)
    bm.commit(table, prompt[table.num_cached_tokens:])
    for c in canvases:
        bm.commit(table, c)
        bm.reserve(table, table.num_tokens + canvas)
    return table


def check_consistent(bm: BlockManager, tables) -> None:
    """Every block is in exactly one place, reference counts match the tables, the hash map points at its blocks."""
    refs = [0] * bm.num_blocks
    for t in tables:
        for b in t.blocks:
            refs[b] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    free = list(bm.empty) + list(bm.evictable)
    assert len(free) == len(set(free)) and all(refs[b] == 0 for b in free)
    assert sorted(free + [b for b in range(bm.num_blocks) if refs[b]]) == list(range(bm.num_blocks))
    assert all(bm.blocks[b].hash == h for h, b in bm.cached.items())
    assert all(bm.blocks[b].hash is not None for b in bm.evictable)
    assert all(bm.blocks[b].hash is None for b in bm.empty)


def test_full_blocks_are_shared_and_the_last_token_is_always_encoded():
    bm = BlockManager(32, BS)
    a = run(bm, list(range(10, 20)))  # 10 tokens: blocks 0-1 full and cached, block 2 partial
    assert len(bm.cached) == 2 and a.num_cached_tokens == 0
    b = run(bm, list(range(10, 20)) + [7])
    assert b.num_cached_tokens == 8 and b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    assert [bm.blocks[x].ref_count for x in a.blocks[:2]] == [2, 2]
    # an 8-token prompt, all of it cached: one block is encoded again, into a block of its own
    c = run(bm, list(range(10, 18)))
    assert c.num_cached_tokens == 4 and c.blocks[0] == a.blocks[0] and c.blocks[1] != a.blocks[1]
    assert bm.cached[c.hashes[1]] == a.blocks[1]  # the duplicate stays unregistered
    assert bm.match_prefix([10]) == 0 and bm.match_prefix([]) == 0
    check_consistent(bm, [a, b, c])
    for t in (a, b, c):
        bm.free(t)
    check_consistent(bm, [])
    assert bm.stats().used_blocks == 0 and bm.stats().cached_blocks == 2


def test_adopt_swaps_fresh_blocks_for_cached_ones_only_when_all_are_cached():
    """Two sequences with one prompt allocated before either encodes: the second takes the first's blocks once they
    are committed, a run of blocks only partly cached is left alone, and every count stays consistent."""
    bm = BlockManager(16, BS)
    prompt = list(range(10, 23))  # 13 tokens: three full blocks
    a = bm.allocate(prompt, (), len(prompt) + 4)
    b = bm.allocate(prompt, (), len(prompt) + 4)
    assert b.num_cached_tokens == 0 and bm.num_free == 6  # five blocks each
    bm.commit(a, prompt[:4])
    assert not bm.adopt(b, prompt[:8])  # the second block is not cached yet: nothing changes
    assert b.num_tokens == 0 and bm.num_free == 6
    assert bm.adopt(b, prompt[:4])
    bm.commit(a, prompt[4:])
    assert bm.adopt(b, prompt[4:12]) and not bm.adopt(b, prompt[12:])  # a partial block is never adopted
    assert b.blocks[:3] == a.blocks[:3] and b.num_cached_tokens == 12 and b.hashes == a.hashes[:3]
    assert bm.num_free == 9 and bm.stats().hit_tokens == 12
    check_consistent(bm, [a, b])
    bm.commit(b, prompt[12:])
    bm.free(a)
    bm.free(b)
    check_consistent(bm, [])


def test_a_prompts_last_tokens_are_shared_with_a_sequence_that_encoded_them():
    """share: the full blocks of the same last tokens after the same prefix are taken by reference, and the source's
    partial block is returned for the caller to copy; tail_key tells the same tokens after the same prefix apart."""
    bm = BlockManager(16, BS)
    prompt = list(range(10, 23))  # 13 tokens: three full blocks and one of a single token
    a = bm.allocate(prompt, (), len(prompt) + 4)
    b = bm.allocate(prompt, (), len(prompt) + 4)
    key = bm.tail_key(a, prompt)
    assert key == bm.tail_key(b, prompt) and key != bm.tail_key(b, prompt[:12] + [99])
    bm.commit(a, prompt, register=False)
    assert bm.share(b, a, prompt) == a.blocks[3]
    assert b.blocks[:3] == a.blocks[:3] and b.blocks[3] != a.blocks[3] and b.num_cached_tokens == 13
    assert b.sealed and not bm.cached and bm.num_free == 16 - 10 + 3
    check_consistent(bm, [a, b])
    bm.free(a)
    check_consistent(bm, [b])
    bm.free(b)
    check_consistent(bm, [])
    assert bm.num_free == 16


def test_the_hash_chains_through_predecessors():
    bm = BlockManager(16, BS)
    run(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 0]) == 8
    assert bm.match_prefix([0, 0, 0, 0, 5, 6, 7, 8, 9]) == 0  # block 1's tokens match, its predecessor does not
    assert block_hash((5, 6, 7, 8), None, ()) != block_hash((5, 6, 7, 8), block_hash((1, 2, 3, 4), None, ()), ())


def test_committed_canvases_are_cached_for_the_next_turn():
    bm = BlockManager(32, BS)
    prompt, answer = [5] * 6, [list(range(20, 28))]
    a = run(bm, prompt, canvases=answer)
    assert a.num_tokens == 14 and len(a.hashes) == 3
    bm.free(a)
    follow_up = prompt + answer[0] + [9, 9, 9]
    assert bm.match_prefix(follow_up) == 12


def test_lru_evicts_the_least_recently_released_tail_first():
    bm = BlockManager(8, BS)
    a = run(bm, list(range(100, 109)), canvas=0)  # 9 tokens: 3 blocks, 2 cached
    b = run(bm, list(range(200, 209)), canvas=0)
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 8 and len(bm.evictable) == 4
    # 5 blocks: the 4 empty ones (the partial blocks and the 2 never used), then one eviction: a's tail block
    # (a was released before b)
    c = bm.allocate([1] * 20)
    assert bm.evictions == 1 and bm.match_prefix(list(range(100, 109))) == 4
    assert bm.match_prefix(list(range(200, 209))) == 8
    bm.free(c)
    check_consistent(bm, [])


def test_a_hit_on_a_free_cached_block_counts_against_the_free_blocks():
    bm = BlockManager(4, BS)
    bm.free(run(bm, list(range(9)), canvas=0))  # 2 cached blocks, free
    prompt = list(range(9)) + [50] * 6  # reuses 8 tokens; 15 slots: 4 blocks, 2 of them the cached free ones
    assert bm.can_allocate(prompt, num_slots=15) and not bm.can_allocate(prompt, num_slots=17)
    with pytest.raises(OutOfBlocksError):
        bm.allocate(prompt, num_slots=17)
    check_consistent(bm, [])  # a refused allocation takes nothing
    t = bm.allocate(prompt, num_slots=15)
    assert t.num_cached_tokens == 8 and bm.num_free == 0 and bm.evictions == 0
    assert not bm.can_reserve(t, 17) and bm.can_reserve(t, 16)
    with pytest.raises(OutOfBlocksError):
        bm.commit(t, [1] * 9)  # 8 + 9 tokens > 16 slots


def test_an_image_is_part_of_the_hash_and_reuse_never_ends_inside_one():
    cat, dog = content_key(torch.zeros(3, 4)), content_key(torch.ones(3, 4))
    assert cat != dog and cat == content_key(torch.zeros(3, 4)) and cat != content_key(torch.zeros(4, 3))
    IMG = 9
    prompt = [1, 2, 3] + [IMG] * 6 + [4, 5, 6, 7, 8, 9, 10]  # image tokens at [3, 9); 16 tokens
    bm = BlockManager(32, BS)
    run(bm, prompt, (ImageSpan(3, 9, cat),))
    assert bm.match_prefix(prompt, (ImageSpan(3, 9, cat),)) == 12
    assert bm.match_prefix(prompt, (ImageSpan(3, 9, dog),)) == 0  # same tokens, another image
    assert bm.match_prefix(prompt, ()) == 0
    # an image at [6, 10): a prompt that shares blocks 0-1 would end at 8, inside it; reuse ends at 4 instead
    prompt = [1, 2, 3, 4, 5, 6] + [IMG] * 4 + [7, 8, 9, 10, 11, 12]
    run(bm, prompt, (ImageSpan(6, 10, cat),))
    assert bm.match_prefix(prompt[:10] + [0] * 6, (ImageSpan(6, 10, cat),)) == 4


def test_no_leak_after_500_requests_under_pressure():
    """Random prompts drawn from a few shared prefixes, random lengths and canvases, random finish order, in a pool
    far too small to cache them all: every block is accounted for throughout, and all come back."""
    rng = random.Random(0)
    bm = BlockManager(40, BS)
    prefixes = [[rng.randrange(3, 50) for _ in range(rng.randrange(4, 30))] for _ in range(5)]
    running = []

    def make_room(admit: bool, table=None, slots: int = 0):
        while not (bm.can_allocate(prompt, num_slots=slots) if admit else bm.can_reserve(table, slots)):
            bm.free(running.pop(rng.randrange(len(running))))

    for _ in range(500):
        prompt = rng.choice(prefixes) + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 10))]
        make_room(True, slots=len(prompt) + 8)
        table = bm.allocate(prompt, num_slots=len(prompt) + 8)
        assert table.num_cached_tokens % BS == 0 and table.num_cached_tokens < len(prompt)
        bm.commit(table, prompt[table.num_cached_tokens:])
        for _canvas in range(rng.randrange(3)):
            bm.commit(table, [rng.randrange(3, 50) for _ in range(8)])
            make_room(False, table, table.num_tokens + 8)
            bm.reserve(table, table.num_tokens + 8)
        running.append(table)
        check_consistent(bm, running)
    for t in running:
        bm.free(t)
    check_consistent(bm, [])
    s = bm.stats()
    assert s.used_blocks == 0 and s.evictions > 0 and 0.2 < s.hit_rate < 1 and s.usage == 0


def test_image_spans_key_each_run_of_image_tokens_by_its_patches():
    from dgemma.images import ImageError, ImagePatches

    IMG, BOI, EOI = 9, 7, 8
    a = ImagePatches(torch.zeros(4, 12), torch.zeros(4, 2, dtype=torch.long), 3)
    b = ImagePatches(torch.ones(4, 12), torch.zeros(4, 2, dtype=torch.long), 2)
    prompt = [1, BOI, IMG, IMG, IMG, EOI, 5, BOI, IMG, IMG, EOI]
    spans = image_spans(prompt, [a, b], IMG)
    assert spans == (ImageSpan(2, 5, content_key(a.pixels, a.positions)),
                     ImageSpan(8, 10, content_key(b.pixels, b.positions)))
    assert spans[0].key != spans[1].key
    assert image_spans([1, 2], [], IMG) == () and image_spans([], [], IMG) == ()
    with pytest.raises(ImageError, match="2 runs of image tokens for 1 images"):
        image_spans(prompt, [a], IMG)
