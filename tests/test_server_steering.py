"""The canvas-steering fields over HTTP with the official openai client: pinned, seed_tokens/strength,
prediction (Predicted Outputs) and suffix (fill in the middle)."""

from __future__ import annotations

import httpx
import pytest

from dgemma.presets import default_generation, preset_config, random_model
from dgemma.testing import openai_client, tiny_server, write_tiny_checkpoint

MODEL = "tiny-steer"
C = 16


pytestmark = pytest.mark.usefixtures("one_thread_module")  # its module fixtures run models


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("steer"), canvas_length=C, max_denoising_steps=6)
    with tiny_server(model_dir, MODEL, max_model_len=256) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=60)


def test_pinned_tokens_come_back_in_place(client):
    pins = {0: 70, 5: 71, 20: 72}
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2 * C, seed=1,
                                    extra_body={"pinned": {str(k): v for k, v in pins.items()}})
    ids = out.choices[0].model_extra["token_ids"]
    assert all(ids[p] == t for p, t in pins.items())


def test_suffix_fills_the_middle_streamed_or_not(client, server):
    suffix = " world"
    kw = dict(model=MODEL, prompt="Hello", suffix=suffix, max_tokens=C, seed=3)
    out = client.completions.create(**kw)
    ids = out.choices[0].model_extra["token_ids"]
    suffix_ids = server.tokenizer.encode(suffix, add_special_tokens=False)
    assert out.choices[0].finish_reason == "stop"
    assert 1 <= len(ids) <= C - len(suffix_ids) - 1  # the middle only: the suffix and its EOS are not returned
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == out.choices[0].text


def test_prediction_seeds_chat_and_completions(client):
    pred = {"type": "content", "content": "quick fox"}
    a = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=C,
                                       seed=2, prediction=pred)
    b = client.completions.create(model=MODEL, prompt="hi", max_tokens=C, seed=2,
                                  extra_body={"prediction": pred, "strength": 0.0})
    assert a.choices[0].finish_reason in ("stop", "length") and b.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param", [
    ({"pinned": {"x": 3}}, "pinned"), ({"pinned": {"99": 3}}, "pinned"), ({"pinned": {"0": 999}}, "pinned"),
    ({"seed_tokens": [3], "strength": 1.5}, "strength"), ({"strength": 0.5}, "strength"),
    ({"pinned": {"0": 3}, "strength": 0.5}, "strength"), ({"template": "a{{2}}", "strength": 0.5}, "strength"),
    ({"seed_tokens": [-1]}, "seed_tokens"), ({"suffix": "x" * 40}, "suffix"),
    ({"prediction": {"type": "content", "content": "a"}, "seed_tokens": [3]}, "prediction")])
def test_bad_steering_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL, "prompt": [5, 6], "max_tokens": C, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- structured output ------------------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_is_valid_by_construction(client, stream):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "who?"}], max_tokens=3 * C, seed=5,
              response_format=fmt)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    else:
        text = client.chat.completions.create(**kw).choices[0].message.content
    import json as _json

    jsonschema.validate(_json.loads(text), SCHEMA)


def test_vllm_structured_outputs_regex_and_choice(client):
    import re as _re

    r = client.completions.create(model=MODEL, prompt="code:", max_tokens=C, seed=1,
                                  extra_body={"structured_outputs": {"regex": "[A-F]{2}[0-9]{3}"}})
    assert _re.fullmatch("[A-F]{2}[0-9]{3}", r.choices[0].text)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "pick"}], max_tokens=C,
                                       seed=2, extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert r.choices[0].message.content in ("yes", "no", "maybe")


def test_response_format_json_object(client):
    import json as _json

    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4 * C,
                                       seed=3, response_format={"type": "json_object"})
    assert isinstance(_json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("body, param", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                       "not": {}}}}},
     "response_format"),
    ({"structured_outputs": {"choice": ["x" * 40]}}, "structured_outputs"),  # longer than max_tokens
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "[0-9]{3}"}, "pinned": {"1": 70}}, "pinned"),  # 70 is no digit
    ({"structured_outputs": {"regex": "[0-9]{3}"}, "template": "{{2}}"}, "template"),  # 2 digits, not 3
    ({"structured_outputs": {"regex": "[0-9]{3}"}, "suffix": "x"}, "suffix")])
def test_bad_constraints_are_400s_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL, "prompt": [5, 6], "max_tokens": C, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in (param, "max_tokens")


def test_template_over_the_api(client, server):
    out = client.completions.create(model=MODEL, prompt="Person", seed=4, extra_body={"template": "N: {{3}}!"})
    ids = out.choices[0].model_extra["token_ids"]
    enc = lambda s: server.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert ids[:len(enc("N: "))] == enc("N: ") and ids[len(enc("N: ")) + 3:][:len(enc("!"))] == enc("!")
    for bad in ("no holes", "x {{0}}"):
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "template": bad},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "template"


def test_steering_under_a_constraint_over_the_api(client, server):
    """A constraint combines with a template, pins, a prediction or a suffix: both hold in the reply."""
    import re as _re

    regex = "[A-F]{2}-[0-9]{3}"
    enc = lambda s: server.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    so = {"structured_outputs": {"regex": regex}}
    r = client.completions.create(model=MODEL, prompt="code", seed=6, extra_body={"template": "{{2}}-{{3}}", **so})
    assert _re.fullmatch(regex, r.choices[0].text), r.choices[0].text
    r = client.completions.create(model=MODEL, prompt="code", seed=7, max_tokens=C,
                                  extra_body={"pinned": {"1": enc("C")[0], "4": enc("7")[0]}, **so})
    text = r.choices[0].text
    assert _re.fullmatch(regex, text) and text[1] == "C" and text[4] == "7", text
    r = client.completions.create(model=MODEL, prompt="code", seed=8, max_tokens=C, extra_body={"prediction": {
        "type": "content", "content": "AB-123"}, **so})
    assert _re.fullmatch(regex, r.choices[0].text), r.choices[0].text
    r = client.completions.create(model=MODEL, prompt="code", seed=9, max_tokens=C, suffix="42", extra_body=so)
    assert _re.fullmatch("[A-F]{2}-[0-9]", r.choices[0].text), r.choices[0].text  # the middle; "42" completes it


def test_json_mode_can_be_compiled_before_the_first_request(server):
    """dgemma serve compiles JSON-object mode in the background at startup; a request then finds it cached."""
    from dgemma.control import Constraint
    from dgemma.engine import Engine
    from dgemma.server import Serving

    cfg = preset_config("tiny", canvas_length=C, vocab_size=256)
    engine = Engine(random_model(cfg, seed=0), default_generation(cfg), server.tokenizer, max_num_seqs=1,
                    max_model_len=64)
    serving = Serving(engine, server.tokenizer, MODEL)
    assert serving.warm_json_object()
    vocab = serving.vocabulary()
    assert len(vocab.cache) == 1 and Constraint.json_object(vocab) is next(iter(vocab.cache.values()))


# -- hardening: every bad steering field is a 400 naming it; user text in the output is plain text ---------------
def _post(server, path, body):
    return httpx.post(server.url + path, json=dict(body, model=MODEL), timeout=60)


@pytest.mark.parametrize("text", [5, ["a"], None])
def test_prediction_parts_with_non_string_text_are_a_400(server, text):
    r = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 4,
                                          "prediction": {"type": "content", "content": [{"type": "text", "text": text}]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prediction", r.text
    assert "prediction.content[0].text" in r.json()["error"]["message"]


def test_a_prediction_part_that_is_not_text_is_refused(server):
    r = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 4,
                                          "prediction": {"type": "content", "content": [{"type": "image_url"}]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prediction"


def test_a_too_long_prediction_names_prediction(server):
    r = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 4,
                                          "prediction": {"type": "content", "content": "a much longer text"}})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "prediction" and "seed_tokens" not in error["message"]


def test_template_literals_are_plain_text_as_a_prediction_is(server):
    """'<eos>' typed in a template is five characters, as in a prediction; it used to pin EOS at 0."""
    tok = server.tokenizer
    plain = tok.encode_plain("<eos>")
    r = _post(server, "/v1/completions", {"prompt": "x", "seed": 0, "template": "<eos>{{2}}<bos>"})
    assert r.status_code == 200, r.text
    ids = r.json()["choices"][0]["token_ids"]
    assert ids[:len(plain)] == plain and tok.token_id("<eos>") not in ids[:len(plain)]
    assert ids[len(plain) + 2:] == tok.encode_plain("<bos>") + [tok.token_id("<eos>")]


def test_chat_honours_template(server):
    """A chat's template was silently ignored; now the reply holds its literals, the holes filled."""
    tok = server.tokenizer
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 1,
                                               "template": "A{{2}}B"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == len(tok.encode_plain("AB")) + 2 + 1  # literals, holes, EOS
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "template": "none"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "template"


@pytest.mark.parametrize("pinned", [{"\u0663": 70}, {"0": 70, "00": 71}, {"-1": 70}, {" 1": 70}])
def test_pinned_keys_are_ascii_positions_named_once(server, pinned):
    r = _post(server, "/v1/completions", {"prompt": [5, 6], "max_tokens": C, "pinned": pinned})
    assert r.status_code == 400 and r.json()["error"]["param"] == "pinned", r.text
