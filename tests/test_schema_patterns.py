"""A string's `pattern` together with minLength/maxLength: every string written matches the pattern and has an
allowed length (the repetitions are raised and cut until it does; an alternative that cannot is left out)."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
from hypothesis import given, settings, strategies as st
from pydantic import BaseModel, constr

from dgemma.control import Constraint
from dgemma.control.dp import best_valid_tokens
from dgemma.control.schema import SchemaError, schema_to_regex
from dgemma.control.schema.charsets import sre, sre_parse
from dgemma.control.schema.strings import FORMATS, PYDANTIC_FORMATS, pattern_body

from .test_control import random_log_probs, text_of, vocab, tokenizer  # noqa: F401  (fixtures)

# the commonest patterns that JSONSchemaBench combines with minLength/maxLength, and a few harder shapes
PATTERNS = [r"^([\w\/-]|[\w-][\w\/-]*[\w-])$", r"^([a-z0-9-]+):([a-z0-9\.-]+):([a-z0-9-]+)?:([a-z0-9-]+)$",
            r"^[A-Za-z0-9:_\-]+$", r"^(?:\S+\s+){0,9}\S+$", r"^$|(^(?:\S+\s+){0,99}\S+$)", r"^[0-9a-z-]*$",
            r"^(\d+\.\d+\.\d+.*)$", r"[a-zA-Z0-9_.-]+", r"^[0-9]{9}$", r"^(ab|c{2,})+x?$", r'^[^"\\]{2,}$',
            r"^\W\D\S+$", r"^[\W\d]*$", r"^$|^a+$", r"^[^@\s]+$", r"^[^\d_]+$", r"^[^\w]+$", r"^[^\S]+$",
            # negative lookaheads at the start (JSONSchemaStore's reserved words)
            r"^(?!@@)[\w@]+$", r"^(?!interactive|name|style).+$", r"^(?!pattern$).*$", r"(?!ab)(a|b){2,3}c?",
            r"^(?!io\.papermc\.)([a-zA-Z_$][a-zA-Z\d_$]*\.)*[a-zA-Z_$][a-zA-Z\d_$]*$", r"^(?![ \t\n]*\(default(.*)\))[\s\S]*"]


POOL = [chr(c) for c in range(0x20, 0x7F)] + ["\x00", "\x1f", "\x85", "é", "€", "中", "\u3000", "\U0001F600"]


def sample(body: str, rng: random.Random, decode: bool = True) -> str:
    """A random string of the regex `body` (the writer's syntax, which Python's re reads), repetitions at random
    counts between their bounds, their extremes included; `decode`: read as the body of a JSON string. (hypothesis'
    from_regex takes seconds a string on the writer's large Unicode classes.)"""
    def walk(items) -> str:
        out = []
        for op, arg in items:
            if op == sre.LITERAL:
                out.append(chr(arg))
            elif op == sre.IN:
                ranges = [(a, a) if kind == sre.LITERAL else a for kind, a in arg if kind in (sre.LITERAL, sre.RANGE)]
                if any(kind == sre.NEGATE for kind, _ in arg):  # [^...]: a character of the pool outside them
                    out.append(rng.choice([c for c in POOL if not any(a <= ord(c) <= b for a, b in ranges)]))
                    continue
                a, b = rng.choice(ranges)
                out.append(chr(rng.choice([a, b, rng.randint(a, b)])))
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
                low, high, sub = arg
                high = low + 8 if high == sre.MAXREPEAT else high
                out.extend(walk(sub) for _ in range(rng.choice([low, high, rng.randint(low, high)])))
            elif op == sre.SUBPATTERN:
                out.append(walk(arg[-1]))
            elif op == sre.BRANCH:
                out.append(walk(rng.choice(arg[1])))
            else:
                raise AssertionError(f"the writer wrote {op}")
        return "".join(out)

    text = walk(sre_parse.parse(body))
    assert re.fullmatch(body, text)
    return json.loads(f'"{text}"') if decode else text  # JSON string text: escapes count as one character


@settings(max_examples=300, deadline=None, derandomize=True)
@given(pattern=st.sampled_from(PATTERNS), low=st.integers(0, 12), span=st.one_of(st.none(), st.integers(0, 40)),
       seed=st.integers(0, 2**16))
def test_written_strings_match_the_pattern_and_the_lengths(pattern, low, span, seed):
    high = None if span is None else low + span
    try:
        body = pattern_body(pattern, 1024, 64, low, high)
    except ValueError as err:
        assert "minLength/maxLength" in str(err)  # only when no alternative can be cut to the lengths
        return
    rng = random.Random(seed)
    for _ in range(20):
        text = sample(body, rng)
        assert re.search(pattern, text) and low <= len(text) <= (len(text) if high is None else high), text


@pytest.mark.parametrize("pattern", [r"^[^@\s]$", r"^[^\d]$", r"^[^\w]$", r"^[^\S]$", r"^[^\D]$", r"^[^\W]$",
                                     r"^[\s]$", r"^[\d]$", r"^[\w]$", r"^[\S\d]$"])
def test_classes_write_only_what_both_dialects_put_in_them(pattern):
    r"""A character the written class takes must match the pattern in Python's re (jsonschema's): Unicode spaces,
    digits and letters that Python's \s, \d, \w take and ECMA-262's do not (or the reverse) stay out of every
    class, negated ones included (JSONSchemaBench Github_easy o21149 wrote U+00A0 for [^@\s])."""
    body = pattern_body(pattern, 1024, 64)
    probes = [chr(c) for c in range(0x20, 0x7F)] + ["\xa0", "\u1680", "\u2003", "\u3000", "\ufeff", "\u0663",
                                                       "\u0966", "é", "ß", "中", "\U0001F600"]
    taken = [c for c in probes if re.fullmatch(body, c)]
    assert taken and all(re.search(pattern, c) for c in taken), [c for c in taken if not re.search(pattern, c)]


def test_a_pattern_that_cannot_meet_the_lengths_is_refused_by_name():
    with pytest.raises(SchemaError, match="pattern.*minLength/maxLength"):
        schema_to_regex({"type": "string", "pattern": "^[0-9]{9}$", "minLength": 10})
    assert pattern_body("^[0-9]{9}$", 1024, 64, 9, 9) == "([0-9]){9,9}"
    # the empty alternative is left out under minLength 1; the other is cut to fit
    assert not re.fullmatch(pattern_body(r"^$|^a+$", 1024, 64, 1, 3), "")


class Slug(BaseModel):
    slug: constr(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", min_length=3, max_length=12)
    words: constr(pattern=r"^(?:\S+\s+){0,9}\S+$", max_length=30)
    code: constr(pattern=r"^[A-Z]+$", min_length=4)


def test_pydantic_constr_with_pattern_and_lengths_validates(vocab):  # noqa: F811  (a fixture)
    schema = Slug.model_json_schema()
    constraint = Constraint.from_json_schema(schema, vocab)
    checker = jsonschema.Draft202012Validator(schema)
    for seed in range(8):
        text = text_of(vocab, best_valid_tokens(random_log_probs(seed, 200, vocab.vocab_size), constraint,
                                                tokens_after=0).tokens)
        checker.validate(json.loads(text))
        Slug.model_validate_json(text)


@pytest.mark.parametrize("fmt", sorted(set(FORMATS) - set(PYDANTIC_FORMATS)))
def test_every_written_format_passes_jsonschemas_format_checker(fmt):
    """Each narrow form of each format (strings.FORMATS; the writer may take any of them) is accepted by jsonschema's
    checker for it (its format-nongpl extras installed: a format it would not check fails here instead of passing
    unchecked). pydantic's own formats, which jsonschema does not check, are checked with pydantic below."""
    old = fmt in ("color", "host-name", "ip-address")
    draft = jsonschema.Draft3Validator if old else jsonschema.Draft202012Validator
    assert fmt in draft.FORMAT_CHECKER.checkers, f"jsonschema cannot check {fmt!r}: install jsonschema[format-nongpl]"
    schema = {"type": "string", "format": fmt}
    checker = draft(schema, format_checker=draft.FORMAT_CHECKER)
    assert schema_to_regex(schema) == f'"{FORMATS[fmt][0]}"'
    rng = random.Random(3)
    for form in FORMATS[fmt]:
        for _ in range(10 if fmt.startswith("iri") else 60):  # jsonschema's iri checker takes 0.1 s a string
            checker.validate(json.loads(sample(f'"{form}"', rng, decode=False)))


def test_angle_brackets_compile_and_match_themselves(vocab):  # noqa: F811  (a fixture)
    """outlines-core's Rust regex reads \\< and \\> as word boundaries and cannot build a DFA with them
    (JSONSchemaBench Github_medium o66152: an enum holding "<", ">=", ...): they are written plain."""
    schema = {"type": "object", "properties": {"op": {"enum": ["<", ">=", "<>"]},
                                               "tag": {"type": "string", "pattern": "^<[a-z]+>$"}},
              "required": ["op", "tag"]}
    constraint = Constraint.from_json_schema(schema, vocab)
    regex = schema_to_regex(schema)
    assert re.fullmatch(regex, '{"op":">=","tag":"<ab>"}') and not re.fullmatch(regex, '{"op":">","tag":"<ab>"}')
    assert constraint.num_states > 0


@pytest.mark.parametrize("pattern", [r"^(?!@@)[@a-z]+$", r"^(?!ab|b)(a|b)*$", r"(?!a?b)[abc]{1,3}", r"^(?!a)(?!b)[abc]*$",
                                     r"^(?!(ab)+)(a|b|ab)*c?$", r"^(?!a)^[ab]+"])
def test_a_negative_lookahead_writes_only_strings_that_match_the_pattern(pattern):
    """Every string of up to 5 characters of a small alphabet that the written body takes matches the pattern
    (Python's re), and the body takes some string the pattern's lookahead allows."""
    import itertools

    body = re.compile(pattern_body(pattern, 1024, 64))
    taken = [t for n in range(6) for t in map("".join, itertools.product("abc@", repeat=n)) if body.fullmatch(t)]
    assert taken and all(re.search(pattern, t) for t in taken), [t for t in taken if not re.search(pattern, t)]


@pytest.mark.parametrize("pattern", [r"^(?!a?)b", r"^(?!.*x)[ab]+$", r"(?=a)b", r"(?<!a)b", r"^(a(?!b))+$"])
def test_other_lookarounds_are_refused_by_name(pattern):
    with pytest.raises(ValueError, match="lookahead|lookaround"):
        pattern_body(pattern, 1024, 64)


PYDANTIC_TYPES = ["IPvAnyAddress", "IPvAnyInterface", "IPvAnyNetwork", "UUID1", "UUID3", "UUID4", "UUID5", "UUID6",
                  "UUID7", "UUID8", "Base64Str", "Base64Bytes", "ipaddress.IPv4Network", "ipaddress.IPv4Interface",
                  "ipaddress.IPv6Network", "ipaddress.IPv6Interface"]


@pytest.mark.parametrize("name", PYDANTIC_TYPES)
def test_pydantics_own_formats_are_written_as_values_pydantic_takes(name):
    """pydantic writes formats of its own for these types (ipvanyaddress, uuid4, base64, ipv4network, ...), which
    JSON Schema validators take as annotations and pydantic checks: every written value passes the model and
    jsonschema (format checking on). Before, any string was written, and pydantic refused every one. Together
    the types write every format of PYDANTIC_FORMATS but uuid2 (pydantic has no UUID2)."""
    import ipaddress

    import pydantic

    module, _, attr = name.rpartition(".")
    field_type = getattr(ipaddress if module == "ipaddress" else pydantic, attr)
    model = pydantic.create_model("Model", value=(field_type, ...))
    schema = model.model_json_schema()
    assert schema["properties"]["value"]["format"] in PYDANTIC_FORMATS
    regex = schema_to_regex(schema)
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    rng = random.Random(0)
    for _ in range(100):
        text = sample(regex, rng, decode=False)
        model.model_validate_json(text)
        checker.validate(json.loads(text))


@pytest.mark.parametrize("pattern, alphabet", [
    ("^01$|^07$", "0178"), ("^ab$|^ac$", "abc"), ("^([^,]|$)", "a,"), (r"^(\/?((\.{2})|([a-z]*))($|\/))*$", "a./"),
    (r"^([0-9x]+\.[0-9x]+\.*[0-9x]*$|\%V\%)", "0x.%V"), ("^([^,]+(,|$)){2,}$", "a,"), ("(?:^|\n)ab", "ab\n"),
    ("^a(b$|c)", "abc"), ("x(^|y)z", "xyz"), (r"^(a|\bb)+$", "ab ")])
def test_anchors_inside_alternatives_are_written_or_left_out(pattern, alphabet):
    """JSONSchemaBench's patterns with an anchor inside an alternation (11 files refused before: `^01$|^07$`, which
    `re` writes as ^0 then (1$|7$); `($|\\/)` inside a repetition): a last alternation whose alternatives hold
    anchors is split after what comes before it, and an alternative that still holds one is left out. Every string
    of up to 6 characters of a small alphabet that the written body takes is one the pattern matches (Python's re),
    and the body takes some."""
    import itertools

    body = re.compile(pattern_body(pattern, 1024, 64))
    taken = [t for n in range(7) for t in map("".join, itertools.product(alphabet, repeat=n)) if body.fullmatch(
        json.dumps(t)[1:-1])]
    assert taken and all(re.search(pattern, t) for t in taken), [t for t in taken if not re.search(pattern, t)]
