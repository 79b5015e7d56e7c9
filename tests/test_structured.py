"""Structured output in the one denoising step: every output satisfies its constraint, on random models, for
every constraint kind, in generate (batched, across canvases) and through the engine."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import pytest
import torch

from dgemma.control import Constraint, ConstraintVocabulary
from dgemma.control.pins import Steering, SteeringError
from dgemma.generate import generate
from dgemma.presets import default_generation, preset_config, random_model
from dgemma.testing import write_test_tokenizer
from dgemma.text.tokenizer import Tokenizer

C = 16
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"}, "color": {"enum": ["red", "blue"]}},
          "required": ["name", "ok", "color"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(write_test_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def vocab(tok):
    return ConstraintVocabulary.from_tokenizer(tok.backend, [1], [0], vocab_size=256)


@pytest.fixture(scope="module")
def gen():
    return default_generation(preset_config("tiny", canvas_length=C, vocab_size=256)).replace(
        max_denoising_steps=4, eos_token_id=[1], pad_token_id=0)


def constraint(kind, vocab):
    if kind == "regex":
        return Constraint.from_regex(r"[a-c]{3}-[0-9]{2,4}", vocab), lambda t: re.fullmatch(r"[a-c]{3}-[0-9]{2,4}", t)
    if kind == "choice":
        options = ["red", "green", "blue sky"]
        return Constraint.from_choice(options, vocab), lambda t: t in options
    if kind == "schema":
        return (Constraint.from_json_schema(SCHEMA, vocab),
                lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None)
    return Constraint.json_object(vocab), lambda t: isinstance(json.loads(t), dict)


@pytest.mark.parametrize("kind", ["regex", "choice", "schema", "object"])
def test_every_output_satisfies_its_constraint(kind, tok, vocab, gen):
    """Random models of three sizes of weights, batches of 4, several seeds; outputs long enough to need two or
    three canvases for the JSON kinds."""
    c, ok = constraint(kind, vocab)
    max_new = 3 * C if kind in ("schema", "object") else 2 * C
    valid = 0
    for seed in range(4):
        model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=(0.02, 0.1, 0.3)[seed % 3],
                             seed=seed)
        out = generate(model, [[2, 5 + seed], [2, 40], [2, 41, 42], [2]], gen.replace(max_new_tokens=max_new),
                       generator=torch.Generator().manual_seed(seed), steering=[Steering(constraint=c)] * 4)
        for ids, reason in zip(out.token_ids, out.finish_reasons):
            # either EOS came in an accepting state, or the budget ran out exactly in one
            assert (reason == "stop" and ids[-1] == 1) or (reason == "length" and len(ids) == max_new), ids
            text = tok.decode([t for t in ids if t != 1], skip_special_tokens=False)
            assert ok(text), text
            valid += 1
    assert valid == 16


def test_unconstrained_random_model_is_rarely_valid(tok, vocab, gen):
    """The baseline the constraint is measured against: the same models without it."""
    _, ok = constraint("object", vocab)
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=0)
    out = generate(model, [[2, 5]] * 8, gen.replace(max_new_tokens=3 * C), generator=torch.Generator().manual_seed(0))

    def valid(ids):
        try:
            return ok(tok.decode([t for t in ids if t != 1], skip_special_tokens=False))
        except ValueError:
            return False
    assert sum(map(valid, out.token_ids)) == 0


def test_constraint_with_no_room_is_refused(vocab, gen):
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=0)
    c = Constraint.from_choice(["a" * 30], vocab)
    with pytest.raises(SteeringError) as e:
        generate(model, [[2]], gen.replace(max_new_tokens=C), steering=[Steering(constraint=c)])
    assert e.value.param == "max_tokens"


def test_batched_and_row_strategies_agree_under_a_constraint(vocab, gen):
    from dgemma.step import Strategy

    c, _ = constraint("schema", vocab)
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=1)
    kw = dict(steering=[Steering(constraint=c), None])
    a = generate(model, [[2, 5], [2, 6]], gen.replace(max_new_tokens=3 * C), generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, [[2, 5], [2, 6]], gen.replace(max_new_tokens=3 * C), generator=torch.Generator().manual_seed(1),
                 strategy=Strategy.BATCHED, **kw)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("pin_prefix", [False, True])
def test_engine_outputs_satisfy_the_constraint_streamed_prefix_included(vocab, tok, gen, pin_prefix):
    """Through the engine, with and without the settled prefix pinned: every streamed prefix is a prefix of the
    final valid text, and with the exact sampler and no pinning the tokens are generate's."""
    from dgemma.engine import Engine, SamplingParams

    c, ok = constraint("schema", vocab)
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=2)
    engine = Engine(model, gen, max_num_seqs=3, max_model_len=256, sampler="exact")
    outs = [[] for _ in range(3)]
    for i in range(3):
        engine.add_request([2, 5 + i], SamplingParams(max_tokens=3 * C, seed=i, pin_prefix=pin_prefix,
                                                      temperature=0.05, steering=Steering(constraint=c)),
                           outs[i].append)
    for _ in range(300):
        engine.step()
        if all(o and o[-1].finished for o in outs):
            break
    for i, o in enumerate(outs):
        ids = [t for out in o for t in out.token_ids]
        assert ok(tok.decode([t for t in ids if t != 1], skip_special_tokens=False))
        if not pin_prefix:
            want = generate(model, [[2, 5 + i]], gen.replace(max_new_tokens=3 * C, t_min=gen.t_min * 0.05,
                                                             t_max=gen.t_max * 0.05),
                            generator=torch.Generator().manual_seed(i), steering=[Steering(constraint=c)])
            assert ids == want.token_ids[0]


# ---- a constraint with pins, a template, a seed or a suffix


def test_pins_under_a_constraint_are_kept_and_reached_across_canvases(tok, vocab, gen):
    """A pin two canvases ahead decides the first canvas: "(a{40}|b{40})" with a "b" pinned at position 35 must
    start with b's, though the first canvas cannot see the pin. Every output holds its pins and is valid."""
    c = Constraint.from_regex("(a{40}|b{40})", vocab)
    a, b = tok.encode("a", add_special_tokens=False)[0], tok.encode("b", add_special_tokens=False)[0]
    pins = {35: b, 3: b}
    for seed in range(4):
        model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=seed)
        out = generate(model, [[2, 5 + seed], [2, 40]], gen.replace(max_new_tokens=3 * C),
                       generator=torch.Generator().manual_seed(seed),
                       steering=[Steering(pinned=pins, constraint=c), Steering(pinned={35: b}, constraint=c)])
        for ids in out.token_ids:
            assert ids[:40] == [b] * 40 and ids[40] == 1, ids


def test_a_constraint_keeps_pins_the_model_would_not_choose(tok, vocab, gen):
    """Pins inside JSON under a schema: the literal pins stay where they are and the text validates."""
    c = Constraint.from_json_schema(SCHEMA, vocab)
    head = tok.encode('{"name": "', add_special_tokens=False)
    pins = dict(enumerate(head))
    for seed in range(3):
        model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.3, seed=seed)
        out = generate(model, [[2, 7]], gen.replace(max_new_tokens=3 * C), generator=torch.Generator().manual_seed(seed),
                       steering=[Steering(pinned=pins, constraint=c)])
        ids = out.token_ids[0]
        assert ids[:len(head)] == head
        jsonschema.validate(json.loads(tok.decode([t for t in ids if t != 1], skip_special_tokens=False)), SCHEMA)


def test_pins_the_constraint_cannot_meet_are_refused_before_any_work(tok, vocab, gen):
    c = Constraint.from_regex("[a-c]{3}-[0-9]{2,4}", vocab)
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=0)
    x = tok.encode("x", add_special_tokens=False)[0]
    digit = tok.encode("7", add_special_tokens=False)[0]
    for pins in ({1: x}, {0: digit}, {12: digit}):  # a token it never allows; a digit too early; past the longest text
        with pytest.raises(SteeringError) as e:
            generate(model, [[2]], gen.replace(max_new_tokens=2 * C), steering=[Steering(pinned=pins, constraint=c)])
        assert e.value.param == "pinned" and "pinned tokens" in str(e.value)


def test_a_template_under_a_constraint(tok, vocab, gen):
    """A template's literals are pins: under a regex its holes are filled with text the regex allows."""
    from dgemma.control.template import parse_template

    c = Constraint.from_regex(r"id=[0-9]{4}; tag=[a-z]{3}", vocab)
    template, _ = parse_template("id={{4}}; tag={{3}}", lambda t: tok.encode(t, add_special_tokens=False), 1)
    template = dataclasses.replace(template, constraint=c)  # a Steering is frozen once built
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=3)
    out = generate(model, [[2, 9], [2, 10]], gen.replace(max_new_tokens=2 * C), generator=torch.Generator().manual_seed(3),
                   steering=[template, template])
    for ids in out.token_ids:
        assert re.fullmatch(r"id=[0-9]{4}; tag=[a-z]{3}", tok.decode(ids[:-1], skip_special_tokens=False))
    bad, _ = parse_template("id={{3}}; tag={{3}}", lambda t: tok.encode(t, add_special_tokens=False), 1)
    bad = dataclasses.replace(bad, constraint=c)  # 3 digits where the regex wants 4
    with pytest.raises(SteeringError):
        generate(model, [[2]], gen.replace(max_new_tokens=2 * C), steering=[bad])


def test_a_seeded_canvas_under_a_constraint(tok, vocab, gen):
    c = Constraint.from_regex("[a-c]{3}-[0-9]{2,4}", vocab)
    seed = tok.encode("zzz_99", add_special_tokens=False)  # an invalid prediction: the constraint corrects it
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=4)
    out = generate(model, [[2, 11]] * 3, gen.replace(max_new_tokens=C), generator=torch.Generator().manual_seed(4),
                   steering=[Steering(seed_tokens=seed, strength=s, constraint=c) for s in (0.0, 0.2, 1.0)])
    for ids in out.token_ids:
        assert re.fullmatch("[a-c]{3}-[0-9]{2,4}", tok.decode([t for t in ids if t != 1], skip_special_tokens=False))


def test_a_suffix_under_a_constraint(tok, vocab, gen):
    """Fill in the middle under a regex: the middle's length is one after which the suffix completes an allowed
    text, and middle + suffix match; a suffix no allowed text ends with is refused before the prefill."""
    c = Constraint.from_regex("[a-c]{3,5}-[0-9]{2}", vocab)
    suffix = tok.encode("-42", add_special_tokens=False)
    for seed in range(3):
        model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=seed)
        out = generate(model, [[2, 12]], gen.replace(max_new_tokens=C), generator=torch.Generator().manual_seed(seed),
                       steering=[Steering(suffix=suffix, constraint=c)])
        middle = out.middle_lengths[0]
        assert 3 <= middle <= 5
        text = tok.decode(out.token_ids[0][:middle + len(suffix)], skip_special_tokens=False)
        assert re.fullmatch("[a-c]{3,5}-42", text), text
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=0)
    with pytest.raises(SteeringError) as e:
        generate(model, [[2]], gen.replace(max_new_tokens=C),
                 steering=[Steering(suffix=tok.encode("-4x", add_special_tokens=False), constraint=c)])
    assert e.value.param == "suffix"


def test_engine_keeps_pins_under_a_constraint(tok, vocab, gen):
    from dgemma.engine import Engine, SamplingParams

    c = Constraint.from_regex("(a{40}|b{40})", vocab)
    b = tok.encode("b", add_special_tokens=False)[0]
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=5)
    engine = Engine(model, gen, max_num_seqs=2, max_model_len=256, sampler="exact")
    outs = [[] for _ in range(2)]
    for i in range(2):
        engine.add_request([2, 5 + i], SamplingParams(max_tokens=3 * C, seed=i, pin_prefix=bool(i),
                                                      steering=Steering(pinned={35: b}, constraint=c)),
                           outs[i].append)
    for _ in range(300):
        engine.step()
        if all(o and o[-1].finished for o in outs):
            break
    for o in outs:
        assert [t for out in o for t in out.token_ids][:41] == [b] * 40 + [1]
