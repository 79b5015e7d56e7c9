"""Tiny tokenizer assets for tests and examples, built offline with the `tokenizers` library.

Both tokenizers fit a test model with vocab_size 256 and share the Gemma ids 0=<pad>, 1=<eos>, 2=<bos>.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from .text.chat_template import GEMMA4_CHAT_TEMPLATE

BASE_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>"]
CHAT_SPECIAL_TOKENS = ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"]
# The Gemma 4 tool markers, special tokens as in the release; with tool_tokens=True they follow the byte tokens.
TOOL_SPECIAL_TOKENS = ["<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
                       '<|"|>']
TOOL_VOCAB_SIZE = 264  # a model's vocab for the tokenizer with the tool tokens (258 entries)
# Bytes that never occur in valid UTF-8; leaving them out keeps the byte vocabulary at 243 entries.
_NEVER_IN_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}


def _special(tokens: list[str]) -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in tokens]


def _finish(backend: BackendTokenizer, directory: Path, config: dict) -> Path:
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", 2)])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_test_tokenizer(directory, tool_tokens: bool = False) -> Path:
    """Byte-level tokenizer (251 tokens) in which any text round-trips; returns the directory.

    Ids: 0 <pad>, 1 <eos>, 2 <bos>, 3 <|turn>, 4 <turn|>, 5 <|channel>, 6 <channel|>, 7 <|think|>, then one token per
    UTF-8 byte (GPT-2 byte-to-character map, no merges), then with `tool_tokens` the 7 tool markers (ids 251-257).
    tokenizer_config.json carries the Gemma 4 chat template.
    """
    specials = BASE_SPECIAL_TOKENS + CHAT_SPECIAL_TOKENS
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins, one per byte
    byte_to_char = {b: c for b, c in zip(_byte_order(), _gpt2_chars())}
    assert set(byte_to_char.values()) == set(byte_chars)
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        if b not in _NEVER_IN_UTF8:
            vocab[byte_to_char[b]] = len(vocab)
    if tool_tokens:
        specials = specials + TOOL_SPECIAL_TOKENS
        vocab.update({t: len(vocab) + i for i, t in enumerate(TOOL_SPECIAL_TOKENS)})
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(_special(specials))
    return _finish(backend, Path(directory), {"chat_template": GEMMA4_CHAT_TEMPLATE})


SUDOKU_SEPARATORS = ["\n", " ", "|", "-", "+", "."]


def write_sudoku_tokenizer(directory) -> Path:
    """Character-level WordLevel tokenizer for Sudoku grids (81 digits, "0" = blank); returns the directory.

    Ids: 0 <pad>, 1 <eos>, 2 <bos>, 3..12 the digits "0".."9" (digit d is id d + 3), 13 "\\n", 14 " ", 15 "|",
    16 "-", 17 "+", 18 ".", 19 <unk> (any other character). No chat template.
    """
    tokens = BASE_SPECIAL_TOKENS + [str(d) for d in range(10)] + SUDOKU_SEPARATORS + ["<unk>"]
    backend = BackendTokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    backend.decoder = decoders.Fuse()  # WordLevel would otherwise join tokens with spaces
    backend.add_special_tokens(_special(BASE_SPECIAL_TOKENS + ["<unk>"]))
    return _finish(backend, Path(directory), {"unk_token": "<unk>"})


def _byte_order() -> list[int]:
    """Bytes in the order of the GPT-2 byte-to-unicode table (printable bytes first, then the rest)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return printable + [b for b in range(256) if b not in printable]


def _gpt2_chars() -> list[str]:
    printable = _byte_order()[:188]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def write_tiny_checkpoint(directory, canvas_length: int = 16, max_denoising_steps: int = 8,
                          tool_tokens: bool = False) -> Path:
    """A random `tiny`-preset checkpoint (vocab 256, std 0.1, seed 0) with the byte-level test tokenizer, saved
    by dgemma into `directory`/model (what `dgemma init-tiny` writes); returns that directory. Its text is noise:
    tests compare texts with each other, never with words. tool_tokens: the tokenizer has the tool markers, and the
    vocab is TOOL_VOCAB_SIZE."""
    from .init_tiny import write_random_checkpoint

    return write_random_checkpoint(Path(directory) / "model", canvas_length=canvas_length,
                                   max_denoising_steps=max_denoising_steps, tool_tokens=tool_tokens)


@contextmanager
def tiny_server(model_dir, model_name: str, max_num_seqs: int = 2, max_model_len: int = 1024):
    """A served checkpoint for tests: a started engine and a ServerThread on loopback (`.url`, `.tokenizer`), both
    stopped on exit."""
    from .engine import Engine
    from .io import checkpoint
    from .server import ServerThread, Serving, build_app
    from .text.tokenizer import Tokenizer

    ckpt = checkpoint.load(model_dir, quiet=True)
    tokenizer = Tokenizer.from_dir(model_dir)
    engine = Engine(ckpt.model, ckpt.generation, tokenizer, max_num_seqs=max_num_seqs,
                    max_model_len=max_model_len).start()
    server = ServerThread(build_app(Serving(engine, tokenizer, model_name))).start()
    server.tokenizer = tokenizer
    try:
        yield server
    finally:
        server.stop()
        engine.stop()


def openai_client(server, api_key: str = "none", timeout: float = 60):
    """The official openai client against a test server: no retries, so a failure shows at once."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, timeout=timeout, max_retries=0)
