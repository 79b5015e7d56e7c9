"""Byte DFAs (dgemma.control.byte_dfa, dgemma.control.dfa): minimizing keeps the language and is minimal, checked
against a plain reference over many regexes (hand-picked, written by the schema writer, and drawn by hypothesis)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dgemma.control import _compile_worker as worker
from dgemma.control import byte_dfa as bd
from dgemma.control.dfa import minimize
from dgemma.control.regex_factor import factor_suffixes
from dgemma.control.schema import schema_to_regex

SCHEMAS = [
    {"type": "object"},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer",
     "minimum": 0, "maximum": 130}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
     "required": ["name"]},
    {"type": "string", "format": "date-time"},
    {"anyOf": [{"type": "number", "minimum": -2.5, "maximum": 10}, {"type": "null"}, {"type": "boolean"}]},
    {"type": "object", "properties": {f"k{i}": {"type": "string", "maxLength": 3} for i in range(6)}},
]
CHAINY = {"type": "object", "properties": {
    "a": {"type": "string", "maxLength": 20},
    "b": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    "c": {"type": "string", "format": "uri"}, "d": {"type": ["string", "null"], "maxLength": 9},
    "e": {"type": "string", "pattern": "^[a-z]{2,8}$"}}, "required": ["a"]}
REGEXES = [r"(a|b)*a(a|b)", r"[0-9]{2,5}(\.[0-9]+)?", r"(ab|abc|b)*c?", r"é[^a-z]{1,3}", r"x", r"(a{3})*",
           *(schema_to_regex(s) for s in SCHEMAS)]


def reference_classes(table: np.ndarray, finals: list[int]) -> int:
    """The number of Myhill-Nerode classes of the DFA's states (dead kept apart), by plain Moore over tuples."""
    num_states = table.shape[0]
    part = [1 if s in set(finals) else 0 for s in range(num_states)] + [2]
    nxt = [[num_states if t < 0 else int(t) for t in row] for row in table] + [[num_states] * table.shape[1]]
    while True:
        keys = [(part[s], tuple(part[t] for t in nxt[s])) for s in range(num_states + 1)]
        ids = {k: i for i, k in enumerate(sorted(set(keys)))}
        refined = [ids[k] for k in keys]
        if len(ids) == len(set(part)):
            return len(ids) - 1
        part = refined


def _product(a: tuple, b: tuple):
    """The pairs of states two DFAs (table, initial, finals) reach on the same bytes (-1: dead), from their initial
    states; a pair of dead states is not followed."""
    (ta, ia, _), (tb, ib, _) = a, b
    seen, todo = {(ia, ib)}, [(ia, ib)]
    while todo:
        x, y = todo.pop()
        yield x, y
        for byte in range(256):
            pair = (int(ta[x, byte]) if x >= 0 else -1, int(tb[y, byte]) if y >= 0 else -1)
            if pair != (-1, -1) and pair not in seen:
                seen.add(pair)
                todo.append(pair)


def same_language(a: tuple, b: tuple) -> bool:
    """Two DFAs accept the same bytes: no reachable pair disagrees on finality."""
    fa, fb = set(a[2]), set(b[2])
    return all((x >= 0 and x in fa) == (y >= 0 and y in fb) for x, y in _product(a, b))


def check_minimize(regex: str) -> None:
    dfa = bd.byte_dfa(regex)
    small = minimize(*dfa)
    assert small[0].shape[0] == reference_classes(dfa[0], dfa[2])
    assert same_language(dfa, small)


@pytest.mark.parametrize("regex", REGEXES)
def test_minimize_keeps_the_language_and_is_minimal(regex):
    check_minimize(regex)


ATOMS = st.sampled_from(["a", "b", "ab", "[a-c]", "[^a]", "é", r"\.", "[0-9]", "(a|bc)"])


def _regexes():
    def extend(inner):
        return st.one_of(
            st.tuples(inner, inner).map(lambda p: p[0] + p[1]),
            st.tuples(inner, inner).map(lambda p: f"({p[0]}|{p[1]})"),
            st.tuples(inner, st.integers(0, 3), st.integers(0, 3)).map(
                lambda p: f"({p[0]}){{{min(p[1], p[2])},{max(p[1], p[2])}}}"),
            inner.map(lambda r: f"({r})*"), inner.map(lambda r: f"({r})?"))
    return st.recursive(ATOMS, extend, max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(_regexes())
def test_minimize_on_drawn_regexes(regex):
    check_minimize(regex)


# ---- the framed build (a NUL before, an end marker after, suffixes factored): the regex's own language

ODD = [r"a|b", r"(?i)ab|c", "(?x)a b # a comment (with a parenthesis\n|c", r"[]a]+\)", r"[^]a]{1,3}", r"\(a\)",
       r"[a-z&&[^b]]x", r"([a-c]|\[)*", r"\x00a|\x00\x00", r"[\x00-\x02]{0,3}b", r"a|ab", r"([0-9]|10)"]
ALPHABET = ["a", "b", "c", "é", ".", "0", "1", "\\"]


def accepts(dfa: tuple, text: bytes) -> bool:
    table, state, finals = dfa
    for byte in text:
        state = int(table[state, byte])
        if state < 0:
            return False
    return state in set(finals)


def includes(big: tuple, small: tuple) -> bool:
    """Every text `small` accepts, `big` accepts."""
    fb, fs = set(big[2]), set(small[2])
    return all(x >= 0 and x in fb for x, y in _product(big, small) if y >= 0 and y in fs)


def texts_up_to(length: int):
    for n in range(length + 1):
        yield from ("".join(p) for p in itertools.product(ALPHABET, repeat=n))


def sample_texts(dfa: tuple, count: int, seed: int = 0) -> list[bytes]:
    """Random texts the DFA accepts: random bytes that keep a final state in reach, then, past 60 bytes, the
    shortest way to one."""
    table, initial, finals = dfa
    dist = np.full(len(table), -1)
    dist[finals] = 0
    for d in range(1, len(table) + 1):
        step = (dist < 0) & ((table >= 0) & (dist[np.maximum(table, 0)] == d - 1)).any(axis=1)
        if not step.any():
            break
        dist[step] = d
    rng, out = np.random.default_rng(seed), []
    for _ in range(count):
        state, text = initial, bytearray()
        while not (state in finals and (rng.random() < 0.3 or len(text) > 60)):
            nxt = np.maximum(table[state], 0)
            ok = (table[state] >= 0) & (dist[nxt] >= 0)
            if len(text) > 60:
                ok &= dist[nxt] < dist[state]
            if not ok.any():
                break  # a final state that allows nothing more
            byte = int(rng.choice(np.flatnonzero(ok)))
            text.append(byte)
            state = int(table[state, byte])
        out.append(bytes(text))
    return out


@pytest.mark.parametrize("regex", REGEXES + ODD + [schema_to_regex(CHAINY)])
def test_framed_build_accepts_the_texts_of_the_regex(regex):
    plain = bd._outlines_dfa(regex)
    ours = bd.byte_dfa(regex)
    assert includes(ours, plain)  # all that outlines accepted, and what its leftmost-first rule cut short
    if bd._balanced(regex) and bd._framed(factor_suffixes(regex), True) is not None:  # Python's syntax
        for text in sample_texts(ours, 30):
            assert re.fullmatch(regex, text.decode("utf-8"), re.DOTALL), text


def test_framed_build_fills_the_leftmost_first_gap():
    for regex, text in [(r"a|ab", "ab"), (r"([0-9]|10)", "10"), (r"(a|b)*a(a|b)", "abaa")]:
        assert not accepts(bd._outlines_dfa(regex), text.encode())
        assert accepts(bd.byte_dfa(regex), text.encode())


@settings(max_examples=40, deadline=None)
@given(_regexes())
def test_framed_build_is_the_regex_language(regex):
    ours = bd.byte_dfa(regex)
    exact = bd._framed(factor_suffixes(regex), True) is not None
    for text in texts_up_to(3):
        matches = bool(re.fullmatch(regex, text))
        assert accepts(ours, text.encode()) == matches if exact else (not accepts(ours, text.encode()) or matches)


@settings(max_examples=80, deadline=None)
@given(_regexes())
def test_factor_suffixes_keeps_the_language(regex):
    factored = factor_suffixes(regex)
    for text in texts_up_to(4):
        assert bool(re.fullmatch(regex, text)) == bool(re.fullmatch(factored, text)), (regex, factored, text)


def test_factor_suffixes_writes_each_suffix_once():
    assert factor_suffixes("ax|bx") == "(a|b)x"
    assert factor_suffixes("a(b|c)yz|dyz|e") == "(a(b|c)|d)yz|e"
    assert factor_suffixes("ab|b") == "(a)?b"
    for kept in [r"a|b", r"^a|b", r"(?i)a|a", r"a*?b|b", r"[[:alpha:]]x|x", "a)(b"]:
        assert factor_suffixes(kept) == kept
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string", "maxLength": 4} for i in range(8)}}
    regex = schema_to_regex(schema)
    assert len(factor_suffixes(regex)) < len(regex) / 2  # the openers' tails, once


@pytest.mark.parametrize("regex", [r"a)(b", r"(a", r"a)|(b", r"[a"])
def test_prefixed_build_refuses_what_outlines_refuses(regex):
    with pytest.raises(ValueError, match="invalid regular expression"):
        bd.byte_dfa(regex)


def test_balanced_scan():
    assert bd._balanced(r'"([^"\\\x00-\x1F]|\\["\\/bfnrt]){0,64}"')
    assert bd._balanced(r"[)]\)(a)")
    assert not bd._balanced(r"a)(b")
    assert not bd._balanced(r"(?x)a#)")
    assert not bd._balanced(r"[a-z&&[^b]]")


# ---- the token walk: every (state, token) against walking the token's bytes one at a time

TOKENS = [bytes([b]) for b in range(256)] + [
    b"ab", b"abc", b"ba", b"aa", b"aaa", b"a.", b"\\.", b"12", b"2026-", b"-12-07T", b'{"', b'":', b'",', b'"}',
    b'{"name', b'":"', b"null", b"true", b"\xc3\xa9", b"a\xc3", b"\xa9b", b"\xc3\xa9\xc3", b"  ", b"[0", b"e+",
    b"0.5", b"-0", b"k0", b'"k1":', b"xyz", b"ccc", b"bcbc"]
SPARSE = [None, b"ab", None, b"a", b"\xc3\xa9", b"ba", None] * 3  # no-text ids, and tokens spelled alike
CHAIN_TOKENS = TOKENS + [b"abcdefgh", b"abcdefghijklmnop", b'","', b'", "', b'":"', b'"]', b"\\n", b'\\"', b"\xe2\x82",
                         b"\xac", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"x\xf0\x9f", b"\n", b"a\tb", b"null", b'null,',
                         b"://", b"http", b"https://", b".com", b"/x"]


def check_token_walk(regex: str, tokens: list) -> None:
    table, initial, finals = minimize(*bd.byte_dfa(regex))
    reply = worker.token_automaton(table, initial, finals, tokens)
    classes = reply["token_class"]
    nexts = np.full((reply["num_states"], reply["num_classes"] + 1), -1)  # class K: no text, never allowed
    nexts[reply["state"], reply["class"]] = reply["next"]
    assert len(set(zip(reply["state"].tolist(), reply["class"].tolist()))) == reply["num_entries"]  # each once
    assert (reply["initial"], reply["finals"]) == (initial, finals) and reply["num_states"] == table.shape[0]
    for state in range(table.shape[0]):
        for token_id, text in enumerate(tokens):
            at = state if text else -1
            for byte in text or b"":
                at = int(table[at, byte]) if at >= 0 else -1
            assert nexts[state, classes[token_id]] == at, (state, text)
    # classes are as few as they can be: no two columns alike
    assert len(np.unique(nexts[:, :-1].T, axis=0)) == reply["num_classes"]


@pytest.mark.parametrize("regex", REGEXES)
def test_token_walk_matches_a_byte_by_byte_walk(regex):
    check_token_walk(regex, TOKENS)
    check_token_walk(regex, SPARSE)


@settings(max_examples=40, deadline=None)
@given(_regexes(), st.lists(st.binary(min_size=1, max_size=5).map(lambda b: b.replace(b"\x00", b"a")),
                            min_size=1, max_size=40))
def test_token_walk_on_drawn_regexes_and_tokens(regex, drawn):
    check_token_walk(regex, [bytes([b]) for b in b"abc\xc3\xa90.\\"] + drawn)


# ---- counting chains (dgemma.control.chains) and the walk that derives them



def minimal_table(regex: str) -> np.ndarray:
    return minimize(*bd.byte_dfa(regex))[0]


def check_shift(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """shift_map's promise, checked over all 256 bytes: (*) holds, injective, no cycle, levels count it."""
    from dgemma.control.chains import shift_map
    from dgemma.control.dfa import byte_classes
    byte_class = byte_classes(table)
    first = np.array([int(np.flatnonzero(byte_class == c)[0]) for c in range(byte_class.max() + 1)])
    shift, level = shift_map(table[:, first])
    has = np.flatnonzero(shift >= 0)
    assert len(set(shift[has].tolist())) == len(has)
    for p in has:
        q = int(shift[p])
        for byte in range(256):
            x = int(table[p, byte])
            if x >= 0:
                assert table[q, byte] == (shift[x] if shift[x] >= 0 else x), (p, q, byte)
        at, steps = q, 1
        while shift[at] >= 0:
            at, steps = int(shift[at]), steps + 1
            assert steps <= len(shift)
        assert level[p] == steps
    assert (level[shift < 0] == 0).all()
    return shift, level


@pytest.mark.parametrize("regex", REGEXES + [schema_to_regex(CHAINY)])
def test_shift_map_keeps_its_promise(regex):
    check_shift(minimal_table(regex))


def test_chains_cover_bounded_strings_and_the_walk_stays_exact():
    table = minimal_table(schema_to_regex(CHAINY))
    shift, level = check_shift(table)
    assert (shift >= 0).mean() > 0.5 and level.max() >= 20  # most states are derived, not walked
    check_token_walk(schema_to_regex(CHAINY), CHAIN_TOKENS)


@settings(max_examples=40, deadline=None)
@given(_regexes())
def test_shift_map_on_drawn_regexes(regex):
    check_shift(minimal_table(regex))


# ---- the schema writer's object chain: the tail after the openers is written once, with the same language

@pytest.mark.parametrize("count", [1, 3, 8, 9, 12])
def test_optional_keys_chain_keeps_its_language(count):
    from dgemma.control.schema import containers

    class W:
        ws = "[ ]?"
    items = [f'"k{i}":(1|22)' for i in range(count)]
    sep = "[ ]?,[ ]?"
    # the plain form: each opener followed by every later item (what the writer wrote before)
    plain = "|".join(item + "".join(f"({sep}{o})?" for o in items[i + 1:])
                     for i, item in enumerate(items[:containers.OPENERS]))
    plain = r"\{[ ]?(" + plain + r")?[ ]?\}"
    ours = containers.chain(W(), [(item, False) for item in items], (r"\{", r"\}"))
    assert same_language(minimize(*bd.byte_dfa(plain)), minimize(*bd.byte_dfa(ours)))
    if count > containers.OPENERS:
        assert len(ours) < len(plain)


@pytest.mark.parametrize("needed", ["", "r", "or", "ro", "oro", "oorro", "rrr", "ooo"])
def test_a_chain_writes_its_items_in_order_required_ones_always(needed):
    """Items in the given order (a tool call's sorted keys put optional items before required ones too): every
    subset of the optional items with all the required ones, comma-separated, and nothing else."""
    from dgemma.control.schema import containers

    class W:
        ws = ""
    items = [(f"k{i}", flag == "r") for i, flag in enumerate(needed)]
    regex = re.compile(containers.chain(W(), items, (r"\{", r"\}")))
    for kept in itertools.product([False, True], repeat=len(items)):
        text = "{" + ",".join(name for (name, required), keep in zip(items, kept) if keep or required) + "}"
        assert regex.fullmatch(text), text
        assert not regex.fullmatch(text.replace("{", "{,")) and not regex.fullmatch(text.replace("}", ",}"))
        words = text[1:-1].split(",")
        if len(words) > 1 and words[0]:
            assert not regex.fullmatch("{" + ",".join(words[::-1]) + "}"), words[::-1]
    if "r" in needed:
        assert not regex.fullmatch("{" + ",".join(name for name, required in items if not required) + "}")


# ---- distinct columns of a table given by its set entries, as of the dense table

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7),
                                                               st.integers(0, 2)), max_size=30))
def test_distinct_entry_columns_is_distinct_columns(rows, columns, entries):
    from dgemma.control.dfa import distinct_columns, distinct_entry_columns
    dense = np.full((rows, columns), -1, dtype=np.int64)
    for r, c, v in entries:
        dense[r % rows, c % columns] = v
    row, column = np.nonzero(dense >= 0)
    ours = distinct_entry_columns(row, column, dense[row, column], columns)
    theirs = distinct_columns(dense)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
