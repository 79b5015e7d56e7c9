"""Issue 29, item 3: thinking and structured output together. With thinking on, the reply may open with a free
thought (`<|channel>thought\\n...<channel|>`); the constraint (a response_format, a forced tool call) applies to the
answer after it. Tested on the automaton, then through the server with the official openai client."""

from __future__ import annotations

import json

import jsonschema
import pytest

from dgemma.control import Constraint, ConstraintVocabulary
from dgemma.control.constraint import INVALID
from dgemma.control.thought import after_thought
from dgemma.testing import openai_client, tiny_server, write_test_tokenizer, write_tiny_checkpoint
from dgemma.text.thinking import CHANNEL_CLOSE, CHANNEL_OPEN
from dgemma.text.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")  # its module fixtures run models

C = 32
MODEL = "tiny-think"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
          "required": ["city", "ok"], "additionalProperties": False}
NOTE = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 5}}, "required": ["text"]}
TOOLS = [{"type": "function", "function": {"name": "note", "parameters": NOTE}}]
ASK = [{"role": "user", "content": "Where?"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(write_test_tokenizer(tmp_path_factory.mktemp("tok")))


def test_the_thought_is_free_and_the_answer_constrained(tok):
    vocab = ConstraintVocabulary.from_tokenizer(tok.backend, [1], [0], vocab_size=256)
    answer = Constraint.from_regex("(yes|no)", vocab)
    open_id, close_id = tok.token_id(CHANNEL_OPEN), tok.token_id(CHANNEL_CLOSE)
    c = after_thought(answer, open_id, close_id)
    assert after_thought(answer, open_id, close_id) is c  # built once per answer automaton
    text = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    eos = 1
    thought = [open_id] + text("thought\nanything: {not json} <b>") + [close_id]
    for reply in (thought + text("yes") + [eos], text("no") + [eos], [open_id, close_id] + text("no") + [eos]):
        states = c.walk(reply)
        assert int(states[-1]) == c.done_state, tok.decode(reply, skip_special_tokens=False)
    for bad in (thought + text("maybe"),  # the answer is still constrained
                [open_id] + text("hm") + [eos],  # no EOS inside a thought: an answer must follow
                text("yes") + [close_id],  # no marker inside the answer
                thought + [open_id]):  # nor a second thought
        assert INVALID in c.walk(bad).tolist(), tok.decode(bad, skip_special_tokens=False)
    assert c.min_tokens_to_accept(c.initial_state) == answer.min_tokens_to_accept(answer.initial_state)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("think"), canvas_length=C, max_denoising_steps=4,
                                      tool_tokens=True)
    with tiny_server(model_dir, MODEL, max_model_len=1024) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=120)


def _thought_pins(tokenizer, text: str) -> dict:
    """Pins that open the reply with a thought: the model writes the rest of it, closes it and answers."""
    ids = tokenizer.encode(CHANNEL_OPEN + "thought\n" + text, add_special_tokens=False)
    return {str(i): t for i, t in enumerate(ids)}


def _schema_format():
    return {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_thought_then_a_valid_answer(client, server, stream):
    """A thought pinned open at the start (the model thinks), then the schema applies to the answer only."""
    kw = dict(model=MODEL, messages=ASK, max_tokens=3 * C, response_format=_schema_format(),
              extra_body={"chat_template_kwargs": {"enable_thinking": True},
                          "pinned": _thought_pins(server.tokenizer, "Paris, I think")})
    for seed in (1, 2):
        if stream:
            reasoning, content, finish = "", "", None
            for chunk in client.chat.completions.create(seed=seed, stream=True, **kw):
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    reasoning += (delta.model_extra or {}).get("reasoning") or ""
                    content += delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
        else:
            out = client.chat.completions.create(seed=seed, **kw)
            message, finish = out.choices[0].message, out.choices[0].finish_reason
            reasoning, content = message.model_extra["reasoning"], message.content
        assert finish == "stop" and reasoning.startswith("Paris, I think"), (reasoning, content)
        jsonschema.validate(json.loads(content), SCHEMA)


def test_thinking_on_without_a_thought_still_answers_valid(client):
    """The thought is optional: whatever the model does, the content validates."""
    for seed in (3, 4):
        out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2 * C, seed=seed,
                                             response_format=_schema_format(),
                                             extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


def test_without_thinking_a_thought_is_refused(server):
    """Thinking off, the constraint covers the whole reply: a pinned thought cannot be met, and is a 400."""
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": ASK, "max_tokens": 2 * C, "response_format": _schema_format(),
        "pinned": _thought_pins(server.tokenizer, "hm")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "pinned", r.text


def test_a_thought_then_a_forced_tool_call(client, server):
    """vLLM's recipe: tools are called best in thinking mode. The thought is free, the call follows and validates."""
    for seed in (1, 2):
        out = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, max_tokens=3 * C, seed=seed,
            tool_choice={"type": "function", "function": {"name": "note"}},
            extra_body={"chat_template_kwargs": {"enable_thinking": True},
                        "pinned": _thought_pins(server.tokenizer, "a note")})
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.model_extra["reasoning"].startswith("a note")
        call, = message.tool_calls
        assert call.function.name == "note"
        jsonschema.validate(json.loads(call.function.arguments), NOTE)
