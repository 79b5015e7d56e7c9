"""Issue 29, items 4 and 6: compiles are bounded in total and per client, requests for a constraint already
compiling share that compile, and a failed compile is cached, so the same bad schema fails at once the next time.
Deterministic: compiles are held open by events, never timed."""

from __future__ import annotations

import contextvars
import threading

import httpx
import pytest

from dgemma.io import checkpoint
from dgemma.control import Constraint, ConstraintError, ConstraintVocabulary
from dgemma.control.gate import COMPILES, CompileBusy, CompileFailure, CompileGate, compile_client
from dgemma.control.vocabulary import ConstraintCache
from dgemma.server import ServerThread, Serving, build_app
from dgemma.testing import write_test_tokenizer, write_tiny_checkpoint
from dgemma.text.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")  # its module fixtures run a model

MODEL = "tiny-gate"
BAD = {"type": "object", "properties": {"a": {"not": {"pattern": "xy"}}}, "required": ["a"]}  # a refused form of not


class Held:
    """A compile held open on a thread until released: the gate sees it running."""

    def __init__(self, gate: CompileGate, key, cache, client: str | None, result="built"):
        self.release, self.started = threading.Event(), threading.Event()
        self.result = None

        def build():
            self.started.set()
            self.release.wait(60)
            return result

        def run():
            compile_client.set(client)
            self.result = gate.compiled(key, cache, build, "test")

        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(run,))
        self.thread.start()
        assert self.started.wait(60)

    def finish(self):
        self.release.set()
        self.thread.join(60)
        return self.result


def _in_context(client, fn):
    ctx = contextvars.copy_context()
    ctx.run(compile_client.set, client)
    return ctx.run(fn)


def test_the_total_and_per_client_bounds():
    gate, cache = CompileGate(max_total=2, max_per_client=1, wait_s=0), ConstraintCache()
    first = Held(gate, "k1", cache, "alice")
    with pytest.raises(CompileBusy, match="this client has 1 constraint compiles running"):
        _in_context("alice", lambda: gate.compiled("k2", cache, lambda: "x", "test"))
    second = Held(gate, "k3", cache, "bob")  # another client still gets a slot
    with pytest.raises(CompileBusy, match="the server has 2 constraint compiles running"):
        _in_context("carol", lambda: gate.compiled("k4", cache, lambda: "x", "test"))
    assert gate.running == 2 and first.finish() == "built" and second.finish() == "built"
    assert gate.running == 0 and gate.compiles == 2
    assert _in_context("alice", lambda: gate.compiled("k2", cache, lambda: "y", "test")) == "y"  # slots are free


def test_a_compile_already_running_is_shared_not_repeated():
    gate, cache = CompileGate(max_total=1, max_per_client=1, wait_s=0), ConstraintCache()
    held = Held(gate, "k", cache, "alice")
    results = []
    waiter = threading.Thread(target=lambda: results.append(
        _in_context("bob", lambda: gate.compiled("k", cache, lambda: "again", "test"))))
    waiter.start()  # no slot is free, yet it is not refused: it waits for the running compile of its key
    held.finish()
    waiter.join(60)
    assert results == ["built"] and gate.compiles == 1 and cache.get("k") == "built"


def test_a_slot_freed_in_time_is_taken():
    gate, cache = CompileGate(max_total=1, max_per_client=1, wait_s=60), ConstraintCache()
    held = Held(gate, "k1", cache, "alice")
    results = []
    waiter = threading.Thread(target=lambda: results.append(
        _in_context("bob", lambda: gate.compiled("k2", cache, lambda: "second", "test"))))
    waiter.start()
    held.finish()
    waiter.join(60)
    assert results == ["second"] and gate.compiles == 2


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    tok = Tokenizer.from_dir(write_test_tokenizer(tmp_path_factory.mktemp("tok")))
    return ConstraintVocabulary.from_tokenizer(tok.backend, [1], [0], vocab_size=256)


def test_a_failed_compile_is_cached(vocab):
    before = COMPILES.compiles
    with pytest.raises(ConstraintError) as first:
        Constraint.from_json_schema(BAD, vocab)
    with pytest.raises(ConstraintError) as second:
        Constraint.from_json_schema(BAD, vocab)
    assert str(first.value) == str(second.value) and "'not'" in str(first.value)
    assert COMPILES.compiles == before + 1  # the second did not compile
    assert any(isinstance(v, CompileFailure) for v in vocab.cache.values())


@pytest.fixture
def one_slot():
    """The process's gate with one slot and no wait, restored after the test."""
    saved = COMPILES.max_total, COMPILES.max_per_client, COMPILES.wait_s
    COMPILES.configure(1, 1, 0)
    yield COMPILES
    COMPILES.configure(*saved)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from dgemma.engine import Engine

    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("gate"), canvas_length=16, max_denoising_steps=2)
    ckpt = checkpoint.load(model_dir, quiet=True)
    tokenizer = Tokenizer.from_dir(model_dir)
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=2, max_model_len=512).start()
    srv = ServerThread(build_app(Serving(engine, tokenizer, MODEL))).start()
    yield srv
    srv.stop()
    engine.stop()


def _post(server, schema):
    return httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "a", "max_tokens": 32, "seed": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})


def test_the_server_answers_429_when_no_compile_can_start(server, one_slot):
    schema = {"type": "object", "properties": {"gate": {"type": "boolean"}}, "required": ["gate"]}
    held = Held(one_slot, "someone else's compile", ConstraintCache(), "10.0.0.9")
    try:
        r = _post(server, schema)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        error = r.json()["error"]
        assert error["code"] == "compile_busy" and "constraint compiles running" in error["message"]
    finally:
        held.finish()
    assert _post(server, schema).status_code == 200  # the slot is free again


def test_the_server_fails_the_same_bad_schema_fast(server):
    before = COMPILES.compiles
    answers = [_post(server, BAD) for _ in range(2)]
    assert [r.status_code for r in answers] == [400, 400]
    assert answers[0].json() == answers[1].json() and "'not'" in answers[0].json()["error"]["message"]
    assert COMPILES.compiles == before + 1
