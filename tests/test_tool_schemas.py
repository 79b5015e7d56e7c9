"""Forced tool calls take what response_format takes: a function's parameters are written by the one schema writer,
in the Gemma argument syntax (tool_grammar.GemmaSyntax). Calls sampled from the automaton's regex, and calls a
random model writes under the constraint, parse and validate (jsonschema with format checking; pydantic for the
model it wrote), and through the server the official openai client parses a forced call of a pydantic model into
that model; keys come in the template's sorted order; the regex is written inside the compile child."""

from __future__ import annotations

import datetime
import enum
import random
import re
import time
import uuid
from typing import Literal, Optional, Union

import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

import dgemma.control.tool_grammar as tool_grammar
from dgemma.control import CompileLimits, Constraint, ConstraintError
from dgemma.control.pins import Steering
from dgemma.control.tool_grammar import arguments_regex, call_regex
from dgemma.control.tools import SENTINEL, split_tool_calls
from dgemma.generate import generate
from dgemma.presets import default_generation, preset_config, random_model
from dgemma.testing import TOOL_VOCAB_SIZE, openai_client, tiny_server, write_tiny_checkpoint

from .test_schema_patterns import sample
from .test_tools import tok, vocab  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread_module")


class Room(str, enum.Enum):
    single = "single"
    double = "double"


class Guest(BaseModel):
    name: str = Field(min_length=1, max_length=12)
    email: str = Field(pattern=r"^[a-z]+@[a-z]+\.(com|org)$")
    age: Optional[int] = Field(None, ge=0, le=130)


class Phone(BaseModel):
    kind: Literal["phone"]
    number: str = Field(pattern=r"^\+[0-9]{6,12}$")


class Mail(BaseModel):
    kind: Literal["mail"]
    address: str = Field(max_length=20)


class Booking(BaseModel):
    guests: list[Guest] = Field(min_length=1, max_length=2)
    day: datetime.date
    arrive: datetime.datetime
    ref: uuid.UUID
    room: Room
    nights: int = Field(ge=1, le=14)
    extras: set[Literal["breakfast", "parking"]] = set()
    span: tuple[int, int]
    contact: Union[Phone, Mail] = Field(discriminator="kind")
    notes: dict[str, int] = {}


# the kinds of keywords a forced call refused before it shared the writer, as GlaiveAI's function schemas use them
MEETING = {"type": "object", "required": ["start", "attendees"], "dependencies": {"room": ["floor"]}, "properties": {
    "start": {"type": "string", "format": "time"}, "attendees": {"type": "array", "items": {
        "type": "string", "format": "email"}, "minItems": 1, "maxItems": 3, "uniqueItems": True},
    "priority": {"type": "integer", "minimum": 1, "exclusiveMaximum": 6}, "room": {"type": "string", "maxLength": 6},
    "floor": {"type": "integer", "minimum": 0}, "repeat": {"oneOf": [
        {"type": "string", "enum": ["daily", "weekly"]}, {"type": "integer", "minimum": 1, "maximum": 30}]}}}
FUNCTIONS = [{"name": "book", "parameters": Booking.model_json_schema()}, {"name": "meet", "parameters": MEETING}]
MARK = {sentinel: marker for marker, sentinel in SENTINEL.items()}


def _calls(text: str) -> list:
    """The calls of a reply written with the markers' sentinels."""
    content, calls = split_tool_calls("".join(MARK.get(c, c) for c in text))
    assert content == "" and calls, text
    return calls


def _check(call) -> None:
    schema = {f["name"]: f["parameters"] for f in FUNCTIONS}[call.name]
    draft = jsonschema.validators.validator_for(schema)
    draft(schema, format_checker=draft.FORMAT_CHECKER).validate(call.arguments)
    if call.name == "book":
        Booking.model_validate(call.arguments)


def test_sampled_calls_of_real_parameter_schemas_parse_and_validate():
    regex = call_regex(FUNCTIONS, repeat=True)
    rng, seen = random.Random(0), set()
    for _ in range(300):
        for call in _calls(sample(regex, rng, decode=False)):
            _check(call)
            seen.add((call.name, call.arguments.get("contact", {}).get("kind"), "repeat" in call.arguments))
    assert seen >= {("book", "phone", False), ("book", "mail", False), ("meet", None, True), ("meet", None, False)}


def test_a_random_model_writes_valid_calls_under_the_constraint(tok, vocab):  # noqa: F811
    constraint = Constraint.from_tool_call(FUNCTIONS, False, vocab)
    config = preset_config("tiny", canvas_length=32, vocab_size=TOOL_VOCAB_SIZE)
    gen = default_generation(config).replace(max_denoising_steps=3, eos_token_id=[1], pad_token_id=0,
                                             max_new_tokens=12 * 32)
    model = random_model(config, std=0.1, seed=0)
    out = generate(model, [[2, 5], [2, 40]], gen, generator=torch.Generator().manual_seed(0),
                   steering=[Steering(constraint=constraint)] * 2)
    for ids, reason in zip(out.token_ids, out.finish_reasons):
        assert reason == "stop"
        call, = split_tool_calls(tok.decode(ids[:-1], skip_special_tokens=False))[1]
        _check(call)


def test_keys_come_in_the_templates_sorted_order():
    regex = arguments_regex({"type": "object", "required": ["b"], "properties": {
        "c": {"type": "integer"}, "b": {"type": "integer"}, "a": {"type": "integer"}, "x y": {"const": 1}}})
    for text in ("{b:1}", "{a:1,b:2}", "{b:1,c:2}", "{a:1,b:2,c:3}", "{b:1,\ue012x y\ue012:1}"):
        assert re.fullmatch(regex, text), text
    for text in ("{b:1,a:2}", "{c:1,b:2}", "{a:1}", "{}", "{b:1,x y:1}"):
        assert not re.fullmatch(regex, text), text


def test_the_call_is_written_in_the_compile_child(vocab, monkeypatch):  # noqa: F811
    def fail(*args, **kwargs):
        raise AssertionError("the server process wrote the call's regex")
    monkeypatch.setattr(tool_grammar, "call_regex", fail)
    monkeypatch.setattr(tool_grammar, "schema_to_regex", fail)
    assert Constraint.from_tool_call(FUNCTIONS[1:], True, vocab).num_states > 1


def test_a_huge_parameters_schema_stays_within_the_compile_limits(vocab):  # noqa: F811
    parameters = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    start = time.monotonic()
    try:
        Constraint.from_tool_call([{"name": "f", "parameters": parameters}], False, vocab,
                                  limits=CompileLimits(timeout_s=3))
    except ConstraintError as err:
        assert "limit" in str(err)
    assert time.monotonic() - start < 3 + 2  # the limit, plus the child's start and the reply


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("tool-schemas"), canvas_length=32,
                                      max_denoising_steps=4, tool_tokens=True)
    with tiny_server(model_dir, "tiny-tool-schemas", max_model_len=2048) as srv:
        yield srv


def test_the_openai_client_parses_a_forced_call_into_the_pydantic_model(server):
    """What an app writes: `pydantic_function_tool` (a strict schema: every key required, Optional as anyOf with
    null, $defs) and the client's `parse`, which validates the call's arguments with the model itself."""
    client = openai_client(server, timeout=300)
    for seed in (0, 1):
        out = client.chat.completions.parse(
            model="tiny-tool-schemas", messages=[{"role": "user", "content": "Book a room"}], max_tokens=1024,
            tools=[openai.pydantic_function_tool(Booking)], seed=seed,
            tool_choice={"type": "function", "function": {"name": "Booking"}})
        call, = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and isinstance(call.function.parsed_arguments, Booking)


def test_a_calls_strings_leave_the_byte_dfas_frame_alone():
    """A string may hold no NUL or 0x01, the bytes that frame the byte DFA's build (byte_dfa.py), so a call's regex
    takes the framed, factored build: a class of any character but the marks took the slow path (Github_medium
    o60099 as a tool call: 54 s of DFA build instead of 1 s)."""
    from dgemma.control import byte_dfa
    from dgemma.control.regex_factor import factor_suffixes
    regex = call_regex([{"name": "f", "parameters": {"type": "object", "properties": {"s": {"type": "string"}}}}])
    assert byte_dfa._framed(factor_suffixes(regex), True) is not None
    assert re.fullmatch(regex, "\ue010call:f{s:\ue012a\tb\nc\ue012}\ue011")
    assert not re.fullmatch(regex, "\ue010call:f{s:\ue012a\x01\ue012}\ue011")


@pytest.mark.parametrize("parameters, words", [
    ({"type": "object", "properties": {"n": {"type": "string", "minLength": 2**64}}}, "'minLength'"),
    ({"type": "object", "properties": {"n": {"type": "array", "minItems": 10**30}}, "required": ["n"]}, "'minItems'"),
    ({"type": "object", "$defs": {**{f"D{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/D{i + 1}"}},
                                               "required": ["x"]} for i in range(500)}, "D500": {"type": "integer"}},
      "properties": {"a": {"$ref": "#/$defs/D0"}}, "required": ["a"]}, "nests deeper")])
def test_hostile_parameters_are_refused_by_name(parameters, words, vocab):  # noqa: F811
    """The hostile schemas response_format refuses, as a function's parameters: a clear error naming where, from
    the compile child (a 500-deep $ref chain raised RecursionError in the server process before)."""
    with pytest.raises(ConstraintError, match=r"^tools\[0\]\.function\.parameters.*" + words.replace("$", r"\$")):
        Constraint.from_tool_call([{"name": "f", "parameters": parameters}], False, vocab)


@pytest.mark.parametrize("value_schema", [
    {"type": "string", "format": "uri", "pattern": "^http://localhost:8080/.*$"},  # a port's literal ':' stays
    {"type": "string", "pattern": '^say "[a-z]{1,4}"$'},  # a quote needs no escape between the marks
    {"enum": ['a "b"', "c\\d", "tab\there"]},
    {"type": "string", "format": "date-time"}])
def test_a_calls_strings_are_written_as_json_writes_them(value_schema):
    """What response_format writes for a string, a call writes too, raw between the marks (a syntax's classes cut
    for a format's wide form must not cut the pattern's literal characters)."""
    from dgemma.control.schema import schema_to_regex
    schema_to_regex(value_schema)  # JSON writes it
    parameters = {"type": "object", "properties": {"v": value_schema}, "required": ["v"]}
    regex, rng = call_regex([{"name": "f", "parameters": parameters}]), random.Random(4)
    draft = jsonschema.validators.validator_for(parameters)
    checker = draft(parameters, format_checker=draft.FORMAT_CHECKER)
    for _ in range(30):
        call, = _calls(sample(regex, rng, decode=False))
        checker.validate(call.arguments)
