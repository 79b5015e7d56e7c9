"""Issue 29, item 2: a constrained request ends with complete, valid output inside any max_tokens, the last canvas
partial included, or is refused before any work when even the shortest valid output (and its EOS) cannot fit."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from dgemma.control import Constraint, ConstraintVocabulary
from dgemma.control.dp import best_valid_tokens, canvas_rule, solve, class_scores
from dgemma.control.pins import Steering, SteeringError
from dgemma.generate import generate
from dgemma.presets import default_generation, preset_config, random_model
from dgemma.testing import write_test_tokenizer
from dgemma.text.tokenizer import Tokenizer

C = 16
EOS = 1
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                                      "color": {"enum": ["red", "blue"]}},
     "required": ["name", "ok", "color"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 6},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "bb"]}, "maxItems": 4},
                                      "n": {"type": "integer", "minimum": -5, "maximum": 500}},
     "required": ["n"], "additionalProperties": False},
    {"type": "string", "maxLength": 8},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(write_test_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def vocab(tok):
    return ConstraintVocabulary.from_tokenizer(tok.backend, [EOS], [0], vocab_size=256)


@pytest.fixture(scope="module")
def constraints(vocab):
    return [Constraint.from_json_schema(s, vocab) for s in SCHEMAS]


@pytest.fixture(scope="module")
def model():
    return random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.3, seed=0)


@pytest.fixture(scope="module")
def gen():
    return default_generation(preset_config("tiny", canvas_length=C, vocab_size=256)).replace(
        max_denoising_steps=3, eos_token_id=[EOS], pad_token_id=0)


def check_output(tok, schema, ids, reason):
    """Complete: EOS within the budget (finish_reason "stop"), and the text before it validates."""
    assert reason == "stop" and ids[-1] == EOS and EOS not in ids[:-1], (reason, ids)
    jsonschema.validate(json.loads(tok.decode(ids[:-1], skip_special_tokens=False)), schema)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(which=st.integers(0, len(SCHEMAS) - 1), max_tokens=st.integers(1, 4 * C), seed=st.integers(0, 3))
def test_generate_ends_valid_within_any_max_tokens(tok, constraints, model, gen, which, max_tokens, seed):
    c = constraints[which]
    try:
        out = generate(model, [[2, 5 + seed]], gen.replace(max_new_tokens=max_tokens),
                       generator=torch.Generator().manual_seed(seed), steering=[Steering(constraint=c)])
    except SteeringError as e:  # refused up front: only when the shortest text and its EOS cannot fit
        assert e.param == "max_tokens"
        assert c.min_tokens_to_accept(c.initial_state) + 1 > max_tokens
        return
    assert c.min_tokens_to_accept(c.initial_state) + 1 <= max_tokens
    ids, reason = out.token_ids[0], out.finish_reasons[0]
    assert len(ids) <= max_tokens
    check_output(tok, SCHEMAS[which], ids, reason)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(which=st.integers(0, len(SCHEMAS) - 1), max_tokens=st.integers(1, 4 * C), pin_prefix=st.booleans())
def test_engine_ends_valid_within_any_max_tokens(tok, constraints, model, gen, which, max_tokens, pin_prefix):
    """The same rule through the engine, where requests of different budgets share a batch."""
    from dgemma.engine import Engine, RequestError, SamplingParams

    c = constraints[which]
    engine = Engine(model, gen, max_num_seqs=2, max_model_len=256, sampler="exact")
    budgets = [max_tokens, 4 * C + 1 - max_tokens]  # a partner with another budget in the same batch
    outs = [[] for _ in budgets]
    refused = []
    for i, budget in enumerate(budgets):
        try:
            engine.add_request([2, 5 + i], SamplingParams(max_tokens=budget, seed=i, pin_prefix=pin_prefix,
                                                          steering=Steering(constraint=c)), outs[i].append)
        except RequestError as e:
            assert e.param == "max_tokens" and c.min_tokens_to_accept(c.initial_state) + 1 > budget
            refused.append(i)
    for _ in range(200):
        if all(i in refused or (o and o[-1].finished) for i, o in enumerate(outs)):
            break
        engine.step()
    for i, o in enumerate(outs):
        if i in refused:
            continue
        ids = [t for out in o for t in out.token_ids]
        assert o[-1].finished and len(ids) <= budgets[i]
        check_output(tok, SCHEMAS[which], ids, o[-1].finish_reason)


def test_the_shortest_text_needs_room_for_its_eos(vocab):
    """check_budget counts the EOS: a choice of one 3-token text needs max_tokens 4."""
    c = Constraint.from_choice(["abc"], vocab)
    shortest = c.min_tokens_to_accept(c.initial_state)
    c.check_budget(shortest + 1)
    with pytest.raises(Exception, match="and EOS"):
        c.check_budget(shortest)


def test_canvas_rule_ends_the_last_partial_canvas_in_done(tok, constraints):
    """The budget ends 5 tokens into canvas 2 of 16: that canvas must be in DONE from position 5, and the DP gives a
    canvas whose EOS falls before it, whatever the log-probs say."""
    c = constraints[3]  # a string of at most 8 characters
    end_states, done_from = canvas_rule(c, {}, 2, C, 2 * C + 5)
    assert done_from == 5 and end_states.tolist() == [s == c.done_state for s in range(c.num_states)]
    assert canvas_rule(c, {}, 1, C, 2 * C + 5)[1] is None
    for seed in range(5):
        log_probs = torch.randn(C, c.vocab_size, generator=torch.Generator().manual_seed(seed))
        log_probs[:, EOS] = -50.0  # the model never wants to stop
        start = int(c.walk(tok.encode('"', add_special_tokens=False))[0])  # inside the string
        got = solve(class_scores(log_probs.log_softmax(-1), c), start, end_states=end_states, done_from=done_from)
        tokens = got.tokens.tolist()
        assert EOS in tokens[:5] and all(s == c.done_state for s in got.states[4:].tolist()), tokens
    with pytest.raises(Exception, match="EOS within its first"):
        # from the initial state no string and its EOS fit in 1 token
        solve(class_scores(torch.zeros(C, c.vocab_size), c), c.initial_state, end_states=end_states, done_from=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from dgemma.io import checkpoint
    from dgemma.engine import Engine
    from dgemma.server import ServerThread, Serving, build_app
    from dgemma.testing import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("budget"), canvas_length=C, max_denoising_steps=2)
    ckpt = checkpoint.load(model_dir, quiet=True)
    engine = Engine(ckpt.model, ckpt.generation, Tokenizer.from_dir(model_dir), max_num_seqs=2,
                    max_model_len=512).start()
    srv = ServerThread(build_app(Serving(engine, Tokenizer.from_dir(model_dir), "tiny"))).start()
    yield srv
    srv.stop()
    engine.stop()


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(which=st.integers(0, len(SCHEMAS) - 1), max_tokens=st.integers(1, 5 * C))
def test_the_server_answers_valid_json_or_a_400(server, constraints, which, max_tokens):
    """As a user sees it, through the openai client: a complete answer that validates, finish_reason "stop", or a
    400 naming max_tokens when even the shortest valid answer and its EOS cannot fit."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)
    schema = SCHEMAS[which]
    try:
        out = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "?"}], max_tokens=max_tokens, seed=max_tokens,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    except openai.BadRequestError as e:
        c = constraints[which]
        assert e.body["param"] == "max_tokens" and c.min_tokens_to_accept(c.initial_state) + 1 > max_tokens
        return
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens <= max_tokens
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
