"""Pinned positions and seeded canvases (control/pins.py) through generate, the engine and the server."""

from __future__ import annotations

import random

import pytest
import torch

from dgemma.control.pins import Steering, SteeringError, start_canvas
from dgemma.generate import generate
from dgemma.presets import default_generation, preset_config, random_model

C = 16


@pytest.fixture(scope="module")
def model():
    return random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=0)


@pytest.fixture(scope="module")
def gen(model):
    # EOS id 255: with EOS ids out of the way, every output runs to max_new_tokens and every pin is in it
    return default_generation(preset_config("tiny", canvas_length=C, vocab_size=256)).replace(
        max_denoising_steps=6, eos_token_id=[255])


@pytest.mark.parametrize("trial", range(12))
def test_pinned_tokens_appear_unchanged_in_every_output(trial, gen):
    """Property: random models, seeds, batch sizes and pin patterns (across canvases, any density)."""
    rng = random.Random(trial)
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=rng.choice([0.02, 0.1, 0.3]),
                         seed=trial)
    max_new = rng.choice([C, 2 * C, 3 * C - 5])
    batch = rng.randint(1, 3)
    steerings = []
    for _ in range(batch):
        n = rng.randint(0, max_new)
        steerings.append(Steering(pinned={p: rng.randrange(3, 254) for p in rng.sample(range(max_new), n)}))
    prompts = [[rng.randrange(3, 254) for _ in range(rng.randint(1, 9))] for _ in range(batch)]
    out = generate(model, prompts, gen.replace(max_new_tokens=max_new, entropy_bound=rng.choice([0.1, 2.0])),
                   generator=torch.Generator().manual_seed(trial), steering=steerings)
    for ids, s in zip(out.token_ids, steerings):
        assert len(ids) == max_new
        assert all(ids[p] == t for p, t in s.pinned.items())


def test_pins_change_the_free_tokens_too(model, gen):
    """The decoder reads pinned tokens: pinning half a canvas changes what the other half becomes."""
    g = gen.replace(max_new_tokens=C)
    free = generate(model, [[5, 6, 7]], g, generator=torch.Generator().manual_seed(0)).token_ids[0]
    pins = {p: 9 for p in range(0, C, 2)}
    pinned = generate(model, [[5, 6, 7]], g, generator=torch.Generator().manual_seed(0),
                      steering=[Steering(pinned=pins)]).token_ids[0]
    assert all(pinned[p] == 9 for p in pins)
    assert [pinned[p] for p in range(1, C, 2)] != [free[p] for p in range(1, C, 2)]


def test_seeded_canvas_keeps_each_seed_token_with_probability_one_minus_strength():
    noise = torch.arange(100, 100 + 4 * 64).view(4, 64)
    seed = list(range(3, 3 + 64))
    for strength, lo, hi in ((0.0, 64, 64), (1.0, 0, 0), (0.5, 16, 48)):
        canvas, pinned, _ = start_canvas(noise.clone(), [Steering(seed_tokens=seed, strength=strength)] * 4, 0,
                                         [torch.Generator().manual_seed(1)] * 4)
        assert pinned is None
        for row in canvas.tolist():
            kept = sum(a == b for a, b in zip(row, seed))
            assert lo <= kept <= hi
            assert all(t == s or t >= 100 for t, s in zip(row, seed))
    # a seed shorter than the canvas leaves the rest to noise; the second canvas takes the seed's continuation
    canvas, _, _ = start_canvas(noise[:1].clone(), [Steering(seed_tokens=list(range(3, 3 + 70)), strength=0.0)], 1,
                                [None])
    assert canvas[0, :6].tolist() == list(range(3 + 64, 3 + 70)) and canvas[0, 6:].tolist() == noise[0, 6:].tolist()


@pytest.mark.parametrize("steering, param", [
    (Steering(pinned={40: 5}), "pinned"), (Steering(pinned={-1: 5}), "pinned"), (Steering(pinned={0: 256}), "pinned"),
    (Steering(pinned={0: -3}), "pinned"), (Steering(seed_tokens=[1, 999]), "seed_tokens"),
    (Steering(seed_tokens=[]), "seed_tokens"), (Steering(seed_tokens=[3] * 33), "seed_tokens"),
    (Steering(seed_tokens=[3], strength=1.5), "strength"), (Steering(seed_tokens=[3], strength=-0.1), "strength"),
    (Steering(seed_tokens=[3], strength=float("nan")), "strength")])
def test_bad_steering_is_refused_naming_the_field_and_runs_nothing(model, gen, steering, param):
    with pytest.raises(SteeringError) as e:
        generate(model, [[5]], gen.replace(max_new_tokens=2 * C), steering=[steering])
    assert e.value.param == param


def test_batched_strategy_gives_the_row_strategys_tokens_with_pins_and_seeds(model, gen):
    """The GPU's whole-batch step and the CPU's row step apply pins, EOS bans and seeds alike."""
    from dgemma.step import Strategy

    g = gen.replace(max_new_tokens=2 * C, eos_token_id=[1, 2], entropy_bound=1.0)
    steer = [Steering(pinned={3: 7, 20: 1, 30: 9}), None,
             Steering(pinned={0: 4}, seed_tokens=list(range(10, 10 + 2 * C)), strength=0.3)]
    prompts = [[5, 6], [7, 8, 9], [10]]
    rows = generate(model, prompts, g, generator=torch.Generator().manual_seed(2), steering=steer)
    batched = generate(model, prompts, g, generator=torch.Generator().manual_seed(2), steering=steer,
                       strategy=Strategy.BATCHED)
    assert rows.token_ids == batched.token_ids
    assert rows.token_ids[0][20] == 1 and 1 not in rows.token_ids[0][:20] and 2 not in rows.token_ids[0][:20]


@pytest.mark.parametrize("pin_prefix", [False, True])
def test_engine_applies_pins_and_seeds_as_generate_does(model, gen, pin_prefix):
    """One request through the engine, exact sampler: generate's tokens with the same steering (with the settled
    prefix pinned too, the pins still hold)."""
    from dgemma.engine import Engine, SamplingParams

    steer = Steering(pinned={2: 7, 17: 9, 33: 11}, seed_tokens=list(range(20, 20 + C)), strength=0.5)
    g = gen.replace(max_new_tokens=3 * C)
    want = generate(model, [[5, 6, 7]], g, generator=torch.Generator().manual_seed(4), steering=[steer])
    engine = Engine(model, gen, max_num_seqs=2, max_model_len=256, sampler="exact")
    outs = []
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=3 * C, seed=4, pin_prefix=pin_prefix, steering=steer),
                       outs.append)
    for _ in range(200):
        engine.step()
        if outs and outs[-1].finished:
            break
    got = [t for o in outs for t in o.token_ids]
    assert all(got[p] == t for p, t in steer.pinned.items())
    if not pin_prefix:
        assert got == want.token_ids[0]


def test_engine_refuses_bad_steering_naming_the_field(model, gen):
    from dgemma.engine import Engine, RequestError, SamplingParams

    engine = Engine(model, gen, max_num_seqs=1, max_model_len=256)
    with pytest.raises(RequestError) as e:
        engine.add_request([5], SamplingParams(max_tokens=C, steering=Steering(pinned={C: 3})), lambda o: None)
    assert e.value.param == "pinned" and engine.num_waiting == 0


# -- fill in the middle ---------------------------------------------------------------------------------------


def test_generate_fills_the_middle_between_prompt_and_suffix(model, gen):
    from dgemma.control.pins import SteeringError

    suffix = [40, 41, 42]
    out = generate(model, [[5, 6, 7], [8]], gen.replace(max_new_tokens=C, eos_token_id=[1]),
                   generator=torch.Generator().manual_seed(0),
                   steering=[Steering(suffix=suffix), Steering(suffix=[50] * 4, pinned={0: 9})])
    for ids, L, sfx in zip(out.token_ids, out.middle_lengths, (suffix, [50] * 4)):
        assert 1 <= L <= C - len(sfx) - 1
        assert ids[L:] == sfx + [1] and 1 not in ids[:L]  # middle, suffix, EOS; no EOS inside the middle
    assert out.token_ids[1][0] == 9 and out.finish_reasons == ["stop", "stop"]
    with pytest.raises(SteeringError) as e:  # a suffix that leaves no room within the canvases infill may span
        generate(model, [[5]], gen.replace(max_new_tokens=5 * C), steering=[Steering(suffix=[40] * (4 * C - 1))])
    assert e.value.param == "suffix"


@torch.inference_mode()
def test_middle_length_prefers_where_the_model_expects_the_suffix(model):
    """Scoring reads the model: a suffix token that the model predicts strongly at position p is placed there."""
    from dgemma.control.infill import middle_length

    cache = model.new_cache(1, 64)
    model.encode(torch.tensor([[5, 6, 7]]), cache)
    C_, V = model.canvas_length, model.config.vocab_size
    noise = torch.randint(0, V, (1, C_), generator=torch.Generator().manual_seed(0))
    plan = model.plan(cache, [0], C_, encoder=False)
    logp = torch.log_softmax(model.logits(model.decode(noise, None, plan))[0], dim=-1)  # (C, V)
    for token in (int(logp[7].argmax()), 100, 200):
        want = 1 + int(logp[1:C_ - 1, token].argmax())
        assert middle_length(model, cache, 0, [token], C_ - 2) == want
    assert cache.lengths == [3]  # scoring leaves the cache as it was


def _noise_pass_logp(model, prompt, span):
    """log p over a uniform-noise span after `prompt`, as middle_length's scoring pass draws it."""
    cache = model.new_cache(1, len(prompt) + span)
    model.encode(torch.tensor([prompt]), cache)
    noise = torch.randint(0, model.config.vocab_size, (1, span), generator=torch.Generator().manual_seed(0))
    return torch.log_softmax(model.logits(model.decode(noise, None, model.plan(cache, [0], span, False)))[0], -1)


@torch.inference_mode()
def test_a_middle_longer_than_one_canvas_is_filled_across_canvases(model, gen):
    """The suffix goes where the scoring pass over 3 canvases expects it, past the first canvas; the middle spans
    canvases, and the suffix and EOS are pinned in a later one."""
    from dgemma.control.infill import middle_length

    prompt, max_new = [5, 6, 7], 3 * C
    logp = _noise_pass_logp(model, prompt, max_new - 1)
    best = logp[1:max_new - 1].argmax(dim=0) + 1  # (V,) where each token is most expected
    token = next(t for t in range(3, 250) if C + 2 <= int(best[t]) <= max_new - 2)
    want = int(best[token])
    cache = model.new_cache(1, 64)
    model.encode(torch.tensor([prompt]), cache)
    assert middle_length(model, cache, 0, [token], max_new - 2) == want
    out = generate(model, [prompt], gen.replace(max_new_tokens=max_new, eos_token_id=[1]),
                   generator=torch.Generator().manual_seed(0), steering=[Steering(suffix=[token])])
    ids, L = out.token_ids[0], out.middle_lengths[0]
    assert L == want > C and ids[L:] == [token, 1] and 1 not in ids[:L] and out.finish_reasons == ["stop"]
    assert len(out.steps_per_canvas[0]) == (L + 1) // C + 1  # the canvases up to the one holding the EOS
    from dgemma.engine import Engine, SamplingParams  # the engine chooses the same length and returns the middle

    engine = Engine(model, gen.replace(eos_token_id=[1]), max_num_seqs=1, max_model_len=256, sampler="exact")
    outs = []
    engine.add_request(prompt, SamplingParams(max_tokens=max_new, seed=0, steering=Steering(suffix=[token])),
                       outs.append)
    while not (outs and outs[-1].finished):
        engine.step()
    assert [t for o in outs for t in o.token_ids] == ids[:L] and outs[-1].finish_reason == "stop"


def test_suffix_counts_in_the_budget_the_same_in_generate_and_engine(model, gen):
    """middle + suffix + EOS fit max_tokens in both: a 14-token suffix with max_tokens 16 leaves one token."""
    from dgemma.engine import Engine, RequestError, SamplingParams

    suffix = list(range(40, 54))
    out = generate(model, [[5]], gen.replace(max_new_tokens=C, eos_token_id=[1]), steering=[Steering(suffix=suffix)])
    assert out.middle_lengths == [1] and out.token_ids[0][1:] == suffix + [1]
    with pytest.raises(SteeringError) as e:
        generate(model, [[5]], gen.replace(max_new_tokens=15), steering=[Steering(suffix=suffix)])
    assert e.value.param == "suffix"
    engine = Engine(model, gen, max_num_seqs=1, max_model_len=256)
    with pytest.raises(RequestError) as e:
        engine.add_request([5], SamplingParams(max_tokens=15, steering=Steering(suffix=suffix)), lambda o: None)
    assert e.value.param == "suffix"
