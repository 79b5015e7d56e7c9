"""Hostile and heavy schemas: the schema is written inside the bounded compile child, which dies with its parent;
huge bounds and deep chains are refused; the constraint cache is bounded in bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import dgemma.control.constraint as constraint_module
from dgemma.control import CompileLimits, Constraint, ConstraintError, ConstraintVocabulary
from dgemma.control.vocabulary import ConstraintCache

from .test_control import tokenizer, vocab  # noqa: F401  (fixtures)


def test_the_schema_is_written_in_the_child_not_here(vocab, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the server process wrote the schema's regex")
    monkeypatch.setattr(constraint_module, "schema_to_regex", fail)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 12}},
              "required": ["n"]}
    constraint = Constraint.from_json_schema(schema, vocab)
    assert constraint.num_states > 1


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "minLength": 2**64}, "'minLength'"),
    ({"type": "array", "minItems": 10**30}, "'minItems'"),
    ({"$defs": {**{f"D{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/D{i + 1}"}}, "required": ["x"]}
                   for i in range(500)}, "D500": {"type": "integer"}}, "$ref": "#/$defs/D0"}, "nests deeper"),
])
def test_hostile_schemas_are_refused_by_name(schema, words, vocab):
    with pytest.raises(ConstraintError, match=words.replace("$", r"\$")):
        Constraint.from_json_schema(schema, vocab)


def test_a_huge_object_stays_within_the_compile_limits(vocab):
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    start = time.monotonic()
    try:
        Constraint.from_json_schema(schema, vocab, limits=CompileLimits(timeout_s=3))
    except ConstraintError as err:
        assert "limit" in str(err)
    assert time.monotonic() - start < 3 + 2  # the limit, plus the child's start and the reply


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_the_compile_child_dies_with_its_parent(tmp_path):
    script = textwrap.dedent("""
        from dgemma.control import CompileLimits, Constraint, ConstraintVocabulary
        vocab = ConstraintVocabulary(tuple(bytes([b]) for b in range(256)), (0,))
        Constraint.from_regex("(a|b)*a(a|b){22}", vocab, limits=CompileLimits(timeout_s=600, max_states=10**9))
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        child = _first_child(parent)
        time.sleep(0.5)  # let it set its parent-death signal
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    for _ in range(100):
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the compile child outlived its parent")


def _first_child(parent: subprocess.Popen) -> int:
    for _ in range(1200):  # importing torch can take a while on a loaded machine
        assert parent.poll() is None, "the compiling process ended early"
        with open(f"/proc/{parent.pid}/task/{parent.pid}/children") as f:
            pids = f.read().split()
        if pids:
            return int(pids[0])
        time.sleep(0.05)
    raise AssertionError("the compile child never started")


def test_the_constraint_cache_is_a_bounded_lru(vocab):
    built = [Constraint.from_regex(p, vocab) for p in ("a+", "b+", "c+")]
    size = built[0].nbytes
    assert built[0].token_class.dtype.itemsize == 4 and size > 0
    cache = ConstraintCache(max_bytes=2 * size + size // 2)
    cache["a"], cache["b"] = built[0], built[1]
    assert cache.get("a") is built[0]  # a is now the most recent
    cache["c"] = built[2]
    assert "b" not in cache and cache.get("a") is built[0] and cache.get("c") is built[2]
    assert cache.nbytes == built[0].nbytes + built[2].nbytes and len(cache) == 2
    small = ConstraintVocabulary(vocab.token_bytes, vocab.eos_token_ids, vocab.pad_token_ids,
                                 cache=ConstraintCache(max_bytes=1))
    first = Constraint.from_regex("a+", small)
    Constraint.from_regex("b+", small)
    assert len(small.cache) == 1 and Constraint.from_regex("a+", small) is not first  # evicted, compiled again


def test_a_schema_past_the_state_limit_is_written_again_with_half_the_caps(vocab):
    """Caps multiply where arrays and strings nest (Snowplow sp_202: 187,876 states). Past max_states, or past
    max_table_mb, the compile child writes the schema again with half the length and item caps, shorter strings
    and arrays that are still valid, at most twice; then the limit's 400 stands."""
    import json

    import jsonschema

    from dgemma.control.dp import best_valid_tokens

    from .test_control import random_log_probs, text_of

    schema = {"type": "array", "maxItems": 100, "items": {"type": "string", "maxLength": 100}}
    assert Constraint.from_json_schema(schema, vocab).num_states > 10_000  # caps 64 and 16
    narrower = Constraint.from_json_schema(schema, vocab, limits=CompileLimits(max_states=5_000))  # 32 and 8
    assert 1_000 < narrower.num_states <= 5_001
    for seed in range(4):
        tokens = best_valid_tokens(random_log_probs(seed, 320, narrower.vocab_size), narrower, tokens_after=0).tokens
        value = json.loads(text_of(vocab, tokens))
        jsonschema.validate(value, schema)
        assert len(value) <= 8 and all(len(item) <= 32 for item in value)
    with pytest.raises(ConstraintError, match="needs 662 automaton states, more than the limit of 500"):
        Constraint.from_json_schema(schema, vocab, limits=CompileLimits(max_states=500))  # 16 and 4 still pass it
    # the same for a token table past its limit: 10,323 states x 43 classes (1.7 MiB) at caps 64 and 16
    smaller = Constraint.from_json_schema(schema, vocab, limits=CompileLimits(max_table_mb=1))
    assert smaller.num_states == narrower.num_states and smaller.transitions.nbytes < 2**20


def test_what_is_kept_with_a_constraint_counts_in_the_cache(vocab):
    """The DP's layout and a thought's automaton live as long as their constraint (kept.py): the cache counts them
    as they are made, evicts the least recently used to stay within its bound, and forgets what it dropped."""
    from dgemma.control.moves import moves_of
    from dgemma.control.thought import after_thought

    mine = ConstraintVocabulary(vocab.token_bytes, vocab.eos_token_ids, vocab.pad_token_ids,
                                cache=ConstraintCache(max_bytes=2**30))
    answer = Constraint.from_regex("[ab]{1,9}", mine)
    tables = answer.nbytes
    assert mine.cache.nbytes == tables and answer.kept_bytes == 0
    moves = moves_of(answer)
    assert moves.nbytes > 0 and answer.nbytes == tables + moves.nbytes == mine.cache.nbytes
    assert all(classes.base is None for classes in moves.set_classes)  # no view holds the edges' arrays alive
    thought = after_thought(answer, 0, 2)  # two ids that spell no text stand for the channel markers
    own = thought.nbytes
    moves_of(thought)  # grows the thought's automaton, and so its answer, and so the cache
    assert thought.nbytes > own and answer.nbytes == tables + moves.nbytes + thought.nbytes == mine.cache.nbytes
    answer.forget("moves")
    assert answer.nbytes == tables + thought.nbytes == mine.cache.nbytes

    first, second = (Constraint.from_regex(p, mine) for p in ("c{1,5}", "d{1,5}"))
    cache = ConstraintCache(max_bytes=first.nbytes + second.nbytes + 1024)
    cache["first"], cache["second"] = first, second
    moves_of(second)  # now past the bound: the older entry goes, the one that grew stays
    assert "first" not in cache and cache.get("second") is second and cache.nbytes == second.nbytes
    moves_of(first)  # an evicted constraint's growth is no longer this cache's
    assert cache.nbytes == second.nbytes
