"""Everyday pydantic 2 models sent to a served random-weight model through the official openai client, as a user
would: each answer passes the model's own model_validate_json, and jsonschema (format checking on) with the schema
pydantic wrote. Both ways the client offers: `response_format` with `model_json_schema()`, and
`chat.completions.parse(response_format=Model)`, which sends openai's strict form of the schema and parses the
answer with the model."""

from __future__ import annotations

import json

import jsonschema
import pytest

from dgemma.testing import openai_client, tiny_server, write_tiny_checkpoint

from .test_schema_coverage import Bounded, Net, Owner, Priced, Shapes, Stamped, Tree
from .test_schema_patterns import Slug

pytestmark = pytest.mark.usefixtures("one_thread_module")  # its module fixtures run models

MODEL = "tiny-pydantic"
MODELS = [Bounded, Tree, Stamped, Shapes, Owner, Net, Priced, Slug]
ASK = [{"role": "user", "content": "Fill in the record."}]
CANVAS = 64


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("pydantic"), canvas_length=CANVAS,
                                      max_denoising_steps=4)
    with tiny_server(model_dir, MODEL, max_model_len=1024) as server:
        yield openai_client(server, timeout=300)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_response_format_answers_validate_with_the_model(client, model):
    schema = model.model_json_schema()
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=6 * CANVAS, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": model.__name__, "schema": schema}})
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice
    model.model_validate_json(choice.message.content)
    checker.validate(json.loads(choice.message.content))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_parse_with_the_model_as_response_format(client, model):
    """openai's helper writes the strict schema (every key required, additionalProperties false) and parses the
    reply with the model: a reply it cannot parse raises."""
    out = client.chat.completions.parse(model=MODEL, messages=ASK, max_tokens=6 * CANVAS, seed=4,
                                        response_format=model)
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(out.choices[0].message.parsed, model)
