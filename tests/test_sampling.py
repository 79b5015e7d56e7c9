"""The sampler on its own: the fused step equals the plain composition (and torch.multinomial) bit for bit."""

from __future__ import annotations

import pytest
import torch

from dgemma import sampling
from dgemma.config import GenerationConfig
from dgemma.sampling import (StableAndConfident, entropy_bound_accept, random_tokens, sample_step, temperature,
                             token_entropy)


def _reference_step(logits, temp, bound):
    """What the reference does: Categorical entropy, multinomial sample, then randint renoise."""
    tempered = logits / temp
    probs = torch.softmax(tempered, dim=-1, dtype=torch.float32)
    B, C, V = probs.shape
    sampled = torch.multinomial(probs.view(-1, V), num_samples=1).view(B, C)
    entropy = torch.distributions.Categorical(logits=tempered).entropy()
    accepted = entropy_bound_accept(entropy, bound)
    noise = torch.randint(0, V, (B, C))
    return torch.where(accepted, sampled, noise), tempered.argmax(-1), entropy, accepted


@pytest.mark.parametrize("scale, bound, chunk", [(1.0, 0.1, None), (8.0, 0.1, None), (8.0, 50.0, None),
                                                (30.0, 1e6, None), (8.0, 50.0, 1500), (30.0, 1e6, 300)])
def test_fused_step_matches_multinomial_reference(scale, bound, chunk, monkeypatch):
    if chunk is not None:  # uniforms drawn and logits scored 5 (or 1) positions at a time, as in large vocabularies
        monkeypatch.setattr(sampling, "_RACE_CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(sampling, "_SCORE_CHUNK_ELEMENTS", chunk)
    gen = GenerationConfig(max_denoising_steps=10)
    logits = torch.randn(3, 24, 300, generator=torch.Generator().manual_seed(1)) * scale
    for remaining in (10, 3, 1):
        temp = temperature(gen, remaining, "cpu")
        torch.manual_seed(4)
        want_canvas, want_argmax, want_entropy, want_accepted = _reference_step(logits, temp, bound)
        torch.manual_seed(4)
        probs, sampled, argmax, entropy, accepted = sample_step(logits.clone(), temp, bound, None)
        canvas = torch.where(accepted, sampled, random_tokens((3, 24), 300, None, "cpu"))
        assert torch.equal(entropy, want_entropy) and torch.equal(accepted, want_accepted)
        assert torch.equal(argmax, want_argmax) and torch.equal(canvas, want_canvas)
        assert torch.equal(probs, torch.softmax(logits / temp, dim=-1))
        assert torch.equal(torch.get_rng_state(), _state_after_reference(logits, temp, bound))


@pytest.mark.parametrize("chunk", [None, 1500])
def test_scoring_with_soft_cap_and_probs_in_place_is_bit_exact(chunk, monkeypatch):
    """The CPU rows head hands cap_and_score_row_ a row's raw head outputs in one buffer: capping on the way and
    writing the probabilities over the logits must give what cap-then-score into a new tensor gives, and the
    whole-tensor kernels (score_whole, the GPU's) the same bits as the blocks."""
    if chunk is not None:
        monkeypatch.setattr(sampling, "_SCORE_CHUNK_ELEMENTS", chunk)
    raw = torch.randn(2, 24, 300, generator=torch.Generator().manual_seed(3)) * 40
    temp = torch.tensor(0.6)
    capped = torch.tanh(raw / 30.0) * 30.0
    want = sampling.temper_and_score(capped.clone(), temp)
    for a, b in zip(sampling.score_whole(capped.clone(), temp), want):
        assert torch.equal(a, b)
    for a, b in zip(sampling.score_blocks(capped.clone(), torch.full((2, 1, 1), 0.6)), want):  # a temp per row
        assert torch.equal(a, b)
    for r in range(2):
        buffer = raw[r].clone()
        got = sampling.cap_and_score_row_(buffer, temp, 30.0, 0, [])
        assert got[0].data_ptr() == buffer.data_ptr()
        for a, b in zip(got, want):
            assert torch.equal(a, b[r])
    banned = sampling.cap_and_score_row_(raw[0].clone(), temp, 30.0, 5, [7, 9])[0]
    assert (banned[:5, [7, 9]] == 0).all() and (banned[5:, [7, 9]] > 0).all()
    with pytest.raises(ValueError, match="fp32"):
        sampling.cap_and_score_row_(raw[0].double(), temp, 30.0, 0, [])


def test_top_k_top_p_keep_the_most_probable_tokens():
    """TopKTopP zeroes every token outside the cut and leaves the others' probabilities as they were."""
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25], [0.9, 0.06, 0.03, 0.01]])

    def kept(cut, rows=slice(None)) -> list:
        out = cut(probs[rows])
        assert torch.equal(out, torch.where(out > 0, probs[rows], 0.0))  # kept probabilities unchanged
        return (out > 0).int().tolist()

    cut = sampling.TopKTopP
    assert kept(cut(top_k=2)) == [[1, 0, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]  # ties with the last kept are kept
    assert kept(cut(top_p=0.75)) == [[1, 0, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert kept(cut(top_p=0.81), 0) == [1, 0, 1, 1]
    # top_p counts within the top_k: of {0.5, 0.3} (mass 0.8), 0.5 is 62.5%
    assert kept(cut(top_k=2, top_p=0.6), 0) == [1, 0, 0, 0]
    assert kept(cut(top_k=2, top_p=0.7), 0) == [1, 0, 1, 0]
    assert torch.equal(cut(top_k=4)(probs), probs) and torch.equal(cut(top_p=1.0)(probs), probs)
    assert torch.equal(cut(top_p=1e-9)(probs[[0, 2]]), cut(top_k=1)(probs[[0, 2]]))


@pytest.mark.parametrize("sample", [sampling.race_sample, sampling.inverse_cdf_sample])
def test_a_cut_draws_from_the_kept_tokens_in_proportion(sample):
    """Both samplers draw only kept tokens, each in proportion to its probability, with the draws of the uncut
    sampler (the generator ends where it would without the cut)."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1]).expand(6000, 4).contiguous()
    accepted = torch.ones(6000, dtype=torch.bool)
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    drawn = sample(probs, accepted, a, sampling.TopKTopP(top_k=2))
    sample(probs, accepted, b)
    assert torch.equal(a.get_state(), b.get_state())
    counts = torch.bincount(drawn, minlength=4).tolist()
    assert counts[2:] == [0, 0] and abs(counts[0] / 6000 - 0.4 / 0.7) < 0.03


def test_race_falls_back_to_multinomial_where_it_would_differ(monkeypatch):
    """On a torch whose multinomial draws differently, race_sample calls multinomial: still the reference."""
    assert sampling.race_matches_multinomial(torch.device("cpu"))  # the torch this is tested with
    monkeypatch.setitem(sampling._RACE_CHECKED, "cpu", False)
    logits = torch.randn(2, 9, 50, generator=torch.Generator().manual_seed(2)) * 4
    temp = torch.tensor(0.7)
    torch.manual_seed(4)
    want_canvas, *_ = _reference_step(logits, temp, 1e6)
    torch.manual_seed(4)
    _, sampled, _, _, accepted = sample_step(logits.clone(), temp, 1e6, None)
    assert accepted.all() and torch.equal(sampled, want_canvas)


def _state_after_reference(logits, temp, bound):
    torch.manual_seed(4)
    _reference_step(logits, temp, bound)
    return torch.get_rng_state()


def test_entropy_bound_accepts_lowest_entropy_prefix():
    entropy = torch.tensor([[0.5, 0.01, 0.02, 3.0, 0.04]])
    # sorted: 0.01, 0.02, 0.04, 0.5, 3.0; cumsum - current: 0, 0.01, 0.03, 0.07, 0.57
    assert entropy_bound_accept(entropy, 0.1).tolist() == [[True, True, True, False, True]]
    assert entropy_bound_accept(entropy, 0.05).tolist() == [[False, True, True, False, True]]
    assert entropy_bound_accept(entropy, 1e-9).sum() == 1  # the lowest-entropy position is always accepted


def test_token_entropy_of_uniform_and_one_hot():
    uniform = torch.zeros(1, 1, 64)
    assert torch.allclose(token_entropy(uniform), torch.log(torch.tensor(64.0)))
    one_hot = torch.full((1, 1, 64), -1e4)
    one_hot[..., 3] = 0
    assert token_entropy(one_hot).item() < 1e-6


def test_stable_and_confident_needs_both():
    stop = StableAndConfident(1, 0.5, 2, 4, "cpu")
    canvas = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    low, high = torch.full((2, 4), 0.1), torch.tensor([[0.1] * 4, [2.0] * 4])
    assert stop(canvas, low).tolist() == [False, False]  # nothing to be stable against yet
    assert stop(canvas, high).tolist() == [True, False]  # row 1 is stable but not confident


def test_stable_and_confident_tracks_a_subset_of_rows():
    """The serving engine steps some rows and not others; a row's history moves only when it is stepped."""
    stop = StableAndConfident(1, 0.5, 3, 2, "cpu")
    low = torch.full((1, 2), 0.1)
    row2 = torch.tensor([2])
    assert stop(torch.tensor([[7, 7]]), low, row2).tolist() == [False]
    assert stop(torch.tensor([[1, 1], [2, 2]]), low.expand(2, 2), torch.tensor([0, 1])).tolist() == [False, False]
    assert stop(torch.tensor([[7, 7]]), low, row2).tolist() == [True]  # rows 0 and 1 did not disturb row 2
    stop.reset(row2)
    assert stop(torch.tensor([[7, 7]]), low, row2).tolist() == [False]
    assert stop.history[0].tolist() == [[1, 1]]


def test_temperature_schedule_runs_from_t_max_toward_t_min():
    gen = GenerationConfig(max_denoising_steps=4, t_min=0.4, t_max=0.8)
    temps = [float(temperature(gen, n, "cpu")) for n in (4, 3, 2, 1)]
    assert temps[0] == pytest.approx(0.8) and temps == sorted(temps, reverse=True) and temps[-1] > 0.4
