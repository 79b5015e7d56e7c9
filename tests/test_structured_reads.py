"""vLLM's read-only structured reads (diffusion_read_only), written as a vLLM client sends them: a seeded, pinned
canvas read for diffusion_max_steps steps comes back whole, with the log-probabilities at every canvas position,
and those are the decoder's own over the seeded canvas. Served live by a tiny checkpoint, the official openai
client."""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from dgemma.engine import Engine
from dgemma.server import ServerThread, Serving, build_app
from dgemma.step import Sampler
from dgemma.testing import openai_client

from .test_server import KEY, runtime  # noqa: F401 (runtime: the tiny checkpoint, a module fixture)

MODEL = "tiny-reads"

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def engine(runtime):
    ckpt, tokenizer = runtime
    e = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=4, max_model_len=256, sampler=Sampler.EXACT)
    yield e.start()
    e.stop()


@pytest.fixture(scope="module")
def server(engine, runtime):
    srv = ServerThread(build_app(Serving(engine, runtime[1], MODEL), api_key=KEY)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, api_key=KEY)


PROMPT = [5, 6, 7, 8]


def seeded(C: int) -> tuple[list[int], list[int]]:
    """A template canvas (fixed text, two slots left as noise) and its pins: every position but the slots."""
    canvas = [(17 * i + 5) % 200 + 10 for i in range(C)]
    slots = {3, C // 2}
    return canvas, [p for p in range(C) if p not in slots]


def decoder_logprobs(engine, canvas: list[int], eos_until: int) -> torch.Tensor:
    """log_softmax of the decoder's logits over `canvas` after PROMPT, no self-conditioning (a first step), EOS
    banned at the positions before `eos_until` (an output reaches its last pin): (C, V)."""
    model = engine.model
    with torch.inference_mode():
        cache = model.new_cache(1, 256)
        model.encode(torch.tensor([PROMPT]), cache, rows=[0])
        logits = model.logits(model.decode(torch.tensor([canvas]), None, model.plan(cache, [0], len(canvas), False)))
    logits = logits[0].float().clone()
    for e in engine.generation.eos_token_id:
        logits[:eos_until, e] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def test_a_read_only_structured_read_as_a_vllm_client_sends_it(client, engine):
    """Seed canvas of the canvas length, pins, read_only, one step, max_tokens below the canvas, logprobs 20 and
    tokens as ids (vLLM's clients read them so): one row per canvas position, the pins as seeded, the slots the
    model's argmax, every row the decoder's log-probabilities at temperature 1."""
    C = engine.canvas_length
    canvas, pins = seeded(C)
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=C // 2, logprobs=20, temperature=0.7,
        extra_body={"return_tokens_as_token_ids": True,
                    "vllm_xargs": {"diffusion_seed_canvas": canvas, "diffusion_pinned": pins,
                                   "diffusion_canvas_length": C, "diffusion_max_steps": 1,
                                   "diffusion_read_only": True}})
    choice = r.choices[0]
    ids, lp = choice.model_extra["token_ids"], choice.logprobs
    assert len(ids) == len(lp.top_logprobs) == len(lp.token_logprobs) == C
    assert r.usage.model_extra["denoising_steps"] == 1 and r.usage.completion_tokens == C
    assert [ids[p] for p in pins] == [canvas[p] for p in pins]
    want = decoder_logprobs(engine, canvas, eos_until=max(pins))
    for pos, (token, token_lp, top) in enumerate(zip(ids, lp.token_logprobs, lp.top_logprobs)):
        rows = {int(k.split(":")[1]): v for k, v in top.items()}
        best = torch.topk(want[pos], 20)
        assert list(rows) == best.indices.tolist()
        assert list(rows.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
        assert sum(math.exp(v) for v in rows.values()) <= 1 + 1e-5
        assert token_lp == pytest.approx(max(want[pos, token].item(), -9999.0), abs=1e-4)
        if pos not in pins:
            assert token == best.indices[0].item()  # a slot reads the model's argmax


def test_a_read_defaults_to_one_step_and_twenty_alternatives_and_streams(client, engine, server):
    """Without diffusion_max_steps and logprobs a read is one step with 20 alternatives per position; streamed, it
    is one chunk of the whole canvas; a chat read returns a content entry per canvas position."""
    C = engine.canvas_length
    canvas, pins = seeded(C)
    xargs = {"diffusion_seed_canvas": canvas, "diffusion_pinned": pins, "diffusion_read_only": True}
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"vllm_xargs": xargs})
    assert r.usage.model_extra["denoising_steps"] == 1
    assert len(r.choices[0].logprobs.token_logprobs) == C and r.choices[0].finish_reason == "length"
    chunks = [c for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True,
                                                   extra_body={"vllm_xargs": xargs}) if c.choices]
    assert [len(c.choices[0].model_extra["token_ids"]) for c in chunks] == [C]
    assert chunks[0].choices[0].logprobs.token_logprobs == r.choices[0].logprobs.token_logprobs
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=5, extra_body={"vllm_xargs": xargs})
    assert len(chat.choices[0].logprobs.content) == C
    assert all(len(item.top_logprobs) == 5 for item in chat.choices[0].logprobs.content)


def test_vllms_refusals_hold_for_reads(server, engine):
    C = engine.canvas_length
    for xargs, param in [({"diffusion_read_only": True, "diffusion_pinned": [0]}, "diffusion_pinned"),
                         ({"diffusion_read_only": True, "diffusion_seed_canvas": [5] * (C - 1)},
                          "diffusion_seed_canvas")]:
        r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "vllm_xargs": xargs})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_pins_and_seed_are_bounded_by_the_outputs_canvases_not_max_tokens():
    """Steering.check: with max_tokens below the canvas, pins and a seed across the whole canvas are taken (they
    steer it); past the canvases the output spans they are refused, naming their field."""
    from dgemma.control.pins import Steering, SteeringError

    C = 16
    Steering(pinned={C - 1: 5}, seed_tokens=[5] * C, strength=0.0).check(256, max_new=4, span=C)
    for steering, param in [(Steering(pinned={C: 5}), "pinned"), (Steering(seed_tokens=[5] * (C + 1)), "seed_tokens")]:
        with pytest.raises(SteeringError) as e:
            steering.check(256, max_new=4, span=C)
        assert e.value.param == param
    with pytest.raises(SteeringError):  # without the span, max_tokens bounds them (the offline checks)
        Steering(pinned={C - 1: 5}).check(256, max_new=4)
