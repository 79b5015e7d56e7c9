"""The OpenAI-compatible server, live: uvicorn on a free 127.0.0.1 port in a thread, driven with the official
`openai` client (and httpx for raw HTTP). The model is a tiny random checkpoint saved with dgemma.io.checkpoint plus the
byte-level test tokenizer, so its text is noise: tests compare texts with each other, never with expected words.
A random model never writes thought-channel markers, so the reasoning split is tested with a scripted engine that
emits them, through the same serving code and the real tokenizer's parser."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest

from dgemma.io import checkpoint
from dgemma.engine import Engine, RequestOutput
from dgemma.presets import default_generation, preset_config
from dgemma.server import ServerThread, Serving, build_app
from dgemma.testing import write_tiny_checkpoint
from dgemma.text.tokenizer import Tokenizer

KEY = "test-key"
MODEL = "tiny-test"
SLOW = dict(temperature=0.05)  # at a low temperature this random model settles prefixes within a canvas


pytestmark = pytest.mark.usefixtures("one_thread_module")  # its module fixtures run models


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("serve"))
    return checkpoint.load(model_dir, quiet=True), Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def server(runtime):
    ckpt, tokenizer = runtime
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=4, max_model_len=256, max_waiting=32).start()
    srv = ServerThread(build_app(Serving(engine, tokenizer, MODEL), api_key=KEY)).start()
    yield srv
    srv.stop()
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)


def chat(client, content="Hello", **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def stream_chat(client, content="Hello", **kw) -> tuple[str, str | None, list]:
    chunks = list(chat(client, content, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, (reasons[-1] if reasons else None), chunks


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_chat_streamed_equals_non_streamed_for_a_seed(client):
    full = chat(client, max_tokens=40, seed=11, **SLOW)
    text, reason, chunks = stream_chat(client, max_tokens=40, seed=11, stream_options={"include_usage": True}, **SLOW)
    assert text == full.choices[0].message.content and reason == full.choices[0].finish_reason
    usage = chunks[-1].usage
    assert usage.completion_tokens == full.usage.completion_tokens <= 40
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert full.usage.model_extra["denoising_steps"] > 0
    # the settled prefix was streamed in pieces, before the last canvas was committed
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2


def test_completions_streamed_equals_non_streamed_and_respects_max_tokens(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, seed=5)
    assert full.usage.completion_tokens <= 20 and full.choices[0].finish_reason in ("stop", "length")
    assert len(full.choices[0].model_extra["token_ids"]) == full.usage.completion_tokens
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, seed=5,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_seeded_determinism(client):
    a, b, c = (chat(client, max_tokens=16, seed=s).choices[0].message.content for s in (3, 3, 4))
    assert a == b != c


def test_stop_sequences_cut_the_text(client):
    base = chat(client, max_tokens=32, seed=21, **SLOW).choices[0].message.content
    stop = next((base[i:i + 2] for i in range(1, len(base) - 1) if re.fullmatch(r"[ -~]{2}", base[i:i + 2])), None)
    assert stop, f"no printable pair in {base!r}"
    want = base[: base.index(stop)]
    got = chat(client, max_tokens=32, seed=21, stop=[stop, "\x7f\x7f"], **SLOW)
    assert got.choices[0].message.content == want and got.choices[0].finish_reason == "stop"
    text, reason, _ = stream_chat(client, max_tokens=32, seed=21, stop=stop, **SLOW)
    assert text == want and reason == "stop"


def test_sixteen_concurrent_streams_all_finish_with_their_seeds_text(client):
    seeds = list(range(8)) * 2
    want = {s: chat(client, "Hi", max_tokens=16, seed=s).choices[0].message.content for s in range(8)}
    got: dict[int, tuple] = {}

    def worker(i: int) -> None:
        text, reason, _ = stream_chat(client, "Hi", max_tokens=16, seed=seeds[i])
        got[i] = (text, reason)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == 16
    for i, (text, reason) in got.items():
        assert text == want[seeds[i]] and reason in ("stop", "length")


def hang_up_after_first_chunk(server, body: dict) -> None:
    """Stream a completion, read one chunk, then close the connection."""
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                break


def test_client_disconnect_frees_its_row(server):
    aborted = metric(server, 'dgemma_requests_total{finish_reason="abort"}')
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 224, "stream": True, "seed": 1}
    hang_up_after_first_chunk(server, body)
    for _ in range(100):  # bounded: 10 s
        if metric(server, "dgemma_requests_running") == 0 and \
                metric(server, 'dgemma_requests_total{finish_reason="abort"}') == aborted + 1:
            break
        time.sleep(0.1)
    assert metric(server, "dgemma_requests_running") == 0
    assert metric(server, 'dgemma_requests_total{finish_reason="abort"}') == aborted + 1


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
BAD = [
    ("invalid JSON", b"{not json", 400, None),
    ("not an object", [1, 2], 400, None),
    ("missing model", {"messages": CHAT["messages"]}, 400, "model"),
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("empty messages", dict(CHAT, messages=[]), 400, "messages"),
    ("max_tokens as string", dict(CHAT, max_tokens="5"), 400, "max_tokens"),
    ("max_tokens zero", dict(CHAT, max_tokens=0), 400, "max_tokens"),
    ("max_tokens float", dict(CHAT, max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens beyond context", dict(CHAT, max_tokens=10_000), 400, "max_tokens"),
    ("temperature too high", dict(CHAT, temperature=3), 400, "temperature"),
    ("temperature string", dict(CHAT, temperature="hot"), 400, "temperature"),
    ("n > 8", dict(CHAT, n=9), 400, "n"),
    ("stop not a string", dict(CHAT, stop=5), 400, "stop"),
    ("seed string", dict(CHAT, seed="x"), 400, "seed"),
    ("stream string", dict(CHAT, stream="yes"), 400, "stream"),
    ("steps zero", dict(CHAT, max_denoising_steps=0), 400, "max_denoising_steps"),
    ("entropy_bound negative", dict(CHAT, entropy_bound=-1), 400, "entropy_bound"),
    ("t_max below t_min", dict(CHAT, t_min=0.9, t_max=0.5), 400, "t_max"),
    ("prompt longer than context", dict(CHAT, messages=[{"role": "user", "content": "x" * 400}]), 400, "messages"),
    ("unknown role", dict(CHAT, messages=[{"role": "robot", "content": "x"}]), 400, "messages"),
    ("template kwarg clash", dict(CHAT, chat_template_kwargs={"messages": 1}), 400, "messages"),
    ("unknown model", dict(CHAT, model="gpt-4"), 404, "model"),
]
BAD_COMPLETIONS = [
    ("token id out of vocabulary", {"model": MODEL, "prompt": [5, 999]}, 400, "prompt"),
    ("empty prompt", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("prompt of floats", {"model": MODEL, "prompt": [1.5]}, 400, "prompt"),
]


@pytest.mark.parametrize("name,body,status,param", BAD + BAD_COMPLETIONS, ids=[b[0] for b in BAD + BAD_COMPLETIONS])
def test_bad_inputs_get_openai_errors(server, name, body, status, param):
    path = "/v1/completions" if (name, body, status, param) in BAD_COMPLETIONS else "/v1/chat/completions"
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    kw.setdefault("headers", {})["Authorization"] = f"Bearer {KEY}"
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error


def test_api_key_is_required(server):
    assert httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 401
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert httpx.get(server.url + "/nope", timeout=10).json()["error"]["message"]


def test_models_and_metrics(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401  # the key covers /metrics
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    for name in ("dgemma_requests_total", "dgemma_prompt_tokens_total", "dgemma_generation_tokens_total",
                 "dgemma_denoising_steps_total", "dgemma_requests_waiting", "dgemma_requests_running",
                 "dgemma_time_to_first_token_seconds_bucket", "dgemma_e2e_request_latency_seconds_bucket"):
        assert name in text


def test_drafts_are_opt_in(client):
    _, _, plain = stream_chat(client, max_tokens=16, seed=2)
    assert not any(c.choices and (c.choices[0].delta.model_extra or {}).get("draft") for c in plain)
    _, _, drafted = stream_chat(client, max_tokens=16, seed=2, stream_options={"include_drafts": True})
    assert any(c.choices and (c.choices[0].delta.model_extra or {}).get("draft") for c in drafted)


def test_model_without_tokenizer_takes_and_returns_token_ids(runtime):
    ckpt, _ = runtime
    engine = Engine(ckpt.model, ckpt.generation, None, max_num_seqs=1, max_model_len=256).start()
    srv = ServerThread(build_app(Serving(engine, None, MODEL))).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=60, max_retries=0)
        out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=8, seed=0)
        ids = out.choices[0].model_extra["token_ids"]
        assert 0 < len(ids) <= 8 and out.choices[0].text == " ".join(str(t) for t in ids if t != 1)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="text", max_tokens=8)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    finally:
        srv.stop()
        engine.stop()


def test_full_queue_answers_429_with_retry_after(runtime):
    ckpt, tokenizer = runtime
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=1, max_model_len=256, max_waiting=1)
    srv = ServerThread(build_app(Serving(engine, tokenizer, MODEL))).start()  # engine not started: nothing runs
    try:
        url = srv.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=dict(CHAT, stream=True), timeout=10) as r1, \
                httpx.stream("POST", url, json=dict(CHAT, stream=True), timeout=10) as r2:
            assert r1.status_code == r2.status_code == 200  # one for the free row, one in the queue
            third = httpx.post(url, json=CHAT, timeout=10)
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            assert third.json()["error"]["type"] == "rate_limit_error"
    finally:
        srv.stop()


class ScriptedEngine:
    """Stands in for the engine and replies with fixed text deltas: what the real model would write in thinking
    mode, which a random model never does."""

    generation = default_generation(preset_config("tiny"))
    max_model_len, num_running, num_waiting, num_steps = 256, 0, 0, 0
    vocab_size = preset_config("tiny").text.vocab_size
    canvas_length = preset_config("tiny").canvas_length

    def __init__(self, deltas: list[str]):
        self.deltas = deltas
        self.prompts: list[list[int]] = []

    def add_request(self, prompt, params, sink, request_id):
        self.prompts.append(prompt)

        def reply():
            for i, text in enumerate(self.deltas):
                last = i == len(self.deltas) - 1
                sink(RequestOutput(request_id, [7], text, finished=last, finish_reason="stop" if last else None,
                                   prompt_tokens=len(prompt), completion_tokens=i + 1, denoising_steps=i + 1,
                                   ttft=0.0, latency=0.0))

        threading.Thread(target=reply, daemon=True).start()

    def abort(self, request_id):
        pass


def test_thinking_is_returned_as_reasoning_content(runtime):
    _, tokenizer = runtime
    deltas = ["<|chan", "nel>thought\nLet me", " think.<chan", "nel|>The ans", "wer is 4.<turn|>"]
    engine = ScriptedEngine(deltas)
    srv = ServerThread(build_app(Serving(engine, tokenizer, MODEL))).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=30, max_retries=0)
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "2+2?"}],
                  extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        message = client.chat.completions.create(**kw).choices[0].message
        assert message.content == "The answer is 4."
        assert message.model_extra["reasoning_content"] == "Let me think."
        assert "<|think|>" in tokenizer.decode(engine.prompts[0], skip_special_tokens=False)
        chunks = list(client.chat.completions.create(stream=True, **kw))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == "The answer is 4."
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Let me think."
    finally:
        srv.stop()


def test_sse_wire_format_ends_with_done(server):
    body = dict(CHAT, stream=True, seed=0)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][len("data: "):])["object"] == "chat.completion.chunk"
