"""oneOf: the members whose written values no other member accepts are written, the others left out, so every
value written matches exactly one member; refused only when no member is left."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from dgemma.control.schema import SchemaError, schema_to_regex

from .test_schema_patterns import sample

REPOSITORY = {"properties": {"url": {"type": "string", "maxLength": 8}}, "required": ["url"]}
SCHEMAS = [
    # an untyped object schema accepts false as well: only the object is written (JSONSchemaBench's Github_ultra)
    {"definitions": {"repository": REPOSITORY},
     "oneOf": [{"$ref": "#/definitions/repository"}, {"type": "boolean", "enum": [False]}]},
    # string enums that share no value: both written
    {"oneOf": [{"type": "string", "enum": ["all", "whitelist", "blacklist"]}, {"type": "string", "enum": ["none"]}]},
    # the integers overlap the enum's 5, so both are left out; the string enum is kept
    {"oneOf": [{"type": "string", "enum": ["x", "y"]}, {"type": "integer", "minimum": 0, "maximum": 9},
               {"enum": [5]}]},
    # tagged objects (const tags) and null
    {"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "n": {"type": "integer", "maximum": 3}},
                "required": ["kind", "n"], "additionalProperties": False},
               {"type": "object", "properties": {"kind": {"const": "b"}}, "required": ["kind"],
                "additionalProperties": False},
               {"type": "null"}]},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_every_written_value_matches_exactly_one_member(schema):
    regex = schema_to_regex(schema)
    checker = jsonschema.Draft7Validator(schema)
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        text = sample(regex, rng, decode=False)
        checker.validate(json.loads(text))
        seen.add(type(json.loads(text)).__name__)
    assert seen  # something was written


def test_what_is_written_and_left_out():
    ultra = schema_to_regex(SCHEMAS[0])
    assert "false" not in ultra and "url" in ultra
    enums = schema_to_regex(SCHEMAS[1])
    assert all(word in enums for word in ("whitelist", "none"))
    mixed = schema_to_regex(SCHEMAS[2])
    assert 'x' in mixed and not any(d in mixed for d in "0123456789")


def test_equal_json_numbers_overlap():
    """1 and 1.0 are the same JSON number to JSON Schema: such enums overlap, and with nothing else left it is
    refused, naming the pair."""
    with pytest.raises(SchemaError, match=r"oneOf/0 and /1"):
        schema_to_regex({"oneOf": [{"enum": [1]}, {"enum": [1.0]}]})
    assert schema_to_regex({"oneOf": [{"enum": [1]}, {"enum": [2]}]})
