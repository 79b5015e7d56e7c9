"""A `format` beside a `pattern` or length bounds: the writer takes the first narrow form of the format
(strings.FORMATS) whose every string has an allowed length and is one the pattern matches, checked by walking the
form's DFA against the DFA of the pattern's search (byte_dfa.texts_within); jsonschema, format checking on, judges
what is written."""

from __future__ import annotations

import itertools
import json
import random
import re

import jsonschema
import pytest

from dgemma.control.byte_dfa import texts_within
from dgemma.control.schema import SchemaError, schema_to_regex
from dgemma.control.schema.strings import pattern_search

from .test_schema_patterns import sample

# (format, pattern) pairs from JSONSchemaBench's schemas (Github, JsonSchemaStore) that a narrow form meets
MET = [("uri", "^https://"), ("uri", "^https?://.+"), ("uri", "^(https?|ftp|file)://"), ("uri", "^mailto:"),
       ("uri", "^(wss?|wss?\\+unix)://"), ("uri", "^https:"), ("uri-reference", "^(https?://|/).+"),
       ("uri", "^(https?://.+|\\$[A-Za-z]+)"), ("uri", "^https?://.*/.+"), ("uri", "(https?|s?ftp)://.+"),
       ("date", "^([0-9]{4})(-([0-9]{2}))?(-([0-9]{2}))?$"), ("date", "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"),
       ("date-time", "\\d\\d\\d\\d-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\dZ"), ("date-time", ".+(Z|[+\\-]\\d{2}:\\d{2})"),
       ("date-time", ".+T[^Z+\\-]+"), ("email", "^.*?@.*.*$"),
       ("email", "^\\w+([\\.-]?\\w+)*@\\w+([\\.-]?\\w+)*(\\.\\w{2,})+$"),
       ("email", "^[A-Za-z0-9äöüÄÖUß_\\-\\.]+@[A-Za-z0-9äöüÄÖUß_\\-\\.]+\\.[A-Za-z]{2,}$"),
       ("regex", "^/.+/$"),
       # a pattern whose every string is a URI (WIDE_FORMATS) is written as the pattern
       ("uri", "^http://[a-z][a-z0-9-]{3,30}\\.herokuapp\\.com/$"),
       ("uri",
        "^https?:\\/\\/(specif\\.de\\/v1\\.1\\/schema|json\\.schemastore\\.org\\/specif-1\\.1)\\.json$"),
       # ... with its classes cut to the wide form's characters (`.*?` as characters of a path, an unescaped `.` in a
       # host name as a host name's character): Github_hard o64008, and a timespan pattern whose strings are all valid
       # regexes (o21780)
       ("uri", "http://edamontology.org/operation_[0-9]{4}"),
       ("uri", "^https://images-fe\\.ssl-images-amazon\\.com/images/.*?(no-image-no-ciu)?\\.(gif|jpg)$"),
       ("regex", "^((?:-?0*\\d+\\.)?(?:0*)(?:2[0-3]|1[0-9]|[0-9]))(?::0*([0-5]?[0-9]))?(?::0*((?:[0-5]?[0-9])"
                 "(?:\\.\\d{0,7})?))?$")]
# pairs neither meets: a scp-style git address is no URI; every email holding "a"; a regex opening a group it never
# closes
REFUSED = [("email", "a"),
           ("uri", "^git@heroku\\.com:[a-z][a-z0-9-]{3,30}\\.git$"), ("regex", "^a[(]")]


@pytest.mark.parametrize("fmt, pattern", MET)
def test_a_format_beside_a_pattern_writes_strings_valid_for_both(fmt, pattern):
    """Refused before ("unsupported combination of 'format' and 'pattern'"): 21 JSONSchemaBench files held one."""
    schema = {"type": "string", "format": fmt, "pattern": pattern}
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    regex, rng = schema_to_regex(schema), random.Random(0)
    for _ in range(40):
        checker.validate(json.loads(sample(regex, rng, decode=False)))


@pytest.mark.parametrize("fmt, pattern", REFUSED)
def test_a_format_and_pattern_no_narrow_form_meets_is_refused_by_name(fmt, pattern):
    with pytest.raises(SchemaError, match="'format' and 'pattern'"):
        schema_to_regex({"type": "string", "format": fmt, "pattern": pattern})


def test_a_format_shorter_than_minlength_can_be_is_refused_not_written():
    """The shortest hostname written, "a.io", has 4 characters; the table said 5, so minLength 5 wrote it. Form
    lengths are now measured from the forms themselves."""
    with pytest.raises(SchemaError, match="minLength/maxLength"):
        schema_to_regex({"type": "string", "format": "hostname", "minLength": 5})
    assert re.fullmatch(schema_to_regex({"type": "string", "format": "hostname", "minLength": 4}), '"a.io"')


def test_length_bounds_pick_a_shorter_form():
    """A URI of at most 100 characters was refused (the main form reaches 182): the form without a path fits."""
    schema = {"type": "string", "format": "uri", "maxLength": 100}
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    regex, rng = schema_to_regex(schema), random.Random(1)
    for _ in range(40):
        checker.validate(json.loads(sample(regex, rng, decode=False)))


REGEXES = ["a", "b", "ab", "a|b", "a*", "(ab)*", "a?b?", "[ab]{0,3}", "(a|ab)(c|bcd)", "b(a|b)*", "(a|b)*a", "a{2,4}",
           "", "c|ab|ba", "((a|b)(a|b))*"]


@pytest.mark.parametrize("inner, outer", list(itertools.product(REGEXES, REGEXES)))
def test_texts_within_agrees_with_every_short_text(inner, outer):
    """texts_within(inner, outer) is True exactly when no text of up to 6 characters of a, b, c is inner's and not
    outer's (every regex here has such a witness when it is not within)."""
    texts = ["".join(t) for n in range(7) for t in itertools.product("abc", repeat=n)]
    witness = [t for t in texts if re.fullmatch(inner, t) and not re.fullmatch(outer, t)]
    assert texts_within(inner, outer) == (not witness), witness[:3]


@pytest.mark.parametrize("pattern, inside, outside", [("^ab", "abc", "cab"), ("ab$", "cab", "abc"),
                                                      ("ab", "cabc", "acb"), ("^ab$|c", "xcx", "abx"),
                                                      ("^(?:a|b)$", "b", "ab")])
def test_pattern_search_is_where_the_pattern_finds_a_match(pattern, inside, outside):
    search = pattern_search(pattern, 1024, 64)
    assert re.fullmatch(search, inside) and re.search(pattern, inside)
    assert not re.fullmatch(search, outside) and not re.search(pattern, outside)


def test_a_uri_pattern_under_a_length_no_narrow_form_fits_is_written_as_the_pattern():
    """No narrow URI form has at most 8 characters, so this was refused by length before the pattern was tried;
    every string of the pattern is a URI (WIDE_FORMATS), so the pattern is written."""
    schema = {"type": "string", "format": "uri", "pattern": "^http://[a-z]$", "maxLength": 8}
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    regex, rng = schema_to_regex(schema), random.Random(2)
    for _ in range(20):
        checker.validate(json.loads(sample(regex, rng, decode=False)))
    with pytest.raises(SchemaError, match="minLength/maxLength"):  # nor the pattern's strings fit: refused by length
        schema_to_regex({**schema, "pattern": "^http://[a-z]{3}$"})
