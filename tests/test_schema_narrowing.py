"""Where the writer writes less than a schema allows, what it writes still validates: oneOf writes the members whose
written values no other member accepts (so every value matches exactly one member), refused only when none is
left; a schema whose regex would pass the size limit is written in its compact form.
"""

from __future__ import annotations

import json
import os
import random
import re

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
    # the integers overlap the enum's 5: the integers are written less 5, the enum is left out (5 matches both)
    {"oneOf": [{"type": "string", "enum": ["x", "y"]}, {"type": "integer", "minimum": 0, "maximum": 9},
               {"enum": [5]}]},
    # tagged objects (const tags) and null
    {"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "n": {"type": "integer", "maximum": 3}},
                "required": ["kind", "n"], "additionalProperties": False},
               {"type": "object", "properties": {"kind": {"const": "b"}}, "required": ["kind"],
                "additionalProperties": False},
               {"type": "null"}]},
]
# oneOf members that overlap as the schema gives them, each narrowed until no other member accepts what it writes
OVERLAPPING = [
    # one of two keys (JSONSchemaBench Github_easy o68337): each member leaves out the other's key
    {"type": "object", "properties": {"tagid": {"type": "string"}, "tagId": {"type": "string"},
                                      "bidfloor": {"type": "number"}},
     "oneOf": [{"required": ["tagid"]}, {"required": ["tagId"]}]},
    # one key set of three (Glaiveai2K calculate_area): the others' first missing key is left out
    {"type": "object", "required": ["shape"],
     "properties": {**{k: {"type": "number"} for k in ("radius", "length", "width", "base", "height")},
                    "shape": {"enum": ["circle", "rectangle", "triangle"]}},
     "oneOf": [{"required": ["radius"]}, {"required": ["length", "width"]}, {"required": ["base", "height"]}]},
    # a member whose keys include another's: the smaller leaves the extra key out, the larger is left out
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
     "oneOf": [{"required": ["a"]}, {"required": ["a", "b"]}]},
    # closed objects with different optional keys (JsonSchemaStore pyrseas): each requires a key the others forbid
    {"oneOf": [{"type": "object", "additionalProperties": False, "properties": {k: {"type": "boolean"}}}
               for k in ("all", "insert", "delete")]},
    # an optional tag: requiring it, with its own const, refuses the other members' values
    {"type": "object", "properties": {"shape": {"enum": ["square", "circle"]}, "side": {"type": "number"},
                                      "radius": {"type": "number"}},
     "oneOf": [{"properties": {"shape": {"const": "square"}}, "required": ["side"]},
               {"properties": {"shape": {"const": "circle"}}, "required": ["side"]}]},
    # lengths that cannot meet: strings (Github_hard o58458), arrays, and a key's value compared inside objects
    {"type": "string", "oneOf": [{"maxLength": 0}, {"minLength": 1, "maxLength": 5}]},
    {"type": "object", "required": ["from"],
     "oneOf": [{"properties": {"from": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                                        "maxItems": 1}}},
               {"properties": {"from": {"type": "array", "items": {"type": "integer"}, "minItems": 2}}}]},
    # a member that is itself a oneOf (Github_easy o9959) is apart when each of its members is
    {"oneOf": [{"oneOf": [{"enum": ["a", "b"]}, {"enum": ["c"]}]}, {"type": "integer", "minimum": 0, "maximum": 9}]},
    # a member compared as written: its not takes the string away
    {"type": ["string", "integer"], "maxLength": 3, "minimum": 0, "maximum": 9,
     "oneOf": [{"not": {"type": "string"}}, {"type": "string"}]},
    # a repository or one disabled name (JSONSchemaBench Github_ultra's composer schemas): apart by how many keys
    {"oneOf": [{"type": "object", "required": ["type", "url"],
                "properties": {"type": {"enum": ["vcs", "git"]}, "url": {"type": "string", "maxLength": 8}}},
               {"type": "object", "additionalProperties": {"type": "boolean", "enum": [False]}, "minProperties": 1,
                "maxProperties": 1}]},
    # number ranges that cannot meet, draft 4's exclusiveMinimum flag included
    {"$schema": "http://json-schema.org/draft-04/schema#", "type": "number",
     "oneOf": [{"maximum": 2}, {"minimum": 2, "exclusiveMinimum": True, "maximum": 9}]},
    # patterns anchored at the start (Github_easy's repository URLs, a UUID in either case): each member is narrowed
    # by not the other, as strings that do not start the way the other's pattern does
    {"oneOf": [{"pattern": "^https?://", "type": "string"}, {"pattern": "^git://", "type": "string"}]},
    {"oneOf": [{"pattern": "^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$"},
               {"pattern": "^[0-9A-F]{8}-([0-9A-F]{4}-){3}[0-9A-F]{12}$"}]},
    # arrays whose items are apart meet only in []: each member is written with at least one item (GeoJSON's
    # coordinates, Github_hard o4413; Vega-Lite's scale domain, Github_ultra o19343)
    {"oneOf": [{"type": "array", "maxItems": 3, "items": {"type": "number", "maximum": 9}},
               {"type": "array", "maxItems": 3,
                "items": {"type": "array", "maxItems": 2, "items": {"type": "number"}}}]},
    {"oneOf": [{"type": "array", "maxItems": 4, "items": {"enum": ["a", "b"]}},
               {"type": "array", "maxItems": 4, "items": {"enum": ["c", "d"]}}]},
]


def validator(schema: dict):
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)(schema)


@pytest.mark.parametrize("schema", SCHEMAS + OVERLAPPING, ids=range(len(SCHEMAS + OVERLAPPING)))
def test_every_written_value_matches_exactly_one_member(schema):
    regex = schema_to_regex(schema)
    checker = validator(schema)
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
    assert 'x' in mixed and "[0-4]" in mixed and "5" not in mixed


@pytest.mark.parametrize("schema", OVERLAPPING, ids=range(len(OVERLAPPING)))
def test_overlapping_members_are_narrowed_not_refused(schema):
    """Every member that can be narrowed is written: across samples, each one is the member a value matches."""
    regex, members = schema_to_regex(schema), schema["oneOf"]
    rest = {k: v for k, v in schema.items() if k != "oneOf"}
    rng, matched = random.Random(1), set()
    for _ in range(400):
        value = json.loads(sample(regex, rng, decode=False))
        hits = [i for i, m in enumerate(members) if validator({**rest, **m}).is_valid(value)]
        assert len(hits) == 1
        matched.add(hits[0])
    expected = {0} if schema is OVERLAPPING[2] else set(range(len(members)))
    assert matched == expected


TAGGED_BY_PATTERN = {"$ref": "#/definitions/rule", "definitions": {"rule": {"oneOf": [
    {"type": "object", "properties": {"type": {"type": "string", "pattern": "^(SEQ|SEQ_LEFT)$"},
                                      "members": {"type": "array", "items": {"$ref": "#/definitions/rule"}}},
     "required": ["type", "members"]},
    {"type": "object", "properties": {"type": {"type": "string", "pattern": "^CHOICE$"},
                                      "members": {"type": "array", "items": {"$ref": "#/definitions/rule"}}},
     "required": ["type", "members"]},
    {"type": "object", "properties": {"type": {"type": "string", "pattern": "^STRING$"}, "value": {"type": "string"}},
     "required": ["type", "value"]}]}}}


def test_members_tagged_by_patterns_of_literals_are_written_as_they_are():
    """tree-sitter's grammar schema (JSONSchemaBench Github_hard o82273) tags its rules with `"pattern": "^ALIAS$"`:
    no string one tag's pattern matches fully is another's, so the members are apart as written, as with const tags
    (before, each was narrowed against the others, and the narrowing of 12 recursive members passed the 64-level
    nesting limit). Every value written matches exactly one member."""
    rule = TAGGED_BY_PATTERN["definitions"]["rule"]
    as_they_are = {**TAGGED_BY_PATTERN, "definitions": {"rule": {"anyOf": rule["oneOf"]}}}
    regex = schema_to_regex(TAGGED_BY_PATTERN)
    assert regex == schema_to_regex(as_they_are)
    checker, rng = validator(TAGGED_BY_PATTERN), random.Random(2)
    for _ in range(200):
        value = json.loads(sample(regex, rng, decode=False))
        checker.validate(value)
    # a pattern that is not all literals, or that matches another's tag, still needs telling apart
    loose = {"oneOf": [{"type": "string", "pattern": "^S[A-Z]*$"}, {"type": "string", "pattern": "^(STRING|X)$"}]}
    assert schema_to_regex(loose) != schema_to_regex({"anyOf": loose["oneOf"]})


@pytest.mark.parametrize("members, apart", [
    ([{"pattern": "APPROVER"}, {"pattern": "SIGNER"}], True),  # Github_hard o12278: roles, each pattern a search
    ([{"pattern": "(GET|POST)"}, {"pattern": "^PUT$"}, {"enum": ["HEAD"]}], True),
    ([{"pattern": "A"}, {"pattern": "AB"}], False),  # AB holds A: the first member is narrowed, not written as is
    ([{"pattern": "https", "format": "uri"}, {"pattern": "SIGNER"}], False)])  # a format writes its own strings
    # (an https URI's path may hold SIGNER)
def test_members_whose_patterns_of_literals_search_are_apart_when_no_written_string_holds_another(members, apart):
    """An unanchored pattern of literals writes its literals (a full match is a match), so two such members are
    apart when no string one writes holds a match of the other's pattern; refused before ('oneOf' whose members may
    overlap, as `not` with an unanchored pattern cannot be written)."""
    schema = {"oneOf": members}
    try:
        regex = schema_to_regex(schema)
    except SchemaError:
        assert not apart
        return
    assert (regex == schema_to_regex({"anyOf": members})) == apart
    checker, rng = validator(schema), random.Random(3)
    for _ in range(100):
        checker.validate(json.loads(sample(regex, rng, decode=False)))


def test_a_member_that_may_write_another_type_does_not_exclude_by_its_keys():
    """`required` binds objects only: a member that may write a string is not apart from the other by its keys (a
    string would match both), so it is written with `not` the other member: objects with x and without y."""
    schema = {"oneOf": [{"type": ["string", "object"], "required": ["x"]}, {"required": ["y"]}]}
    regex, rng = schema_to_regex(schema), random.Random(2)
    values = [json.loads(sample(regex, rng, decode=False)) for _ in range(200)]
    for value in values:
        jsonschema.Draft7Validator(schema).validate(value)
    assert all(isinstance(v, dict) for v in values)
    assert {("x" in v, "y" in v) for v in values} >= {(True, False), (False, True)}


def test_equal_json_numbers_overlap():
    """1 and 1.0 are the same JSON number to JSON Schema: such enums overlap, so no value matches exactly one member
    (each member less the other is empty) and the schema is refused as admitting no value."""
    with pytest.raises(SchemaError, match=r"no value satisfies"):
        schema_to_regex({"oneOf": [{"enum": [1]}, {"enum": [1.0]}]})
    assert schema_to_regex({"oneOf": [{"enum": [1]}, {"enum": [2]}]})


def test_a_schema_too_large_to_write_whole_is_written_compact():
    """Past max_regex_chars the writer tries the compact form: required keys only, free objects empty, a union's
    first member. What it writes still validates; a schema still too large is refused by name."""
    from dgemma.control.schema import SchemaLimits

    leaf = {"type": "object", "properties": {f"k{i}": {"type": "string", "maxLength": 30} for i in range(12)},
            "required": ["k0"]}
    schema = {"type": "object", "properties": {f"p{i}": {"anyOf": [leaf, {"type": "integer"}]} for i in range(40)},
              "required": ["p0", "p1"], "additionalProperties": {"type": "object"}}
    limits = SchemaLimits(max_regex_chars=3000)
    regex = schema_to_regex(schema, limits=limits)
    assert len(regex) <= 3000 and "p2" not in regex  # optional keys left out
    checker = jsonschema.Draft7Validator(schema)
    rng = random.Random(1)
    for _ in range(200):
        checker.validate(json.loads(sample(regex, rng, decode=False)))
    required = {**schema, "required": [f"p{i}" for i in range(40)]}
    with pytest.raises(SchemaError, match="passes the limit"):
        schema_to_regex(required, limits=limits)


def test_a_ref_graph_written_many_times_stops_at_the_work_limit_and_is_written_compact():
    """Each node's regex is small but a $ref graph inlined at every level is written exponentially many times
    (JSONSchemaBench WashingtonPost took 170 s before it passed max_regex_chars): past max_work_chars the compact
    form is written instead, and it validates."""
    from dgemma.control.schema import SchemaLimits

    defs = {f"n{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/n{i + 1}"},
                                                        "b": {"$ref": f"#/$defs/n{i + 1}"}}, "required": ["id"]}
            for i in range(9)}
    defs["n9"] = {"type": "string", "maxLength": 3}
    for node in list(defs.values())[:9]:
        node["properties"]["id"] = {"type": "integer"}
    schema = {"$defs": defs, "$ref": "#/$defs/n0"}
    whole = schema_to_regex(schema)
    limits = SchemaLimits(max_work_chars=len(whole))
    compact = schema_to_regex(schema, limits=limits)
    assert len(compact) < len(whole) // 10
    checker, rng = jsonschema.Draft202012Validator(schema), random.Random(5)
    for _ in range(100):
        checker.validate(json.loads(sample(compact, rng, decode=False)))


def test_a_schema_past_the_node_limit_is_written_compact_or_refused():
    """Nodes count even when they write nothing (a union explored and left out): past max_nodes the compact form is
    tried, and a schema that needs more nodes even then is refused as too large."""
    from dgemma.control.schema import SchemaLimits

    leaf = {"anyOf": [{"type": "integer", "minimum": 5, "maximum": 1}, {"type": "string", "maxLength": 2}]}
    schema = {"type": "object", "properties": {f"p{i}": leaf for i in range(30)}, "required": ["p0"]}
    compact = schema_to_regex(schema, limits=SchemaLimits(max_nodes=40))
    assert "p1" not in compact and "p0" in compact
    checker, rng = jsonschema.Draft202012Validator(schema), random.Random(6)
    for _ in range(50):
        checker.validate(json.loads(sample(compact, rng, decode=False)))
    with pytest.raises(SchemaError, match="nodes written"):
        schema_to_regex(schema, limits=SchemaLimits(max_nodes=3))


NEGATIONS = [
    {"type": "object", "properties": {"body": {"type": "string", "maxLength": 4},
                                      "bodyValue": {"type": "integer", "maximum": 9}},
     "not": {"required": ["body", "bodyValue"]}},
    {"type": "object", "properties": {"a": {"type": "integer", "maximum": 3}, "gone": {"not": {}}},
     "required": ["a"]},
    {"type": ["string", "null", "boolean"], "maxLength": 3, "not": {"type": "null"}},
    {"enum": ["red", "green", 1, 1.5], "not": {"enum": ["green", 1.0]}},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, {"type": "string", "maxLength": 2}],
     "not": {"type": "string"}},
    # values left out of a node without finite values (JSONSchemaBench Github_hard o83707, o57622): strings that
    # are none of them, integers in the gaps, the other boolean
    {"type": "string", "maxLength": 3, "not": {"enum": ["a", "ab", "a.b", "", "\\", "[x]"]}},
    {"type": "integer", "minimum": 1, "maximum": 9, "not": {"enum": [1, 3, 4.0, 9]}},
    {"type": ["string", "integer", "boolean", "null"], "minLength": 1, "maxLength": 2,
     "not": {"enum": ["b", 0, True, None]}},
    # a format no validator checks is an annotation; a checked format's written form is none of the values
    {"type": "string", "format": "wikidata-id", "maxLength": 3, "not": {"enum": ["a", "ab"]}},
    {"type": "string", "format": "email", "not": {"enum": ["", "n/a", "none"]}},
    # a pattern none of whose written strings is a value (JSONStore's openfin: a version pattern less "")
    {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)*$", "not": {"enum": ["", "latest", "1.x"]}},
    # ... or, where the pattern (anchored at its start) may write some of them, its strings whose first character
    # none of them starts with (Github_medium o24621: a module name that is not a reserved word)
    {"type": "string", "pattern": "^[a-z]+[a-z0-9-]*$", "minLength": 2, "maxLength": 8,
     "not": {"enum": ["test", "source", "yotta_modules", "include"]}},
    {"type": "string", "pattern": "^[ab]$", "not": {"enum": ["a"]}},
    # a pattern anchored at its start: strings that do not start so (a pattern takes every value but a string)
    {"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "not": {"pattern": "^ab"}},
    {"type": ["string", "integer"], "maxLength": 4, "not": {"pattern": "^(a|bc)"}},
    {"type": "string", "pattern": "^b1|^c2|^d$", "not": {"pattern": "^b"}},  # alternatives kept together
    # a pattern of one character class: strings holding none of its characters (Github_easy o1327, Github_hard
    # o57762)
    {"type": "string", "maxLength": 6, "not": {"pattern": "[^a-zA-Z0-9.,()@&' -]"}},
    {"type": ["string", "integer"], "not": {"pattern": "(\\$)"}},
    # a pattern of one class repeated, anchored at both ends: strings holding another character, or empty when the
    # class must repeat at least once (Github_ultra o65416: a name that is not only punctuation and spaces)
    {"type": "string", "minLength": 1, "not": {"pattern": "^[\\.\\,\\*\\\\\\-\\s\\{\\}\\(\\)]+$"}},
    {"type": "string", "maxLength": 3, "not": {"pattern": "^[a-c]*$"}},
    {"type": ["string", "null"], "maxLength": 2, "not": {"pattern": "^(x)+$"}},
]


@pytest.mark.parametrize("schema", NEGATIONS, ids=range(len(NEGATIONS)))
def test_not_in_the_forms_a_regex_can_honour(schema):
    regex = schema_to_regex(schema)
    checker = jsonschema.Draft7Validator(schema)
    rng = random.Random(2)
    for _ in range(200):
        checker.validate(json.loads(sample(regex, rng, decode=False)))


def test_a_string_less_some_values_is_exactly_the_other_strings():
    """The pattern written for a string that is none of some words (under minLength/maxLength) takes every other
    string of those lengths: checked over all strings of up to 4 characters of an alphabet that holds the words'
    characters, JSON's escapes and the pattern's special characters."""
    import itertools

    from dgemma.control.schema.negation import _differing

    for words, low, high in ((["ab", "abc", "b"], 1, 3), (["", "a.b", "-"], 0, None), (["a\\b", "[x]", "^"], 1, 4)):
        pattern = re.compile(_differing(words, low, high))
        for n in range(5):
            for text in map("".join, itertools.product('ab.-x"\\[]^\n', repeat=n)):
                assert bool(pattern.fullmatch(text)) == (low <= len(text) <= (high or n) and text not in words)


def test_other_forms_of_not_are_refused_by_name():
    for schema in ({"type": "number", "not": {"type": "integer"}},
                   {"type": "number", "not": {"enum": [1]}}, {"type": "string", "pattern": "[ab]",
                                                               "not": {"enum": ["a"]}},
                   {"type": "string", "pattern": "^[ab]*$", "not": {"enum": ["", "a"]}},
                   {"type": "string", "format": "date", "not": {"const": "2024-02-29"}},
                   {"type": "string", "not": {"pattern": "ab"}}, {"type": "string", "not": {"pattern": "^a|b"}},
                   {"type": "string", "pattern": "a1", "not": {"pattern": "^b"}},
                   {"type": "string", "pattern": "^a", "not": {"pattern": "[0-9]"}}):
        with pytest.raises(SchemaError, match="'not'"):
            schema_to_regex(schema)
    with pytest.raises(SchemaError, match="no value satisfies"):
        schema_to_regex({"type": "object", "properties": {"a": {}}, "required": ["a"], "not": {"required": ["a"]}})


def test_types_meet_only_where_both_sides_allow():
    """allOf of [number, integer] and string has no value (it wrote integers, which the string member refuses); an
    anyOf member its siblings leave no value to is left out, not the whole anyOf."""
    with pytest.raises(SchemaError, match="no value satisfies"):
        schema_to_regex({"allOf": [{"type": ["number", "integer"]}, {"type": "string"}]})
    schema = {"type": ["integer", "number"], "anyOf": [{"type": "integer", "minimum": 0, "maximum": 3},
                                                      {"type": "string"}]}
    regex = schema_to_regex(schema)
    rng = random.Random(3)
    for _ in range(50):
        jsonschema.validate(json.loads(sample(regex, rng, decode=False)), schema)


def test_a_multiple_of_one_kth_is_written_as_whole_numbers():
    """multipleOf 0.01 (money) or 0.5: every integer is a multiple, and jsonschema's floating-point division
    agrees; such numbers are written as integers. A step like 0.3 is still refused."""
    from pydantic import BaseModel, Field

    class Price(BaseModel):
        amount: float = Field(ge=0, le=10**6, multiple_of=0.01)
        half: float = Field(multiple_of=0.5)

    schema = Price.model_json_schema()
    regex = schema_to_regex(schema)
    rng = random.Random(4)
    for _ in range(200):
        text = sample(regex, rng, decode=False)
        jsonschema.validate(json.loads(text), schema)
        Price.model_validate_json(text)
    with pytest.raises(SchemaError, match="'multipleOf' 0.3"):
        schema_to_regex({"type": "number", "multipleOf": 0.3, "minimum": 0, "maximum": 3})


def test_a_multiple_of_one_kth_stays_within_what_a_float_holds():
    """Validators divide by a fractional step in floating point: jsonschema raises OverflowError on an integer past
    1e308 (a random model wrote one for JSONSchemaBench Github_medium o46411), so open sides stop at 10**15."""

    regex = schema_to_regex({"type": "number", "multipleOf": 0.01})
    assert re.fullmatch(regex, str(10**15)) and re.fullmatch(regex, str(-10**15))
    assert not re.fullmatch(regex, str(10**15 + 1)) and not re.fullmatch(regex, "1" * 400)
    jsonschema.validate(10**15, {"type": "number", "multipleOf": 0.01})
    assert re.fullmatch(schema_to_regex({"type": "integer", "multipleOf": 0.5, "minimum": 10**20}), str(10**20 + 5))
    # so does a step of 1.0 (Github_trivial o41773, draft 4's "multipleOf": 1.0 on an integer); a step of 1 does not
    one = schema_to_regex({"type": "integer", "multipleOf": 1.0, "minimum": 0})
    assert re.fullmatch(one, str(10**15)) and not re.fullmatch(one, str(10**15 + 1))
    with pytest.raises(OverflowError):
        jsonschema.validate(10**400, {"type": "integer", "multipleOf": 1.0})
    assert re.fullmatch(schema_to_regex({"type": "integer", "multipleOf": 1, "minimum": 0}), "1" * 400)


COMBINED = [
    # if/then/else on a tag (JSONSchemaBench Github_easy o4834): both branches written
    {"type": "object", "properties": {"c": {"enum": ["ghi", "x"]}, "a": {"type": "integer"}, "b": {"type": "integer"}},
     "if": {"properties": {"c": {"enum": ["ghi"]}}}, "then": {"required": ["a", "b", "c"]},
     "else": {"required": ["a", "c"]}},
    # two conditions in allOf (Github_hard o32451's shape), the tag required: each branch pair that can hold
    {"type": "object", "required": ["kind"],
     "properties": {"kind": {"enum": ["a", "b", "c"]}, "x": {"type": "integer"}, "y": {"type": "string"}},
     "allOf": [{"if": {"properties": {"kind": {"const": "a"}}}, "then": {"required": ["x"]}},
               {"if": {"properties": {"kind": {"const": "b"}}}, "then": {"required": ["y"]}}]},
    # not with properties: an object whose key holds another value
    {"type": "object", "properties": {"mode": {"enum": ["on", "off", "auto"]}},
     "not": {"properties": {"mode": {"const": "on"}}}},
    # dependentSchemas and draft 7's schema-valued dependencies: a key present brings its schema
    {"type": "object", "properties": {"card": {"type": "integer"}, "billing": {"type": "string"}},
     "dependentSchemas": {"card": {"required": ["billing"], "properties": {"billing": {"minLength": 3}}}}},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}, "c": {"type": "null"}},
     "dependencies": {"a": {"properties": {"b": {"const": "y"}}}, "c": ["a"]}},
    # propertyNames through a $ref (JsonSchemaStore tokenlist, aerleon): the keys follow the referenced pattern
    {"type": "object", "$defs": {"token": {"type": "string", "pattern": "^[a-z_]+$", "minLength": 1}},
     "propertyNames": {"$ref": "#/$defs/token"}, "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    {"type": "object", "$defs": {"kind": {"enum": ["core", "format"]}},
     "properties": {"core": {"type": "integer"}, "other": {"type": "integer"}},
     "propertyNames": {"$ref": "#/$defs/kind"}},
    # two anyOf met by allOf (once an endless loop): (string or integer) and (short string or null)
    {"anyOf": [{"type": "string"}, {"type": "integer"}],
     "allOf": [{"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]}]},
]


@pytest.mark.parametrize("schema", COMBINED, ids=range(len(COMBINED)))
def test_conditions_references_and_unions_are_written_exactly(schema):
    regex, checker, rng = schema_to_regex(schema), validator(schema), random.Random(4)
    values = [json.loads(sample(regex, rng, decode=False)) for _ in range(300)]
    for value in values:
        checker.validate(value)
    if schema is COMBINED[0]:  # both branches are written
        assert {v["c"] for v in values} == {"ghi", "x"}
    if schema is COMBINED[1]:  # every tag, each with what its condition requires
        assert {v["kind"] for v in values} == {"a", "b", "c"}
    if schema is COMBINED[2]:
        assert all(v["mode"] in ("off", "auto") for v in values)
    if schema is COMBINED[3]:  # the card is written, with its billing, and left out
        assert {"card" in v for v in values} == {True, False}


def test_a_condition_no_branch_of_which_can_be_written_is_refused_by_name():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "if": {"properties": {"n": {"minimum": 3}}}, "then": {"properties": {"n": {"maximum": 1}}}}
    with pytest.raises(SchemaError, match="'not'"):
        schema_to_regex(schema)


def test_an_empty_enum_takes_no_value():
    """`enum: []` is valid JSON Schema (the specification says it SHOULD have an element) and takes no value, like
    a false schema: an optional property with it is left out, a required one leaves nothing to write (JSONSchemaBench
    Github_easy o58619, Github_hard o55320: refused before as "must be a non-empty list")."""
    schema = {"type": "object", "properties": {"never": {"enum": []}, "n": {"type": "integer", "maximum": 3}},
              "required": ["n"]}
    regex, checker, rng = schema_to_regex(schema), validator(schema), random.Random(0)
    for _ in range(50):
        value = json.loads(sample(regex, rng, decode=False))
        checker.validate(value)
        assert "never" not in value
    with pytest.raises(SchemaError, match="no value satisfies"):
        schema_to_regex({**schema, "required": ["n", "never"]})
    with pytest.raises(SchemaError, match="no value satisfies"):
        schema_to_regex({"enum": ["a"], "const": "b"})


def test_the_regex_does_not_depend_on_the_hash_seed():
    """`not` over several keywords became an anyOf in the order of a set of keyword names, so the regex changed with
    PYTHONHASHSEED from one process to the next (JSONSchemaBench JsonSchemaStore aiproj-1.1: a oneOf member that
    also takes null, narrowed by `not` the other). Two processes with different seeds write the same regex."""
    import subprocess
    import sys

    schema = {"type": ["object", "null"], "additionalProperties": False,
              "properties": {"Enabled": {"type": "boolean"}, "Name": {"type": ["null", "string"]}},
              "oneOf": [{"type": "object", "properties": {"Enabled": {"enum": [True]}, "Name": {"type": "string"}},
                         "required": ["Enabled", "Name"]},
                        {"properties": {"Enabled": {"enum": [False]}}, "required": ["Enabled"]}]}
    code = ("import json, sys; from dgemma.control.schema import schema_to_regex; "
            "print(schema_to_regex(json.loads(sys.argv[1])))")
    written = {subprocess.run([sys.executable, "-c", code, json.dumps(schema)], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
               for seed in range(1, 7)}
    assert len(written) == 1


@pytest.mark.parametrize("schema", [{"type": "integer", "multipleOf": 3}, {"type": "integer", "multipleOf": 10,
                                                                             "minimum": 5},
                                    {"type": "integer", "multipleOf": 12, "exclusiveMaximum": -7},
                                    {"type": "number", "multipleOf": 7, "minimum": -10, "maximum": None}])
def test_an_integer_multipleof_with_an_open_side_writes_the_nearest_thousand_multiples(schema):
    """Refused before ("without both 'minimum' and 'maximum'": Github_hard o41232, Github_trivial o25195 and
    o83695): on the open side the writer takes the 1,000 multiples next to the bound, or around 0."""
    schema = {k: v for k, v in schema.items() if v is not None}
    regex = re.compile(schema_to_regex(schema))
    step = schema["multipleOf"]
    written = [n for n in range(-20_000, 20_000) if regex.fullmatch(str(n))]
    assert 999 <= len(written) <= 1000
    for n in written:
        jsonschema.validate(n, schema)
    assert 0 in written or "minimum" in schema or "exclusiveMaximum" in schema
    assert not regex.fullmatch(str(step + 1)) and not regex.fullmatch("1.5")


@pytest.mark.parametrize("schema", [
    {"type": "object", "minProperties": 6, "additionalProperties": True},  # Github_medium o48619: feeds
    {"type": "object", "minProperties": 2, "additionalProperties": False,  # Github_hard o74560: terrains
     "patternProperties": {"^[0-9a-zA-Z_-]+$": {"type": "integer", "minimum": 0}}},
    {"type": "object", "minProperties": 2, "maxProperties": 4, "propertyNames": {"pattern": "^x+$"},
     "additionalProperties": {"type": "boolean"}}])
def test_free_keys_under_minproperties_are_written_with_distinct_lengths(schema):
    """Refused before (a repeated free key counts once): the keys are written with distinct lengths, so each one
    counts; every value written has at least minProperties keys (and at most maxProperties)."""
    regex, rng = schema_to_regex(schema), random.Random(5)
    checker = jsonschema.Draft202012Validator(schema)
    counts = set()
    for _ in range(100):
        text = sample(regex, rng, decode=False)
        value = json.loads(text)
        checker.validate(value)
        counts.add(len(value))
        assert len(value) == len(json.loads(text, object_pairs_hook=list))  # no key written twice
    assert min(counts) >= schema["minProperties"]
