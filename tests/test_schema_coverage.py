"""Everyday pydantic 2 models: their model_json_schema() compiles, and what the canvas DP writes under random
log-probs validates with jsonschema (format checking on) and with Model.model_validate_json."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import uuid
from decimal import Decimal
from enum import Enum
from typing import Literal, Optional, Union

import jsonschema
import pytest
from pydantic import BaseModel, Field, constr

from dgemma.control import Constraint
from dgemma.control.dp import best_valid_tokens
from dgemma.control.schema import SchemaError, SchemaLimits, schema_to_regex
from dgemma.control.schema.numbers import integer_range, number_regex

from .test_control import random_log_probs, text_of, vocab, tokenizer  # noqa: F401  (fixtures)

SEEDS = range(12)


class Color(str, Enum):
    red = "red"
    green = "green"


class Bounded(BaseModel):
    age: int = Field(ge=0, le=130)
    score: float = Field(ge=0, lt=1)
    delta: int = Field(gt=-20, lt=-3)
    nickname: Optional[str] = Field(None, max_length=6)
    level: Optional[int] = Field(None, ge=1, le=5)
    color: Color
    kind: Literal["a", "b"]


class Tree(BaseModel):
    value: int = Field(ge=0, le=9)
    children: list["Tree"] = []


class Stamped(BaseModel):
    when: datetime.datetime
    day: datetime.date
    at: datetime.time
    id: uuid.UUID
    wait: datetime.timedelta


class Shapes(BaseModel):
    counts: dict[str, int]
    pair: tuple[int, bool]
    tags: set[Literal["x", "y", "z"]]
    names: set[str]
    code: constr(pattern=r"^[A-Z]{2}-[0-9]{2}$")
    either: Union[int, str]


class Priced(BaseModel):
    """pydantic 2.14 writes Decimal (validation mode) as anyOf number | string, the bounds on the number member only
    and no pattern on the string; the writer writes the number (test_decimal_is_written_as_a_finite_number)."""
    price: Decimal
    discount: Decimal = Field(ge=0, le=100)
    tip: Optional[Decimal] = None


class Cat(BaseModel):
    pet_type: Literal["cat"]
    lives: int = Field(ge=1, le=9)


class Dog(BaseModel):
    pet_type: Literal["dog"]
    good: bool


class Owner(BaseModel):
    pet: Union[Cat, Dog] = Field(discriminator="pet_type")
    friends: list[Union[Cat, Dog]] = Field(default=[], max_length=2)


class Net(BaseModel):
    v4: str = Field(json_schema_extra={"format": "ipv4"})
    v6: str = Field(json_schema_extra={"format": "ipv6"})
    host: str = Field(json_schema_extra={"format": "hostname"})
    mail: str = Field(json_schema_extra={"format": "email"})
    link: str = Field(json_schema_extra={"format": "uri"})


def _check_formats(value, schema: dict) -> None:
    """The formats jsonschema leaves unchecked without optional packages, checked with Python's parsers."""
    if isinstance(value, dict):
        for key, sub in value.items():
            _check_formats(sub, schema)
    fmt_checks = {"date-time": datetime.datetime.fromisoformat, "time": datetime.time.fromisoformat,
                  "date": datetime.date.fromisoformat, "ipv4": ipaddress.IPv4Address, "ipv6": ipaddress.IPv6Address,
                  "uuid": uuid.UUID}
    for fmt, parse in fmt_checks.items():
        if isinstance(value, str) and re.fullmatch(schema_to_regex({"type": "string", "format": fmt})[1:-1], value):
            parse(value)


@pytest.mark.parametrize("model", [Bounded, Tree, Stamped, Shapes, Owner, Net, Priced], ids=lambda m: m.__name__)
def test_pydantic_models_validate_by_construction(model, vocab):
    schema = model.model_json_schema()
    constraint = Constraint.from_json_schema(schema, vocab)
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for seed in SEEDS:
        result = best_valid_tokens(random_log_probs(seed, 200, vocab.vocab_size), constraint, tokens_after=0)
        text = text_of(vocab, result.tokens)
        checker.validate(json.loads(text))
        model.model_validate_json(text)
        _check_formats(json.loads(text), schema)


def test_decimal_is_written_as_a_finite_number():
    """What pydantic writes for Decimal admits strings pydantic refuses ("abc"; "500" over le=100) and numbers it
    refuses (1e999 overflows to infinity); the writer writes only numbers within +-10**15 where no bound is set."""
    from pydantic import ValidationError

    schema = Priced.model_json_schema()
    assert schema["properties"]["price"] == {"anyOf": [{"type": "number"}, {"type": "string"}], "title": "Price"}
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    regex = re.compile(schema_to_regex(schema))
    for text in ['{"price":"abc","discount":1}', '{"price":1,"discount":"500"}', '{"price":1e999,"discount":1}']:
        checker.validate(json.loads(text))  # the schema allows it ...
        with pytest.raises(ValidationError):  # ... pydantic refuses it ...
            Priced.model_validate_json(text)
        assert regex.fullmatch(text) is None  # ... and it is never written
    assert regex.fullmatch('{"price":"5","discount":1}') is None  # a decimal string too: the number is written
    for text in ['{"price":1.5,"discount":100}', '{"price":-3,"discount":0.25,"tip":null}',
                 '{"price":1000000000000000,"discount":7,"tip":-999999999999999.75}']:
        assert regex.fullmatch(text), text
        Priced.model_validate_json(text)
    assert regex.fullmatch('{"price":1000000000000001,"discount":1}') is None
    assert re.fullmatch(schema_to_regex({"anyOf": [{"type": "number"}, {"type": "string", "maxLength": 3}]}), '"ab"')


def test_integer_ranges_are_exact():
    for low, high in [(0, 0), (3, 17), (-5, 5), (-123, -7), (12, 345), (0, None), (None, -3), (99, 1000)]:
        regex = re.compile(integer_range(low, high))
        for v in range(-1100, 1200):
            assert bool(regex.fullmatch(str(v))) == ((low is None or v >= low) and (high is None or v <= high))


def test_bounded_numbers_stay_in_range():
    node = {"minimum": -2.5, "exclusiveMaximum": 3}
    regex = re.compile(number_regex(node, ValueError))
    texts = [f"{sign}{i}{frac}" for sign in ("", "-") for i in range(6) for frac in ("", ".0", ".5", ".999")]
    for text in texts:
        assert bool(regex.fullmatch(text)) <= (-2.5 <= float(text) < 3), text
    assert regex.fullmatch("2.999") and regex.fullmatch("-1.5") and regex.fullmatch("-2") and not regex.fullmatch("3")


def test_calendar_dates_are_real():
    regex = re.compile(schema_to_regex({"type": "string", "format": "date"})[1:-1])
    for text in ["2024-02-29", "2000-02-29", "2023-04-30", "1999-12-31"]:
        assert regex.fullmatch(text), text
    for text in ["2023-02-29", "1900-02-29", "2023-04-31", "2023-13-01", "0000-01-01"]:
        assert not regex.fullmatch(text), text


def test_annotations_are_ignored_and_keywords_refused_by_name():
    annotated = {"id": "x", "$id": "y", "title": "t", "x-kubernetes-foo": 1, "readonly": True, "links": [],
                 "examples": [1], "type": "integer", "minimum": 1, "maximum": 3}
    assert [v for v in range(-5, 6) if re.fullmatch(schema_to_regex(annotated), str(v))] == [1, 2, 3]
    for schema, word in [({"not": {"pattern": "ab"}}, "'not'"), ({"type": "array", "contains": {}}, "'contains'"),
                         ({"type": "string", "format": "email", "pattern": "a"}, "'format' and 'pattern'"),
                         ({"type": "number", "multipleOf": 0.03}, "'multipleOf'"),
                         ({"type": "string", "minLength": 2**64}, "'minLength'"),
                         ({"type": "array", "minItems": 10**30}, "'minItems'"),
                         ({"type": "string", "pattern": "(?<=a)b"}, "lookaround")]:
        with pytest.raises(SchemaError, match=re.escape(word)):
            schema_to_regex(schema)


def test_huge_maxima_are_enforced_not_dropped():
    cap, items = SchemaLimits().length_cap, SchemaLimits().items_cap
    regex = schema_to_regex({"type": "string", "maxLength": 2**64})
    assert re.fullmatch(regex, '"' + "a" * cap + '"') and not re.fullmatch(regex, '"' + "a" * (cap + 1) + '"')
    regex = schema_to_regex({"type": "array", "items": {"type": "integer"}, "maxItems": 10**30})
    assert re.fullmatch(regex, "[" + ",".join(["1"] * items) + "]")
    assert not re.fullmatch(regex, "[" + ",".join(["1"] * (items + 1)) + "]")


def test_recursion_is_bounded_and_deep_chains_are_refused():
    tree = Tree.model_json_schema()
    shallow = schema_to_regex(tree, limits=SchemaLimits(max_depth=1))
    assert re.fullmatch(shallow, '{"value":1}') and not re.fullmatch(shallow, '{"value":1,"children":[{"value":2}]}')
    deep = schema_to_regex(tree, limits=SchemaLimits(max_depth=2))
    assert re.fullmatch(deep, '{"value":1,"children":[{"value":2}]}')
    chain = {"$defs": {f"D{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/D{i + 1}"}},
                                 "required": ["x"]} for i in range(500)}, "$ref": "#/$defs/D0"}
    chain["$defs"]["D500"] = {"type": "integer"}
    with pytest.raises(SchemaError, match="nests deeper"):
        schema_to_regex(chain)


def test_refs_by_plain_name_reach_their_anchors():
    """`$ref: "#name"` points at the subschema that declares the name: `$anchor` (2019-09 on), `$id: "#name"`
    (drafts 6 and 7), draft 4's `id: "#name"` (JSONSchemaBench Github_easy o35904: refused before as pointing
    nowhere). A name nothing declares, or one only data holds (an enum value), is still refused."""
    for key, name in (("$anchor", "gate"), ("$id", "#gate"), ("id", "#gate")):
        schema = {"definitions": {"gate": {key: name, "type": "integer", "minimum": 3, "maximum": 5}},
                  "type": "object", "properties": {"g": {"$ref": "#gate"}}, "required": ["g"]}
        regex = schema_to_regex(schema)
        assert re.fullmatch(regex, '{"g":4}') and not re.fullmatch(regex, '{"g":6}')
    for schema in ({"properties": {"g": {"$ref": "#gate"}}},
                   {"properties": {"g": {"$ref": "#gate"}, "h": {"enum": [{"id": "#gate", "type": "string"}]}}}):
        with pytest.raises(SchemaError, match="points nowhere"):
            schema_to_regex(schema)


def test_one_of_is_exact_or_refused():
    disjoint = {"oneOf": [{"type": "string", "maxLength": 2}, {"type": "integer"}, {"type": "null"}]}
    regex = schema_to_regex(disjoint)
    assert re.fullmatch(regex, '"ab"') and re.fullmatch(regex, "-4") and re.fullmatch(regex, "null")
    by_required = {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                             {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    schema_to_regex(by_required)
    with pytest.raises(SchemaError, match="no value satisfies"):  # both accept every object: none is exact
        schema_to_regex({"oneOf": [{"type": "object"}, {"type": "object", "properties": {"b": {}}}]})
    with pytest.raises(SchemaError, match="'oneOf' whose members may overlap"):  # number less integer: not written
        schema_to_regex({"oneOf": [{"type": "number"}, {"type": "integer"}]})


def test_dependent_required_and_pattern_properties():
    schema = {"type": "object", "properties": {"card": {"type": "string", "maxLength": 2},
                                               "billing": {"type": "string", "maxLength": 2}},
              "dependentRequired": {"card": ["billing"]}}
    regex = schema_to_regex(schema)
    assert re.fullmatch(regex, '{"billing":"x","card":"y"}') and not re.fullmatch(regex, '{"card":"y"}')
    free = {"type": "object", "patternProperties": {"^x-[a-z]+$": {"type": "integer", "minimum": 0}},
            "additionalProperties": False, "maxProperties": 2}
    regex = schema_to_regex(free)
    assert re.fullmatch(regex, '{"x-a":1,"x-b":2}') and not re.fullmatch(regex, '{"y":1}')
    assert not re.fullmatch(regex, '{"x-a":-1}')


def test_property_names_with_pattern_properties():
    """Keys as propertyNames writes them, when each is one the first pattern of patternProperties matches, so its
    value meets that pattern's schema (JSONSchemaBench Github_hard o12459: pipette names as a `$ref`ed enum over
    `".*"`; 8 files refused before). A name that may match no pattern is still refused by name."""
    import random

    from .test_schema_patterns import sample

    names = {"enum": ["p10_single", "p300_multi"]}
    for schema in ({"type": "object", "propertyNames": names, "patternProperties": {".*": {"type": "number"}},
                    "additionalProperties": False},
                   {"type": "object", "propertyNames": {"pattern": "^x-[a-z]{1,4}$"},
                    "patternProperties": {"^x-": {"type": "integer", "minimum": 0}}}):
        regex, rng = schema_to_regex(schema), random.Random(0)
        checker = jsonschema.Draft202012Validator(schema)
        for _ in range(40):
            checker.validate(json.loads(sample(regex, rng, decode=False)))
    with pytest.raises(SchemaError, match="'propertyNames' with 'patternProperties'"):
        schema_to_regex({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"},
                         "patternProperties": {"^x": {"type": "integer"}}})
