"""Every request field is honoured or refused: unknown fields and OpenAI's fields dgemma does not apply (at a value
that would change something) are 400s naming them; top_p/top_k reach SamplingParams; n choices (each the single
request of its seed, streamed with their indices, aborted together); vLLM's structured-read fields as a vLLM client
sends them. Served live, with the exact sampler, by a tiny random checkpoint and the official openai client."""

from __future__ import annotations

import time

import httpx
import pytest

from dgemma.engine import Engine
from dgemma.engine.request import SamplingParams
from dgemma.inputs import InputProcessor
from dgemma.inputs.http import chat_input, choice_params, completion_input, ServingOptions
from dgemma.server import ServerThread, Serving, build_app
from dgemma.server.protocol import NEUTRAL, ChatCompletionRequest, CompletionRequest
from dgemma.step import Sampler
from dgemma.testing import openai_client

from .test_server import KEY, hang_up_after_first_chunk, metric, runtime  # noqa: F401 (runtime: the tiny checkpoint, a module fixture)

MODEL = "tiny-fields"

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def engine(runtime):
    ckpt, tokenizer = runtime
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=8, max_model_len=256, max_waiting=32,
                    sampler=Sampler.EXACT).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def server(engine, runtime):
    srv = ServerThread(build_app(Serving(engine, runtime[1], MODEL), api_key=KEY)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, api_key=KEY)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
COMPLETION = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 8}
REFUSED = [  # (endpoint body, field, value): each a 400 whose param names the field
    (CHAT, "frobnicate", 1), (COMPLETION, "frobnicate", 1), (CHAT, "frequency_penalty", 0.5),
    (CHAT, "presence_penalty", -1.0), (COMPLETION, "logit_bias", {"5": 10}), (CHAT, "logprobs", 1),
    (CHAT, "top_logprobs", 2), (CHAT, "top_logprobs", 21), (COMPLETION, "logprobs", 21), (COMPLETION, "logprobs", True),
    (COMPLETION, "top_logprobs", 2), (COMPLETION, "echo", True),
    (COMPLETION, "best_of", 2), (CHAT, "audio", {"voice": "alloy", "format": "wav"}), (CHAT, "modalities", ["audio"]),
    (CHAT, "reasoning_effort", "high"), (CHAT, "verbosity", "low"), (CHAT, "web_search_options", {}),
    (CHAT, "functions", [{"name": "f"}]), (CHAT, "function_call", "auto"), (CHAT, "store", True),
    (CHAT, "metadata", {"a": "b"}), (CHAT, "service_tier", "flex"), (CHAT, "prompt_cache_key", "k"),
    (CHAT, "n", 9), (CHAT, "n", 0), (CHAT, "top_p", 0), (CHAT, "top_p", 1.5), (CHAT, "top_k", -2),
    (COMPLETION, "echo", 1), (CHAT, "stream_options", {"include_usage": True, "other": 1}),
    (CHAT, "vllm_xargs", {"diffusion_unknown": 1}),
]
ACCEPTED = [  # neutral values: no-ops, answered 200
    (CHAT, "frequency_penalty", 0), (CHAT, "presence_penalty", 0.0), (CHAT, "logit_bias", {}),
    (CHAT, "logprobs", False), (CHAT, "top_logprobs", 0), (CHAT, "user", "end-user-7"),
    (CHAT, "safety_identifier", "x"), (CHAT, "service_tier", "auto"), (CHAT, "store", False),
    (CHAT, "modalities", ["text"]), (COMPLETION, "echo", False), (COMPLETION, "best_of", 1),
    (COMPLETION, "top_p", 1.0), (COMPLETION, "top_k", -1), (COMPLETION, "top_k", 0),
    (CHAT, "diffusion_read_only", False), (CHAT, "vllm_xargs", {}),
]


@pytest.mark.parametrize("base,field,value", REFUSED, ids=[f"{f}={v!r}" for _, f, v in REFUSED])
def test_a_field_not_honoured_is_a_400_naming_it(server, base, field, value):
    path = "/v1/chat/completions" if "messages" in base else "/v1/completions"
    r = post(server, path, dict(base, **{field: value}))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] is not None and error["param"].split(".")[0] == field, error
    assert field in error["message"], error


@pytest.mark.parametrize("base,field,value", ACCEPTED, ids=[f"{f}={v!r}" for _, f, v in ACCEPTED])
def test_a_neutral_value_changes_nothing(server, base, field, value):
    path = "/v1/chat/completions" if "messages" in base else "/v1/completions"
    plain = post(server, path, dict(base, seed=3))
    given = post(server, path, dict(base, seed=3, **{field: value}))
    assert plain.status_code == given.status_code == 200, given.text
    assert [c.get("text", c.get("message")) for c in given.json()["choices"]] == \
        [c.get("text", c.get("message")) for c in plain.json()["choices"]]


def test_every_neutral_field_is_declared_on_an_endpoint():
    declared = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)
    assert set(NEUTRAL) <= declared


# -- top_p, top_k ------------------------------------------------------------------------------------------------
def processor(runtime) -> InputProcessor:
    ckpt, tokenizer = runtime
    return InputProcessor(tokenizer, ckpt.generation, ckpt.model.config.vocab_size, 256, ckpt.model.canvas_length)


def test_top_p_and_top_k_reach_sampling_params(runtime):
    body = ChatCompletionRequest.model_validate(dict(CHAT, top_p=0.9, top_k=5))
    params = chat_input(processor(runtime), body, ServingOptions()).params
    assert (params.top_p, params.top_k) == (0.9, 5)
    off = completion_input(processor(runtime), CompletionRequest.model_validate(dict(COMPLETION, top_k=-1)),
                           ServingOptions()).params
    assert off.top_k is None and off.top_p is None  # -1 is vLLM's "no cut"


def test_top_k_and_top_p_reach_the_sampler_end_to_end(client, engine):
    """The server's answer is the engine's own for the same cut, and a cut changes the answer of a seed."""
    kw = dict(model=MODEL, prompt=[5, 6, 7], max_tokens=32, seed=3)
    cut = client.completions.create(**kw, top_p=0.5, extra_body={"top_k": 1}).choices[0].model_extra["token_ids"]
    uncut = client.completions.create(**kw).choices[0].model_extra["token_ids"]
    direct = engine.generate([5, 6, 7], SamplingParams(max_tokens=32, seed=3, top_p=0.5, top_k=1), timeout=60)
    assert cut == direct.token_ids
    assert cut != uncut  # a random model at temperature 1 is far from its argmax


# -- n choices ---------------------------------------------------------------------------------------------------
def test_choice_seeds_follow_the_request_seed():
    params = SamplingParams(seed=2**63 - 2)
    assert [p.seed for p in choice_params(params, 3)] == [2**63 - 2, 2**63 - 1, -(2**63)]
    assert [p.seed for p in choice_params(SamplingParams(), 3)] == [None] * 3  # each draws its own


def test_n_choices_are_the_single_requests_of_their_seeds(client):
    many = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=24,
                                          seed=40, n=4)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    singles = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=24, seed=40 + i) for i in range(4)]
    assert [c.message.content for c in many.choices] == [s.choices[0].message.content for s in singles]
    assert [c.finish_reason for c in many.choices] == [s.choices[0].finish_reason for s in singles]
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the shared prompt, counted once
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    texts = {c.message.content for c in many.choices}
    assert len(texts) > 1  # independent generators: a random model does not write one text four times


def test_n_completions_streamed_equal_non_streamed(client):
    kw = dict(model=MODEL, prompt=[5, 6, 7], max_tokens=20, seed=9, n=3)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, reasons, ids = ["", "", ""], [None] * 3, [[], [], []]
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.text
            ids[c.index] += c.model_extra["token_ids"]
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.text for c in full.choices]
    assert ids == [c.model_extra["token_ids"] for c in full.choices]
    assert reasons == [c.finish_reason for c in full.choices]
    usage = chunks[-1].usage
    assert usage.completion_tokens == sum(len(i) for i in ids) == full.usage.completion_tokens
    singles = [client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=20, seed=9 + i) for i in range(3)]
    assert [s.choices[0].text for s in singles] == texts


def test_n_chat_streamed_carries_each_choices_index(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=16, seed=5, n=2)
    full = client.chat.completions.create(**kw)
    texts = ["", ""]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in full.choices]


def test_a_disconnect_aborts_every_choice(server):
    aborted = metric(server, 'dgemma_requests_total{finish_reason="abort"}')
    body = dict(COMPLETION, max_tokens=224, stream=True, seed=1, n=3)
    hang_up_after_first_chunk(server, body)
    for _ in range(100):  # bounded: 10 s
        if metric(server, 'dgemma_requests_total{finish_reason="abort"}') == aborted + 3:
            break
        time.sleep(0.1)
    assert metric(server, 'dgemma_requests_total{finish_reason="abort"}') == aborted + 3
    assert metric(server, "dgemma_requests_running") == 0


# -- vLLM's structured reads -------------------------------------------------------------------------------------
def test_a_structured_read_as_a_vllm_client_sends_it(client, engine):
    """The seed canvas fills the canvas and the pinned positions come back as seeded, through vllm_xargs."""
    C = engine.canvas_length
    canvas = [(17 * i + 5) % 200 + 10 for i in range(C)]
    pinned = [0, 1, 2, 5, C - 1]
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=C, temperature=0.5, seed=0,
                                  extra_body={"vllm_xargs": {"diffusion_seed_canvas": canvas, "diffusion_pinned": pinned,
                                                             "diffusion_max_steps": 3}})
    ids = r.choices[0].model_extra["token_ids"]
    assert len(ids) == C and [ids[p] for p in pinned] == [canvas[p] for p in pinned]
    assert r.usage.model_extra["denoising_steps"] <= 3
    # the same read with the fields at the top level, and with dgemma's own names, is the same request
    top = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=C, temperature=0.5, seed=0,
                                    extra_body={"diffusion_seed_canvas": canvas, "diffusion_pinned": pinned,
                                                "diffusion_max_steps": 3})
    own = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=C, temperature=0.5, seed=0,
                                    extra_body={"seed_tokens": canvas, "strength": 0.0, "max_denoising_steps": 3,
                                                "pinned": {str(p): canvas[p] for p in pinned}})
    assert top.choices[0].model_extra["token_ids"] == ids == own.choices[0].model_extra["token_ids"]


def test_structured_read_refusals_are_vllms(server, engine):
    C, V = engine.canvas_length, engine.vocab_size
    cases = [
        ({"diffusion_seed_canvas": [5] * (C - 1)}, "diffusion_seed_canvas",
         f"diffusion_seed_canvas must hold exactly {C} ids, got {C - 1}."),
        ({"diffusion_pinned": [0, 1]}, "diffusion_pinned", "diffusion_pinned needs a diffusion_seed_canvas to hold."),
        ({"diffusion_seed_canvas": [5] * C, "diffusion_pinned": [C]}, "diffusion_pinned",
         "diffusion_pinned positions must lie inside the canvas."),
        ({"diffusion_seed_canvas": [V] + [5] * (C - 1)}, "diffusion_seed_canvas",
         f"diffusion_seed_canvas ids must be in [0, {V})."),
        ({"diffusion_max_steps": 0}, "diffusion_max_steps", "diffusion_max_steps must be a positive integer."),
        ({"diffusion_read_only": 2}, "diffusion_read_only", "diffusion_read_only must be a boolean (or 0/1)."),
        ({"diffusion_canvas_length": C // 2}, "diffusion_canvas_length", None),
        ({"diffusion_seed_canvas": "x"}, "diffusion_seed_canvas", "diffusion_seed_canvas must be a list of token ids."),
    ]
    for fields, param, message in cases:
        r = post(server, "/v1/completions", dict(COMPLETION, vllm_xargs=fields))
        assert r.status_code == 400, (fields, r.text)
        error = r.json()["error"]
        assert error["param"] == param and (message is None or error["message"] == message), error
    for body, param in [(dict(COMPLETION, seed_tokens=[5], vllm_xargs={"diffusion_seed_canvas": [5] * C}),
                         "diffusion_seed_canvas"),
                        (dict(COMPLETION, diffusion_max_steps=2, vllm_xargs={"diffusion_max_steps": 2}),
                         "diffusion_max_steps"),
                        (dict(COMPLETION, diffusion_seed_canvas=[5] * C, diffusion_pinned=[0], pinned={"3": 5}),
                         "diffusion_pinned")]:
        r = post(server, "/v1/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
