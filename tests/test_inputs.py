"""The input processor and its steering builder (dgemma/inputs, control/steering.py): one builder for every way
in, a Steering that cannot change once built, the EngineClient the server depends on, and the refusals that
belong to no one endpoint."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import httpx
import pytest

from dgemma.cli_common import DEFAULT_MODEL, load_checkpoint
from dgemma.control.pins import Steering, SteeringError
from dgemma.control.steering import ConstraintSpec, SteeringSpec, build_steering
from dgemma.engine import Engine
from dgemma.engine.client import EngineClient
from dgemma.inputs import InputError, InputProcessor
from dgemma.presets import default_generation, preset_config, random_model
from dgemma.testing import write_tiny_checkpoint
from dgemma.text.tokenizer import Tokenizer

C = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("inputs"), canvas_length=C)
    cfg = preset_config("tiny", canvas_length=C, vocab_size=256)
    return Tokenizer.from_dir(model_dir), default_generation(cfg), cfg


def test_a_steering_cannot_change_once_built():
    steering = Steering(pinned={0: 5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        steering.constraint = object()
    with pytest.raises(dataclasses.FrozenInstanceError):
        SteeringSpec(prediction="x").prediction = "y"


def test_build_steering_reads_each_field_once(tiny):
    tok, gen, _ = tiny
    assert build_steering(SteeringSpec(), tok, None, gen) is None
    s = build_steering(SteeringSpec(prediction="<eos> hi", max_tokens=C), tok, None, gen)
    assert s.seed_tokens == tok.encode_plain("<eos> hi") and s.strength == 0.2 and s.seed_from == "prediction"
    s = build_steering(SteeringSpec(template="<eos>{{3}}."), tok, None, gen)
    literal = tok.encode_plain("<eos>")
    assert [s.pinned[i] for i in range(len(literal))] == literal and s.pins_from == "template"
    assert s.pinned[max(s.pinned)] == gen.eos_token_id[0]
    s = build_steering(SteeringSpec(pinned=((3, 7),), seed_tokens=(9, 9), strength=0.5), None, None, None)
    assert s == Steering(pinned={3: 7}, seed_tokens=[9, 9], strength=0.5)


@pytest.mark.parametrize("spec, param", [
    (SteeringSpec(prediction="a", seed_tokens=(1,)), "prediction"),
    (SteeringSpec(template="a{{2}}", pinned=((0, 1),)), "template"),
    (SteeringSpec(strength=0.5), "strength"),
    (SteeringSpec(template="no holes"), "template"),
    (SteeringSpec(prediction="x" * 10_000), "prediction"),
    (SteeringSpec(constraint=ConstraintSpec("regex", "(x", "structured_outputs")), "structured_outputs")])
def test_build_steering_refusals_name_the_field(tiny, spec, param):
    tok, gen, cfg = tiny
    processor = InputProcessor(tok, gen, cfg.text.vocab_size, max_model_len=64)
    with pytest.raises(InputError) as e:
        processor.steering(dataclasses.replace(spec, max_tokens=C))
    assert e.value.param == param


def test_a_text_field_without_a_tokenizer_is_refused(tiny):
    _, gen, _ = tiny
    for spec, param in ((SteeringSpec(prediction="a"), "prediction"), (SteeringSpec(suffix="a"), "suffix"),
                        (SteeringSpec(template="a{{1}}"), "template")):
        with pytest.raises(SteeringError) as e:
            build_steering(spec, None, None, gen)
        assert e.value.param == param and "no tokenizer" in str(e.value)


def test_the_engine_and_the_scripted_engine_are_engine_clients(tiny):
    from tests.test_server import ScriptedEngine

    _, gen, cfg = tiny
    engine = Engine(random_model(cfg, seed=0), gen, None, max_num_seqs=1, max_model_len=64)
    assert isinstance(engine, EngineClient) and engine.vocab_size == cfg.text.vocab_size
    assert isinstance(ScriptedEngine([]), EngineClient)


def test_chat_on_the_embedded_sudoku_model_points_to_completions():
    """`dgemma chat` refuses the Sudoku solver; the server answered chats with 82 digits. Now a 400."""
    from dgemma.server import ServerThread, Serving, build_app

    ckpt = load_checkpoint(DEFAULT_MODEL, quiet=True)
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=1)  # not started: nothing may run
    srv = ServerThread(build_app(Serving(engine, tokenizer, "sudoku"))).start()
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"model": "sudoku", "messages": [{"role": "user", "content": "hello"}]})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "messages" and "/v1/completions" in error["message"]
    finally:
        srv.stop()


def test_python_m_dgemma_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "dgemma", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: dgemma") and "generate" in proc.stdout


def test_dgemma_chat_refuses_the_sudoku_model_named_by_path(capsys):
    """Without --model the CLI knew the default was no chat model; named by its path it used to chat in <unk>s."""
    from dgemma.cli import main

    assert main(["chat", "--model", str(DEFAULT_MODEL), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot chat" in err and err.count("\n") == 1
