"""Hardening, second pass (issue 33): requests that used to be answered 500 or silently mangled are 400s naming
their field, and the API key guards the schema too. A live server on a tiny random checkpoint."""

from __future__ import annotations

import httpx
import pytest

from dgemma.io import checkpoint
from dgemma.engine import Engine
from dgemma.server import ServerThread, Serving, build_app
from dgemma.testing import write_tiny_checkpoint
from dgemma.text.tokenizer import Tokenizer

KEY = "test-key"
MODEL = "tiny-test"
AUTH = {"Authorization": f"Bearer {KEY}"}

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("serve"))
    ckpt, tokenizer = checkpoint.load(model_dir, quiet=True), Tokenizer.from_dir(model_dir)
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=2, max_model_len=256).start()
    srv = ServerThread(build_app(Serving(engine, tokenizer, MODEL), api_key=KEY)).start()
    yield srv
    srv.stop()
    engine.stop()


def post(server, path: str, body: dict, headers=AUTH) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def chat_body(content, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def test_seventeen_stop_strings_say_how_many_are_allowed(server):
    for path, body in [("/v1/chat/completions", chat_body("hi", stop=[str(i) for i in range(17)])),
                       ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["x"] * 17})]:
        r = post(server, path, body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "stop" and "at most 16 stop strings, got 17" in error["message"], error
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4,
                                            "stop": ["x"] * 16}).status_code == 200


@pytest.mark.parametrize("part, why", [
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "takes no audio"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "takes no video"),
    ({"type": "image"}, "carries no picture"),
    ({"type": "file", "file": {"file_data": "AAAA"}}, "unsupported content part type 'file'"),
    ({"type": "text", "text": 5}, "needs a string `text`"),
])
def test_content_parts_the_prompt_would_drop_are_refused(server, part, why):
    r = post(server, "/v1/chat/completions", chat_body([{"type": "text", "text": "hi"}, part]))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages.0.content" and why in error["message"] and "part 1" in error["message"], error


def test_openapi_needs_the_key_and_the_bearer_scheme_is_case_insensitive(server):
    assert httpx.get(server.url + "/openapi.json", timeout=10).status_code == 401
    schema = httpx.get(server.url + "/openapi.json", headers=AUTH, timeout=10)
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    for header in (f"bearer {KEY}", f"BEARER {KEY}"):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}, timeout=10).status_code == 200
    for header in (f"Basic {KEY}", f"Bearer {KEY}x", KEY, f"Bearer{KEY}"):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}, timeout=10).status_code == 401
