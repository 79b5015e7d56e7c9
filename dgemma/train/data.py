"""JSONL training data: prompt/response pairs or chat conversations, tokenized into Examples.

Accepted lines:
  {"prompt": "...", "response": "..."}          ("completion" is accepted for "response")
  {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}

A conversation is cut before its last (assistant) message: the prompt is the chat template rendered with the
generation prompt, the response is the rest of the full rendering (the answer and its end-of-turn marker). The
released template has no generation tags, so this suffix is how the loss is kept off the turn header. With
template "chat", a prompt/response pair is read as a one-turn conversation; with "raw" it is text after <bos>.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DgemmaError
from .batch import Example

TEMPLATES = ("auto", "raw", "chat")
BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 256 * 2**20  # a line past this is refused whatever the model (it would take tens of GB to tokenize)
LINE_SLACK = 65536  # bytes of JSON besides the text: keys, roles, quotes


class DataError(DgemmaError, ValueError):
    """Bad training data; the message is one line naming the file and line."""


def _conversation(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: 'messages' must be a list of at least two messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: every message needs a string 'role' and 'content'")
    if messages[-1]["role"] not in ("assistant", "model"):
        raise DataError(f"{where}: the last message must be the assistant's (it is the training target)")
    return messages


EMPTY_THOUGHT = "<|channel>thought\n<channel|>"


def encode_record(record: dict, tokenizer, template: str, where: str) -> Example:
    """One parsed JSON line -> Example."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "messages" in record:
        messages = _conversation(record["messages"], where)
    else:
        prompt = record.get("prompt")
        response = record.get("response", record.get("completion"))
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"{where}: expected string fields 'prompt' and 'response', or 'messages'")
        if template == "raw":
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            return _example(bos + tokenizer.encode(prompt), tokenizer.encode(response), where)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if template == "raw":
        raise DataError(f"{where}: 'messages' needs a chat template (template 'raw' was chosen)")
    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    # Gemma 4's template (thinking off) ends the generation prompt with an empty thought channel that it does not
    # render in past answers: the answer follows the prompt without it, and is trained after the prompt as served.
    start = prompt_text.removesuffix(EMPTY_THOUGHT) if not full_text.startswith(prompt_text) else prompt_text
    if not full_text.startswith(start):
        raise DataError(f"{where}: the chat template does not render the conversation as prompt + answer")
    return _example(tokenizer.encode(prompt_text), tokenizer.encode(full_text[len(start):].rstrip("\n")), where)


def _example(prompt_ids: list[int], response_ids: list[int], where: str) -> Example:
    if not prompt_ids:
        raise DataError(f"{where}: the prompt is empty")
    if not response_ids:
        raise DataError(f"{where}: the response is empty")
    return Example(prompt_ids, response_ids)


def read_jsonl(path: str | Path, tokenizer, template: str = "auto", max_length: int | None = None,
               canvas_length: int | None = None) -> list[Example]:
    """Read and tokenize every line. `max_length` bounds prompt + response (padded to canvases) in tokens.

    The file is read a line at a time, and a line is bounded before it is parsed, and its text before it is
    tokenized: no text longer than max_length * max_token_bytes bytes can fit in max_length tokens (tokenizing
    megabytes takes gigabytes), and JSON spells a byte of text in at most 6 bytes."""
    if template not in TEMPLATES:
        raise DataError(f"template must be one of {TEMPLATES}, got {template!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if template == "auto":
        template = "chat" if tokenizer.has_chat_template else "raw"
    max_text = max_length * tokenizer.max_token_bytes if max_length is not None else MAX_LINE_BYTES
    examples = []
    for where, record, text in _records(path, min(MAX_LINE_BYTES, 6 * max_text + LINE_SLACK)):
        if text > max_text:
            raise DataError(f"{where}: {text} bytes of text cannot fit in the model's {max_length} positions (at "
                            f"most {max_text} bytes)")
        ex = encode_record(record, tokenizer, template, where)
        if max_length is not None:
            C = canvas_length or 1
            length = len(ex.prompt_ids) + -(-(len(ex.response_ids) + 1) // C) * C
            if length > max_length:
                raise DataError(f"{where}: example needs {length} positions, more than the model's {max_length}")
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _records(path: Path, max_line: int) -> Iterator[tuple[str, object, int]]:
    """(path:line, parsed JSON, bytes of text in it) for each non-blank line, read one line at a time; a line over
    `max_line` bytes is refused before it is held whole."""
    with open(path, "rb") as f:
        for n in itertools.count(1):
            raw = f.readline(max_line + 1)
            if not raw:
                return
            where = f"{path}:{n}"
            if len(raw) > max_line and not (len(raw) == max_line + 1 and raw.endswith(b"\n")):
                raise DataError(f"{where}: the line is longer than {max_line} bytes, more text than the model can "
                                f"take")
            if n == 1 and raw.startswith(BOM):  # editors on Windows write one; it is not part of the JSON
                raw = raw[len(BOM):]
            # JSONL lines end at \n only (readline splits there, never inside a UTF-8 sequence); str.splitlines
            # would also split at U+2028, \f, a lone \r..., which are valid inside JSON strings
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: line is not UTF-8 text (byte {e.start + 1}: "
                                f"{raw[e.start:e.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                size = _text_bytes(record)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{where}: not valid training data (JSON nested too deeply)") from None
            yield where, record, size


def _text_bytes(value) -> int:
    """UTF-8 bytes of all the strings in parsed JSON (its text, as the tokenizer will see it)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    return 0


@dataclass
class ShuffledExamples:
    """Epochs over a fixed list in a fresh random order each; resumable (the state is the order and the cursor)."""

    examples: list[Example]
    seed: int = 0
    order: list[int] = field(default_factory=list)
    cursor: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        if not self.examples:
            raise DataError("no training examples")
        if not self.order:
            self._shuffle()

    def _shuffle(self) -> None:
        self.order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self.order)
        self.cursor = 0

    def next_batch(self, batch_size: int) -> list[Example]:
        out = []
        while len(out) < batch_size:
            if self.cursor == len(self.order):
                self.epoch += 1
                self._shuffle()
            out.append(self.examples[self.order[self.cursor]])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"order": list(self.order), "cursor": self.cursor, "epoch": self.epoch, "size": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.examples):
            raise DataError(f"the checkpoint was trained on {state['size']} examples, the data now has "
                            f"{len(self.examples)}")
        self.order, self.cursor, self.epoch = list(state["order"]), state["cursor"], state["epoch"]
