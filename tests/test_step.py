"""The one denoising step's pieces: the fast sampler samples multinomial's distribution, both draw policies and
both strategies agree where they must."""

from __future__ import annotations

import pytest
import torch

from dgemma.sampling import inverse_cdf_sample, race_sample, skip_inverse_cdf

# chi-square critical value for 7 degrees of freedom at p = 0.001
CHI2_7_DOF_P001 = 24.32


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("sampler", [inverse_cdf_sample, race_sample])
def test_fast_and_exact_samplers_draw_the_softmax_distribution(sampler):
    """Chi-square goodness of fit on an 8-token vocabulary: 40,000 positions at once, all accepted."""
    probs = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.04, 0.01])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    sampled = sampler(probs.expand(n, -1).contiguous(), torch.ones(n, dtype=torch.bool), g)
    counts = torch.bincount(sampled, minlength=8).double()
    assert _chi_square(counts, probs.double()) < CHI2_7_DOF_P001


def test_chi_square_test_detects_a_wrong_distribution():
    """The same test fails a sampler that is off by a little: it can tell the difference it is meant to."""
    probs = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.04, 0.01])
    skewed = torch.tensor([0.28, 0.22, 0.15, 0.12, 0.10, 0.08, 0.04, 0.01])
    n = 40_000
    sampled = inverse_cdf_sample(skewed.expand(n, -1).contiguous(), torch.ones(n, dtype=torch.bool),
                                 torch.Generator().manual_seed(0))
    counts = torch.bincount(sampled, minlength=8).double()
    assert _chi_square(counts, probs.double()) > CHI2_7_DOF_P001


def test_fast_sampler_never_picks_a_zero_probability_token_and_skips_like_it_samples():
    probs = torch.zeros(500, 300)
    probs[:, 7], probs[:, 299], probs[:, 0] = 0.5, 0.25, 0.25
    accepted = torch.rand(500, generator=torch.Generator().manual_seed(1)) < 0.7
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampled = inverse_cdf_sample(probs, accepted, a)
    assert set(sampled[accepted].tolist()) <= {0, 7, 299}
    assert (sampled[~accepted] == 0).all()
    skip_inverse_cdf(500, b, torch.device("cpu"))  # the generator ends where sampling left it
    assert torch.equal(a.get_state(), b.get_state())


def _one_step(pick, strategy: str, sampler: str, temperature: float = 2.0, bound: float = 1e6):
    """One denoising step of two rows (prompts of different lengths, per-row generators) with `pick` for both;
    -> the state after it."""
    from dgemma.presets import preset_config, random_model
    from dgemma.step import CanvasState, PerRowDraws, denoise_step, make_head, token_sampler

    model = random_model(preset_config("tiny", canvas_length=16, vocab_size=256), std=0.1, seed=0)
    state = CanvasState(model, 2, 1, 0.005)
    cache = model.new_cache(2, 64)
    with torch.inference_mode():
        for row, prompt in enumerate([[5, 6, 7], [9] * 10]):
            model.encode(torch.tensor([prompt]), cache, rows=[row])
        generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
        state.start([0, 1], torch.cat([torch.randint(0, 256, (1, 16), generator=g) for g in generators]))
        plan = model.plan(cache, [0, 1], 16, encoder=False)
        denoise_step(model, state, plan, make_head(strategy, model), PerRowDraws(token_sampler(sampler, 256, "cpu")),
                     torch.full((2,), temperature), torch.full((2,), bound), generators, [pick, pick], rows=[0, 1],
                     first=True)
    return state


@pytest.mark.parametrize("strategy", ["rows", "batched"])
@pytest.mark.parametrize("sampler", ["exact", "fast"])
def test_top_k_one_keeps_the_argmax_where_uncut_draws_do_not(strategy, sampler):
    """With a cut to the single most probable token, every accepted position holds the argmax; uncut, at a high
    temperature with every position accepted, most do not. A cut to the whole vocabulary is no cut at all."""
    from dgemma.sampling import TopKTopP
    from dgemma.step import DRAW, Draw

    cut = _one_step(Draw(TopKTopP(top_k=1)), strategy, sampler)
    assert cut.accepted.all() and torch.equal(cut.canvas, cut.argmax)
    uncut = _one_step(DRAW, strategy, sampler)
    assert uncut.accepted.all() and (uncut.canvas != uncut.argmax).float().mean() > 0.5
    assert torch.equal(_one_step(Draw(TopKTopP(top_k=256, top_p=1.0)), strategy, sampler).canvas, uncut.canvas)
    tiny_p = _one_step(Draw(TopKTopP(top_p=1e-9)), strategy, sampler)
    assert torch.equal(tiny_p.canvas, cut.canvas)
