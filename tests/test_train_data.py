"""Reading training JSONL: lines end at \\n only, a UTF-8 BOM is accepted, and bad bytes or nesting name the line."""

from __future__ import annotations

import json

import pytest

from dgemma.errors import DgemmaError
from dgemma.testing import write_test_tokenizer
from dgemma.text.tokenizer import Tokenizer
from dgemma.train.data import DataError, read_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(write_test_tokenizer(tmp_path_factory.mktemp("tok")))


def _pair(prompt="q", response="a") -> bytes:
    return json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False).encode("utf-8")


def test_line_separators_inside_strings_stay_in_the_string(tok, tmp_path):
    """U+2028, U+2029, U+0085, form feeds and lone CRs are valid inside a JSON string; str.splitlines breaks on
    them, JSONL does not."""
    odd = "a\u2028b\u2029c\x85d\x0ce\rf"
    f = tmp_path / "d.jsonl"
    f.write_bytes(_pair(prompt=odd) + b"\n" + _pair() + b"\r\n")  # CRLF endings still work
    examples = read_jsonl(f, tok, template="raw")
    assert len(examples) == 2
    assert examples[0].prompt_ids == [tok.bos_token_id] + tok.encode(odd)


def test_a_utf8_bom_is_accepted(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + _pair() + b"\n" + _pair("x", "y") + b"\n")
    assert len(read_jsonl(f, tok, template="raw")) == 2


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "caf\xe9", "response": "a"}', "line is not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"prompt": "q", "response": "a"}\xef\xbb\xbf', "not valid JSON"),  # a BOM is welcome only at the start
])
def test_bad_line_names_its_line_number(line, message, tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(_pair() + b"\n\n" + line + b"\n" + _pair() + b"\n")
    with pytest.raises(DataError) as info:
        read_jsonl(f, tok, template="raw")
    msg = str(info.value)
    assert msg.startswith(f"{f}:3: ") and message in msg and "\n" not in msg, msg
    assert isinstance(info.value, DgemmaError)  # the CLI prints it as one line (exit 2)
