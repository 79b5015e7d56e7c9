"""Log-probabilities in the serving engine (step/logprobs.py): what a row records is the model's distribution at
temperature 1, checked against the decoder's own logits; asking for them never changes a token; alternatives are
a distribution's top (their probabilities sum to at most 1) and line up with the output tokens."""

from __future__ import annotations

import math

import pytest
import torch

from dgemma.engine import Engine, SamplingParams
from dgemma.engine.runner import ModelRunner
from dgemma.presets import default_generation, preset_config, random_model
from dgemma.sampling import random_tokens

from .test_server import KEY, runtime  # noqa: F401 (runtime: the tiny checkpoint with a tokenizer, a module fixture)

C = 16

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def model():
    return random_model(preset_config("tiny", canvas_length=C, vocab_size=256), std=0.1, seed=0)


@pytest.fixture(scope="module")
def gen():
    return default_generation(preset_config("tiny", canvas_length=C, vocab_size=256)).replace(max_denoising_steps=8)


def engine(model, gen, rows: int, sampler: str = "exact", strategy: str | None = None) -> Engine:
    e = Engine(model, gen, max_num_seqs=rows, max_model_len=256, sampler=sampler)
    if strategy is not None:
        e.runner = ModelRunner(model, rows, 256, gen.stability_threshold, gen.confidence_threshold, sampler, strategy)
    return e


def run(e: Engine, jobs, max_steps: int = 500) -> list[list]:
    outputs = [[] for _ in jobs]
    for (prompt, params), out in zip(jobs, outputs):
        e.add_request(prompt, params, out.append)
    for _ in range(max_steps):
        e.step()
        if all(o and o[-1].finished for o in outputs):
            return outputs
    raise AssertionError("the engine did not finish within the step budget")


def tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def entries(outputs) -> list:
    return [e for o in outputs for e in o.logprobs]


def model_logprobs(model, prompt: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first canvas a request with `seed` starts from (its generator's first draw) and the decoder's
    log-probabilities over it at temperature 1 (C, V): what a one-step request must report."""
    generator = torch.Generator().manual_seed(seed)
    canvas = random_tokens((1, C), model.config.vocab_size, generator, model.device)
    with torch.inference_mode():
        cache = model.new_cache(1, 256)
        model.encode(torch.tensor([prompt]), cache, rows=[0])
        logits = model.logits(model.decode(canvas, None, model.plan(cache, [0], C, encoder=False)))
    return canvas[0], torch.log_softmax(logits[0].float(), dim=-1)


@pytest.mark.parametrize("strategy", ["rows", "batched"])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_a_token_logprob_is_the_decoders_log_softmax_at_its_step(model, gen, strategy, temperature):
    """One denoising step: every output token's log-probability and its alternatives are log_softmax of that step's
    decoder logits (temperature 1, whatever the request's temperature), the alternatives the most probable
    tokens in order."""
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_tokens=C, seed=3, temperature=temperature, max_denoising_steps=1, logprobs=5,
                            pin_prefix=False)
    out = run(engine(model, gen, 1, strategy=strategy), [(prompt, params)])[0]
    _, want = model_logprobs(model, prompt, 3)
    ids, got = tokens(out), entries(out)
    assert len(ids) == len(got) == C
    for pos, (token, (lp, top)) in enumerate(zip(ids, got)):
        assert lp == pytest.approx(want[pos, token].item(), abs=1e-4)
        best = torch.topk(want[pos], 5)
        assert [t for t, _ in top] == best.indices.tolist()
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert token == best.indices[0].item()  # one step: the committed argmax


@pytest.mark.parametrize("strategy", ["rows", "batched"])
@pytest.mark.parametrize("pin", [True, False])
def test_asking_for_logprobs_changes_no_token(model, gen, strategy, pin):
    """Exact sampler, the same seeds: the same tokens with and without logprobs, batched with rows that do not
    ask; every token has its entry and its alternatives' probabilities sum to at most 1."""
    def jobs(asked):
        return [([5, 6, 7], SamplingParams(max_tokens=40, seed=1, temperature=0.05, pin_prefix=pin,
                                           logprobs=asked)),
                ([9] * 20, SamplingParams(max_tokens=20, seed=2, pin_prefix=pin)),
                ([12] * 9, SamplingParams(max_tokens=24, seed=5, temperature=0.0, pin_prefix=pin, logprobs=asked))]

    plain = run(engine(model, gen, 3, strategy=strategy), jobs(None))
    asked = run(engine(model, gen, 3, strategy=strategy), jobs(20))
    assert [tokens(o) for o in asked] == [tokens(o) for o in plain]
    assert all(o.logprobs is None for out in plain for o in out)
    assert asked[1][0].logprobs is None
    for out in (asked[0], asked[2]):
        assert all(len(o.logprobs) == len(o.token_ids) for o in out)
        for token, (lp, top) in zip(tokens(out), entries(out)):
            assert len(top) == 20
            assert lp <= 0 and all(v <= 0 for _, v in top)
            assert sum(math.exp(v) for _, v in top) <= 1 + 1e-5
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            assert lp <= top[0][1] + 1e-6
            if token in {t for t, _ in top}:
                assert lp == pytest.approx(dict(top)[token], abs=1e-6)


def test_a_settled_token_keeps_the_record_of_the_step_it_settled(model, gen):
    """Once a position joins the settled prefix its record is frozen while the rest of the canvas moves on; the
    streamed outputs carry one entry per token."""
    e = engine(model, gen, 1)
    out = []
    request = e.add_request([5, 6, 7], SamplingParams(max_tokens=32, seed=1, temperature=0.05, logprobs=2), out.append)
    state, frozen_seen, moved_seen = e.runner.state, 0, 0
    while not (out and out[-1].finished):
        before, settled = state.logprob[0].clone(), int(state.num_settled[0])
        canvas_index = request.canvas_index
        e.step()
        if (not out or not out[-1].finished) and request.canvas_index == canvas_index and settled:
            assert torch.equal(state.logprob[0, :settled], before[:settled])
            frozen_seen += 1
            moved_seen += not torch.equal(state.logprob[0, settled:], before[settled:])
    assert frozen_seen and moved_seen
    assert all(len(o.logprobs) == len(o.token_ids) for o in out)
    assert all(len(top) == 2 for _, top in entries(out))


def test_logprobs_out_of_range_is_refused():
    from dgemma.engine import RequestError

    for bad in (-1, 21, 1.5, True):
        with pytest.raises(RequestError) as e:
            SamplingParams(logprobs=bad)
        assert e.value.param == "logprobs"


# -- served: OpenAI's shapes through the official client ----------------------------------------------------------
MODEL = "tiny-logprobs"


@pytest.fixture(scope="module")
def client(runtime):
    import openai

    from dgemma.server import ServerThread, Serving, build_app

    ckpt, tokenizer = runtime
    e = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=4, max_model_len=256, sampler="exact").start()
    srv = ServerThread(build_app(Serving(e, tokenizer, MODEL), api_key=KEY)).start()
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, timeout=60, max_retries=0)
    srv.stop()
    e.stop()

CHAT = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=24, seed=4)


def check_top(top: list, n: int) -> None:
    assert len(top) == n
    values = [t.logprob for t in top]
    assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-5


def test_chat_logprobs_in_openais_shape(client):
    plain = client.chat.completions.create(**CHAT)
    r = client.chat.completions.create(**CHAT, logprobs=True, top_logprobs=3)
    assert r.choices[0].message.content == plain.choices[0].message.content  # asking changes no token
    assert plain.choices[0].logprobs is None
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    for item in content:
        assert item.logprob <= 0 and item.bytes == list(item.token.encode("utf-8"))
        check_top(item.top_logprobs, 3)
        assert item.logprob <= item.top_logprobs[0].logprob + 1e-6
    no_top = client.chat.completions.create(**CHAT, logprobs=True)
    assert [i.logprob for i in no_top.choices[0].logprobs.content] == [i.logprob for i in content]
    assert all(i.top_logprobs == [] for i in no_top.choices[0].logprobs.content)
    # streamed: each chunk carries the entries of its tokens; together the same entries
    streamed = []
    for chunk in client.chat.completions.create(**CHAT, logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [(i.token, i.logprob, [t.logprob for t in i.top_logprobs]) for i in streamed] == \
        [(i.token, i.logprob, [t.logprob for t in i.top_logprobs]) for i in content]


def test_completion_logprobs_in_openais_shape(client):
    kw = dict(model=MODEL, prompt=[5, 6, 7], max_tokens=24, seed=4)
    r = client.completions.create(**kw, logprobs=2)
    lp, ids = r.choices[0].logprobs, r.choices[0].model_extra["token_ids"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert all(len(top) <= 2 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-5 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    as_ids = client.completions.create(**kw, logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    assert as_ids.choices[0].logprobs.tokens == [f"token_id:{t}" for t in ids]
    assert as_ids.choices[0].logprobs.token_logprobs == lp.token_logprobs
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**kw, logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            for key in streamed:
                streamed[key] += getattr(chunk.choices[0].logprobs, key)
    assert streamed == {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "text_offset": lp.text_offset}
