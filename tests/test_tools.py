"""Tool calls: the Gemma call syntax parsed (whole and streamed), forced calls valid by construction on random
models, and tools/tool_choice over HTTP with the official openai client."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
import torch

from dgemma.control import Constraint, ConstraintVocabulary
from dgemma.control.pins import Steering
from dgemma.control.schema import SchemaError
from dgemma.control.tool_grammar import arguments_regex, call_regex, tool_vocabulary
from dgemma.control.tools import MARKERS, ToolCallStreamParser, split_tool_calls
from dgemma.generate import generate
from dgemma.presets import default_generation, preset_config, random_model
from dgemma.testing import TOOL_VOCAB_SIZE, openai_client, tiny_server, write_test_tokenizer, write_tiny_checkpoint
from dgemma.text.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")  # its module fixtures run models

C = 32
MODEL = "tiny-tools"
WEATHER = {"type": "object", "required": ["city", "unit"], "properties": {
    "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}, "days": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}}}
NOTE = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 5}, "urgent": {"type": "boolean"},
                                         "score": {"type": "number"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "note", "parameters": NOTE}}]
SCHEMAS = {"get_weather": WEATHER, "note": NOTE}


# --- parsing ------------------------------------------------------------------------------------------------------

def test_calls_parse_into_json_arguments():
    text = ('Let me check.<|tool_call>call:get_weather{city:<|"|>Paris, "FR"<|"|>,days:3,opts:{deep:[1,2.5,true,null]},'
            'unit:<|"|>c<|"|>}<tool_call|><|tool_call>call:note{}<tool_call|><|tool_response>ignored')
    content, calls = split_tool_calls(text)
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": 'Paris, "FR"', "days": 3, "opts": {"deep": [1, 2.5, True, None]}, "unit": "c"}),
        ("note", {})]
    first = calls[0].openai(0)
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert json.loads(first["function"]["arguments"])["city"] == 'Paris, "FR"'


@pytest.mark.parametrize("text", ["<|tool_call>call:f{a:<|\"|>x}<tool_call|>", "<|tool_call>call:f{a:zz}<tool_call|>",
                                  "<|tool_call>call:f{a:1", "<|tool_call>nothing<tool_call|>", "plain <| text"])
def test_malformed_or_unclosed_calls_stay_content(text):
    assert split_tool_calls(text) == (text, [])


def test_stream_parser_matches_the_whole_text_at_any_split():
    text = 'ok <|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|> then <|tool_call>call:g{b:1}<tool_call|>'
    whole = split_tool_calls(text)
    for step in (1, 2, 3, 7):
        parser, content, calls = ToolCallStreamParser(), "", []
        for i in range(0, len(text), step):
            c, k = parser.feed(text[i:i + step])
            assert "<|tool" not in c  # never a piece of a marker
            content, calls = content + c, calls + k
        c, k = parser.flush()
        content, calls = content + c, calls + k
        assert content == whole[0] and [(x.name, x.arguments) for x in calls] == [(x.name, x.arguments)
                                                                                   for x in whole[1]]


# --- forced calls are valid by construction --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(write_test_tokenizer(tmp_path_factory.mktemp("tok"), tool_tokens=True))


@pytest.fixture(scope="module")
def vocab(tok):
    base = ConstraintVocabulary.from_tokenizer(tok.backend, [1], [0], vocab_size=TOOL_VOCAB_SIZE)
    return tool_vocabulary(base, {m: tok.token_id(m) for m in MARKERS})


@pytest.mark.parametrize("repeat", [False, True])
def test_every_forced_call_parses_and_validates(tok, vocab, repeat):
    functions = [TOOLS[0]["function"]] if not repeat else [t["function"] for t in TOOLS]
    c = Constraint.from_regex(call_regex(functions, repeat=repeat), vocab)
    gen = default_generation(preset_config("tiny", canvas_length=C, vocab_size=TOOL_VOCAB_SIZE)).replace(
        max_denoising_steps=4, eos_token_id=[1], pad_token_id=0, max_new_tokens=3 * C)
    checked = 0
    for seed in range(3):
        model = random_model(preset_config("tiny", canvas_length=C, vocab_size=TOOL_VOCAB_SIZE),
                             std=(0.02, 0.1, 0.3)[seed], seed=seed)
        out = generate(model, [[2, 5 + seed], [2, 40]], gen, generator=torch.Generator().manual_seed(seed),
                       steering=[Steering(constraint=c)] * 2)
        for ids, reason in zip(out.token_ids, out.finish_reasons):
            assert reason == "stop" and ids[-1] == 1
            content, calls = split_tool_calls(tok.decode(ids[:-1], skip_special_tokens=False))
            assert content == "" and calls and (repeat or len(calls) == 1)
            for call in calls:
                jsonschema.validate(call.arguments, SCHEMAS[call.name])
                checked += 1
    assert checked >= 6


def test_the_unconstrained_model_does_not_call_tools(tok):
    """The baseline: without the constraint a random model writes no parsable call."""
    gen = default_generation(preset_config("tiny", canvas_length=C, vocab_size=TOOL_VOCAB_SIZE)).replace(
        max_denoising_steps=4, eos_token_id=[1], pad_token_id=0, max_new_tokens=2 * C)
    model = random_model(preset_config("tiny", canvas_length=C, vocab_size=TOOL_VOCAB_SIZE), std=0.1, seed=0)
    out = generate(model, [[2, 5]] * 4, gen, generator=torch.Generator().manual_seed(0))
    assert all(not split_tool_calls(tok.decode(ids, skip_special_tokens=False))[1] for ids in out.token_ids)


@pytest.mark.parametrize("parameters, where", [
    ({"type": "object", "properties": {"a": {"type": "array", "contains": {"type": "integer"}}}},
     "parameters/properties/a: unsupported JSON schema feature 'contains'"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a)\\1$"}}}, "backreference"),
    ({"type": "array"}, "type object"),
    ({"type": "object", "properties": {"a": {"const": "\ue012"}}, "required": ["a"]}, "no value satisfies")])
def test_unsupported_parameter_schemas_are_named(parameters, where):
    with pytest.raises(SchemaError, match=where.replace("[", r"\[")):
        arguments_regex(parameters)


# --- over HTTP -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("tools"), canvas_length=C, max_denoising_steps=4,
                                      tool_tokens=True)
    with tiny_server(model_dir, MODEL, max_model_len=1024) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=120)


ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _streamed(client, **kw):
    """The streamed reply put together as the openai client's users do: content, and each call from its deltas."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            call["name"] += (d.function.name or "") if d.function else ""
            call["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_calls_come_back_as_tool_calls_streamed_or_not(client, choice):
    tool_choice = {"type": "function", "function": {"name": "note"}} if choice == "named" else "required"
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 3 * C}
    for seed in (1, 2):
        out = client.chat.completions.create(seed=seed, **kw)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and not message.content
        assert message.tool_calls and (choice == "required" or len(message.tool_calls) == 1)
        for call in message.tool_calls:
            assert call.type == "function" and call.id
            assert choice == "required" or call.function.name == "note"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        content, calls, finish = _streamed(client, seed=seed, **kw)
        assert finish == "tool_calls" and not content and calls
        for call in calls:
            assert call["id"] and (choice == "required" or call["name"] == "note")
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def _pinned_reply(tokenizer, text):
    ids = tokenizer.encode(text) + [1]
    return {str(i): t for i, t in enumerate(ids)}


def test_auto_parses_a_call_the_model_writes_and_none_leaves_it_text(client, server):
    """The canvas pinned to a call (the way a trained model would write it): auto parses it, none does not."""
    text = 'Sure.<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,unit:<|"|>c<|"|>}<tool_call|>'
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 2 * C, "seed": 0,
          "extra_body": {"pinned": _pinned_reply(server.tokenizer, text)}}
    out = client.chat.completions.create(**kw)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.content == "Sure."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Oslo", "unit": "c"})]
    content, calls, finish = _streamed(client, **kw)
    assert (content, [(c["name"], json.loads(c["arguments"])) for c in calls], finish) == (
        "Sure.", [("get_weather", {"city": "Oslo", "unit": "c"})], "tool_calls")
    none = client.chat.completions.create(tool_choice="none", **kw)
    assert none.choices[0].message.content == text and not none.choices[0].message.tool_calls
    assert none.choices[0].finish_reason == "stop"


def test_history_with_calls_and_tool_results_renders_through_the_template(client, server):
    """An assistant call (arguments as JSON text, as clients send them) and its tool result: the prompt is the
    template's rendering with the arguments as an object, and the reply goes on in the same model turn."""
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"unit": "c", "city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]
    out = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=C, seed=0)
    rendered = server.tokenizer.apply_chat_template(
        [history[0], dict(history[1], tool_calls=[{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}}]), history[2]], tools=TOOLS)
    assert rendered.endswith('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>c<|"|>}<tool_call|>'
                             '<|tool_response>response:get_weather{value:<|"|>sunny, 21C<|"|>}<tool_response|>')
    assert out.usage.prompt_tokens == len(server.tokenizer.encode(rendered))


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "contains": {"type": "integer"}}}}}}],
        "tool_choice": "required"},
     "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": "required", "pinned": {"0": 5}}, "pinned")])  # no call starts with token 5
def test_bad_tool_fields_are_a_400_naming_the_field(server, body, param):
    request = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": C, **body}
    r = httpx.post(server.url + "/v1/chat/completions", json={k: v for k, v in request.items() if v is not None},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_the_documented_round_trip(client):
    """SERVING.md's example: a named call, its message sent back with a tool result, then an auto turn."""
    messages = list(ASK)
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=3 * C, seed=4,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=C, seed=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_thought_then_a_call_come_back_split(client, server):
    """Thinking blocks and tool calls do not come back as plain text (unslothai/unsloth#6732)."""
    text = "<|channel>thought\nplan it<channel|><|tool_call>call:note{text:<|\"|>hi<|\"|>}<tool_call|>"
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=2 * C, seed=0,
                                         extra_body={"pinned": _pinned_reply(server.tokenizer, text)})
    message = out.choices[0].message
    assert message.model_extra["reasoning"] == "plan it" and message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("note", {"text": "hi"})]


def test_a_forced_call_takes_pins_and_a_prediction(client, server):
    """Canvas steering under a forced call: pinned argument text is kept and a predicted call (an earlier call to
    edit) seeds the canvas; either way the reply is a call that parses and validates."""
    tok = server.tokenizer
    opening = "<|tool_call>call:note{text:<|\"|>"
    at = len(tok.encode(opening))
    pinned = {str(at + i): t for i, t in enumerate(tok.encode("hello"))}
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 3 * C,
          "tool_choice": {"type": "function", "function": {"name": "note"}}}
    for seed in (1, 2):
        out = client.chat.completions.create(seed=seed, extra_body={"pinned": pinned}, **kw)
        call, = out.choices[0].message.tool_calls
        assert call.function.name == "note" and json.loads(call.function.arguments)["text"].startswith("hello")
    predicted = opening + "hi there<|\"|>}<tool_call|>"
    out = client.chat.completions.create(seed=3, prediction={"type": "content", "content": predicted}, **kw)
    call, = out.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["note"])


def test_a_forced_call_that_cannot_fit_in_max_tokens_is_a_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 4,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert r.status_code == 400 and "max_tokens=4" in r.json()["error"]["message"], r.text
