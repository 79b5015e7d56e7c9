"""The KV cache: decoder passes leave it unchanged, and rows at different lengths batch correctly."""

from __future__ import annotations

import torch

from dgemma.presets import preset_config, random_model


def _model(window=6):
    cfg = preset_config("tiny", sliding_window=window, canvas_length=8)
    return random_model(cfg, std=0.1, seed=0)


@torch.no_grad()
def test_denoise_leaves_committed_cache_unchanged():
    model = _model()
    cache = model.new_cache(1, 64)
    model.encode(torch.randint(3, 500, (1, 13)), cache)
    before = [k[:, :, :13].clone() for k in cache.k] + [v[:, :, :13].clone() for v in cache.v]
    model.denoise(torch.randint(0, 500, (1, 8)), cache)
    after = [k[:, :, :13] for k in cache.k] + [v[:, :, :13] for v in cache.v]
    assert cache.length == 13
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@torch.no_grad()
def test_rows_at_different_lengths_match_separate_runs():
    """Batched rows gather their keys over a wider range (masked) than a row alone, so sums run in another order:
    fp32 logits of size ~1 then differ by ~1e-5, which varies with the CPU's kernels (1.04e-5 measured here)."""
    model = _model(window=6)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (1, n), generator=gen) for n in (5, 17, 9)]
    canvases = [torch.randint(0, 500, (1, 8), generator=gen) for _ in prompts]

    # each sequence alone
    alone = []
    for p, c in zip(prompts, canvases):
        cache = model.new_cache(1, 64)
        model.encode(p, cache)
        first = model.denoise(c, cache)
        model.encode(c, cache)  # commit the canvas
        second = model.denoise(c.flip(-1), cache, first)
        alone.append((first, second))

    # all three in one cache, rows at different lengths, prefilled one by one
    shared = model.new_cache(3, 64)
    for r, p in enumerate(prompts):
        model.encode(p, shared, rows=[r])
    assert shared.lengths == [5, 17, 9]
    rows = [2, 0, 1]  # any order
    first = model.denoise(torch.cat([canvases[r] for r in rows]), shared, rows=rows)
    for i, r in enumerate(rows):
        assert (first[i] - alone[r][0][0]).abs().max() < 3e-5
    model.encode(torch.cat([canvases[r] for r in rows]), shared, rows=rows)
    second = model.denoise(torch.cat([canvases[r].flip(-1) for r in rows]), shared, first, rows=rows)
    for i, r in enumerate(rows):
        assert (second[i] - alone[r][1][0]).abs().max() < 3e-5


@torch.no_grad()
def test_cache_grows_without_losing_contents():
    model = _model()
    cache = model.new_cache(1, 16)
    model.encode(torch.randint(3, 500, (1, 12)), cache)
    snapshot = cache.k[0][:, :, :12].clone()
    cache.reserve(40)
    assert cache.capacity >= 40 and torch.equal(cache.k[0][:, :, :12], snapshot)
