"""`dgemma chat`: an interactive chat in the terminal, pictures included (/image PATH)."""

from __future__ import annotations

import sys

from ..cli_common import CLIError, apply_threads, generation_config, load_runtime, seed_everything
from .generate import CanvasView, check_default_model

CHAT_HELP = ("dgemma chat: type a message; /image PATH adds a picture to the next one; /reset clears the history, "
             "/exit or Ctrl-D quits.")


def fit_conversation(messages: list[dict], render, limit: int) -> tuple[list[dict], list[int], int]:
    """Drop the oldest user/assistant turns (never the system prompt, never the newest message) until the rendered
    prompt leaves `limit` or fewer tokens. Returns the kept messages, the prompt's ids and how many turns were
    dropped; the ids are longer than `limit` only when the newest message alone does not fit."""
    keep_system = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        ids = render(messages)
        if len(ids) <= limit or len(messages) <= keep_system + 1:
            return messages, ids, dropped
        # one turn: the oldest user message and the assistant's answer to it
        cut = keep_system + (2 if len(messages) > keep_system + 2 and messages[keep_system + 1]["role"] == "assistant"
                             else 1)
        messages = messages[:keep_system] + messages[cut:]
        dropped += 1


class ChatPictures:
    """The pictures of a chat (/image PATH): every one preprocessed once, referred to by index from messages."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.support = None  # images.ImageSupport, made on the first /image
        self.pictures: list = []  # images.ImagePatches, by index
        self.pending: list[int] = []  # pictures for the next message

    def add(self, path: str) -> str:
        """Read a picture for the next message; the line to show (an ImageError's message if it cannot)."""
        from ..image_files import read_image
        from ..images import ImageError, ImageSupport

        try:
            self.support = self.support or ImageSupport.of(self.ckpt)
            self.pictures.append(self.support.patches(read_image(path)))
        except ImageError as e:
            return f"[{e}]"
        self.pending.append(len(self.pictures) - 1)
        return f"[image {len(self.pending)} will go with your next message]"

    def content(self, line: str):
        """A user message's content: the pending pictures, then the text."""
        if not self.pending:
            return line
        return [{"type": "image", "index": i} for i in self.pending] + [{"type": "text", "text": line}]

    def of(self, messages: list[dict]) -> list:
        return [self.pictures[part["index"]] for m in messages if isinstance(m["content"], list)
                for part in m["content"] if part.get("type") == "image"]

    def prompt_images(self, messages: list[dict]):
        found = self.of(messages)
        return self.support.prompt_images([found]) if found else None


def cmd_chat(args) -> int:
    from ..generate import generate
    from ..images import ImageError, expand_image_tokens
    from ..inputs import InputProcessor
    from ..text.thinking import split_thinking

    check_default_model(args)
    apply_threads(args.threads)
    ckpt, tokenizer = load_runtime(args)
    if tokenizer is None:
        raise CLIError("chat needs a checkpoint with tokenizer.json")
    InputProcessor(tokenizer, ckpt.generation, ckpt.config.text.vocab_size).check_can_chat()  # as the server does
    gen = generation_config(args, ckpt.generation)
    seed_everything(args.seed)
    eos = set(gen.eos_token_id)
    # a prompt must leave room for at least one canvas inside the model's context (then generate cannot refuse it)
    limit = ckpt.config.text.max_position_embeddings - ckpt.config.canvas_length
    dim, undim = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = list(system)
    pictures = ChatPictures(ckpt)

    def render(msgs: list[dict]) -> list[int]:
        # what you type is plain text: only the template writes control tokens (a typed turn marker is text)
        ids = tokenizer.encode_chat(msgs, add_generation_prompt=True, enable_thinking=args.think)
        found = pictures.of(msgs)
        return expand_image_tokens(ids, found, pictures.support.tokens) if found else ids

    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages, pictures.pending = list(system), []
            continue
        if line == "/image" or line.startswith("/image "):
            print(pictures.add(line[len("/image"):].strip()), file=sys.stderr)
            continue
        if not line:
            continue
        try:
            kept, prompt, dropped = fit_conversation(messages + [{"role": "user", "content": pictures.content(line)}],
                                                     render, limit)
        except ImageError as e:  # e.g. a chat template that does not write the image placeholders
            print(f"[{e}]", file=sys.stderr)
            continue
        if len(prompt) > limit:  # this message alone does not fit: keep the conversation as it was
            print(f"[that message makes a {len(prompt)}-token prompt; the model's context leaves room for {limit}: "
                  f"send a shorter one]", file=sys.stderr)
            continue
        if dropped:
            print(f"[the conversation outgrew the model's {ckpt.config.text.max_position_embeddings}-token context: "
                  f"dropped the oldest {dropped} turn{'s' * (dropped > 1)}; /reset starts afresh]", file=sys.stderr)
        messages, pictures.pending = kept, []
        out = generate(ckpt.model, [prompt], gen, on_step=CanvasView(tokenizer) if args.show_canvas else None,
                       greedy=args.greedy, images=pictures.prompt_images(kept))
        ids = [t for t in out.token_ids[0] if t not in eos]
        reasoning, answer = split_thinking(tokenizer.decode(ids, skip_special_tokens=False))
        if reasoning:
            print(f"{dim}{reasoning}{undim}")
        print(f"model> {answer}")
        messages.append({"role": "assistant", "content": answer})
