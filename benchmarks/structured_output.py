"""Structured output: validity on random-weight models, and what a constraint adds to a denoising step.

    python benchmarks/structured_output.py validity [--requests 200] [--kinds regex choice schema object tool]
    python benchmarks/structured_output.py cost --vocab 32000 [--steps 8] [--threads 2] [--device cuda] [--json]
    python benchmarks/structured_output.py cost --vocab 262144
    python benchmarks/structured_output.py tool-compile --vocab 262144
    python benchmarks/structured_output.py cache-hit --vocab 32000 [--hits 2000]

validity: per constraint kind, `--requests` outputs (batches of 8, over 5 random tiny models and seeds) through
generate with the constraint, checked with jsonschema / re.fullmatch / json.loads / membership; the same
prompts without the constraint give the unconstrained rate. "tool" is a named tool call (tool_choice naming one
function): the tokenizer has the Gemma tool markers, and an output counts when it parses into exactly one call of
that function and nothing else, whose arguments `jsonschema` validates against its parameters.

cost: the `small` preset (canvas 256) with its vocabulary set to --vocab, a byte-level vocabulary of that size
(the 256 byte tokens plus random strings of letters, digits and JSON punctuation), one canvas of --steps fixed
steps at batch 1, with and without a constraint (the JSON-object one, then `WIDE`: 24 required strings of up to 64
characters; as many canvases as its shortest output needs); ms per step of each, in one process, on --device
(cuda: the model in bfloat16, the canvas read there, and `WIDE` once more with the DP's forward pass kept on the
host: dp.DEVICE_PAIRS). gpu_check.py runs it at 262,144 tokens.

tool-compile: the named-tool constraint of `validity` compiled over the synthetic vocabulary of --vocab tokens plus
the three tool marker tokens (what a server pays on the first forced call of a function; cached afterwards).

cache-hit: `SCHEMA` compiled once over the synthetic vocabulary of --vocab tokens, then asked for --hits more times
as a request asks for it (`Constraint.from_json_schema` with a max_tokens: the key, the LRU look-up, the budget
check); the same for the automaton after a thought (thinking on). Prints the first compile and the hits' p50, p99
and max in ms.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time

import torch

from dgemma.control import Constraint, ConstraintVocabulary
from dgemma.control.pins import Steering
from dgemma.generate import generate
from dgemma.presets import default_generation, preset_config, random_model

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                    "maxItems": 3}},
          "required": ["name", "ok"], "additionalProperties": False}
REGEX = r"[A-Z]{2}-[0-9]{3,5}"
CHOICES = ["approve", "reject", "escalate to a human"]
TOOL = {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}, "hourly": {"type": "boolean"},
        "fields": {"type": "array", "items": {"enum": ["temp", "wind", "rain"]}, "maxItems": 3}}}}


def validity(requests: int, only: list[str]) -> None:
    import jsonschema

    from dgemma.control.tool_grammar import call_regex, tool_vocabulary
    from dgemma.control.tools import MARKERS, split_tool_calls
    from dgemma.testing import TOOL_VOCAB_SIZE, write_test_tokenizer
    from dgemma.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(write_test_tokenizer(tempfile.mkdtemp()))
    vocab = ConstraintVocabulary.from_tokenizer(tok.backend, [1], [0], 256)
    tool_tok = Tokenizer.from_dir(write_test_tokenizer(tempfile.mkdtemp(), tool_tokens=True))
    tool_vocab = tool_vocabulary(ConstraintVocabulary.from_tokenizer(tool_tok.backend, [1], [0], TOOL_VOCAB_SIZE),
                                 {m: tool_tok.token_id(m) for m in MARKERS})

    def is_json(t):
        return isinstance(json.loads(t), dict)

    def is_schema(t):
        return jsonschema.validate(json.loads(t), SCHEMA) is None

    def is_named_call(t):
        content, calls = split_tool_calls(t)
        return content == "" and len(calls) == 1 and calls[0].name == TOOL["name"] and \
            jsonschema.validate(calls[0].arguments, TOOL["parameters"]) is None

    kinds = {"regex": lambda: (Constraint.from_regex(REGEX, vocab), lambda t: re.fullmatch(REGEX, t) is not None, 16),
             "choice": lambda: (Constraint.from_choice(CHOICES, vocab), lambda t: t in CHOICES, 32),
             "schema": lambda: (Constraint.from_json_schema(SCHEMA, vocab), is_schema, 96),
             "object": lambda: (Constraint.json_object(vocab), is_json, 96),
             "tool": lambda: (Constraint.from_regex(call_regex([TOOL]), tool_vocab), is_named_call, 96)}
    C = 32
    for kind in only:
        constraint, ok, max_new = kinds[kind]()
        tokenizer, vocab_size = (tool_tok, TOOL_VOCAB_SIZE) if kind == "tool" else (tok, 256)
        counts = {True: 0, False: 0}
        t = time.perf_counter()
        n = 0
        while n < requests:
            seed = n // 8
            cfg = preset_config("tiny", canvas_length=C, vocab_size=vocab_size)
            model = random_model(cfg, std=(0.02, 0.05, 0.1, 0.2, 0.3)[seed % 5], seed=seed)
            gen = default_generation(cfg).replace(max_new_tokens=max_new, max_denoising_steps=8,
                                                           eos_token_id=[1], pad_token_id=0)
            rng = random.Random(seed)
            prompts = [[2] + [rng.randrange(8, 250) for _ in range(rng.randint(1, 12))] for _ in range(8)]
            for constrained in (True, False):
                out = generate(model, prompts, gen, generator=torch.Generator().manual_seed(seed),
                               steering=[Steering(constraint=constraint)] * 8 if constrained else None)
                for ids in out.token_ids:
                    text = tokenizer.decode([i for i in ids if i != 1], skip_special_tokens=False)
                    try:
                        good = bool(ok(text))
                    except (ValueError, jsonschema.ValidationError):
                        good = False
                    counts[constrained] += good
            n += 8
        print(f"{kind:7s} valid with the constraint {counts[True]}/{n} ({100 * counts[True] / n:.1f}%), "
              f"without {counts[False]}/{n} ({100 * counts[False] / n:.1f}%)  [{time.perf_counter() - t:.0f} s]",
              flush=True)


def synthetic_vocabulary(size: int, eos: int = 1, pad: int = 0) -> ConstraintVocabulary:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 {}[]:,\"_-."
    tokens: list[bytes | None] = [None, None, None] + [bytes([b]) for b in range(256)]
    seen = set(tokens[3:])
    while len(tokens) < size:
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))).encode()
        if t not in seen:
            seen.add(t)
            tokens.append(t)
    return ConstraintVocabulary(tuple(tokens), (eos,), (pad,))


WIDE = {"type": "object", "properties": {f"field_{i}": {"type": "string", "maxLength": 64} for i in range(24)},
        "required": [f"field_{i}" for i in range(24)], "additionalProperties": False}  # cost's larger automaton


def cost(vocab_size: int, steps: int, threads: int, pairs: int = 2, device: str = "cpu", as_json: bool = False
         ) -> None:
    torch.set_num_threads(threads)
    from dgemma.control.moves import moves_of
    vocab = synthetic_vocabulary(vocab_size)
    model, gen, prompt = cost_model(vocab_size, steps, device=device)
    from dgemma.control import dp
    rows = []
    cases = [("JSON object", lambda: Constraint.json_object(vocab), dp.DEVICE_PAIRS),
             ("24 strings of up to 64", lambda: Constraint.from_json_schema(WIDE, vocab), dp.DEVICE_PAIRS)]
    if device != "cpu":  # the canvas is read on the device either way; the forward pass there or on the host
        cases += [("24 strings of up to 64, forward pass on the host", cases[1][1], 1 << 62)]
    for name, make, device_pairs in cases:
        dp.DEVICE_PAIRS = device_pairs
        t = time.perf_counter()
        constraint = make()
        row = {"constraint": name, "states": constraint.num_states, "classes": constraint.num_classes,
               "pairs": len(moves_of(constraint).pair_src), "compile_s": time.perf_counter() - t,
               "ms_without": [], "ms_with": []}
        print(f"vocabulary {vocab_size} on {device}: {name} constraint compiled in {row['compile_s']:.1f} s "
              f"({row['states']} states, {row['classes']} token classes, {row['pairs']} pairs)")
        shortest = constraint.min_tokens_to_accept(constraint.initial_state) + 1  # and its EOS
        canvases = -(-shortest // model.canvas_length)
        for runs in step_cost_pairs(model, gen.replace(max_new_tokens=canvases * model.canvas_length), prompt,
                                    constraint, pairs):
            without, with_ = map(ms_per_step, runs)
            print(f"  without the constraint: {without:7.1f} ms per denoising step", flush=True)
            print(f"  with    the constraint: {with_:7.1f} ms per denoising step", flush=True)
            row["ms_without"].append(without)
            row["ms_with"].append(with_)
        ratios = sorted(w / wo for wo, w in zip(row["ms_without"], row["ms_with"]))
        row["ratio"] = ratios[len(ratios) // 2]
        print(f"  with/without per pair: {', '.join(f'{r:.2f}' for r in ratios)}; median {row['ratio']:.2f}")
        rows.append(row)
    if as_json:
        print(json.dumps({"constrained": {"device": device, "vocab": vocab_size, "steps": steps, "rows": rows}}))


def cost_model(vocab_size: int, steps: int, eos: int = 1, pad: int = 0, device: str = "cpu"):
    """The `small` preset (canvas 256) over `vocab_size` tokens, random weights (bf16 on a GPU), warmed up; a
    generation config of `steps` fixed steps per canvas and a prompt of 128 tokens: what `cost` times."""
    cfg = preset_config("small", vocab_size=vocab_size)
    model = random_model(cfg, std=0.02, seed=0, device=device,
                         dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
    C = model.canvas_length
    gen = default_generation(cfg).replace(max_new_tokens=C, max_denoising_steps=steps,
                                          confidence_threshold=1e-30, eos_token_id=[eos], pad_token_id=pad)
    prompt = [[2] + list(range(300, 427))]
    generate(model, prompt, gen.replace(max_denoising_steps=1))  # warm up
    return model, gen, prompt


def step_cost_pairs(model, gen, prompt, constraint, pairs: int):
    """Yields, `pairs` times, the outputs of a run without `constraint` and of one with it, batch 1, from the same
    seed: the two alternate in this process."""
    for _ in range(pairs):
        yield tuple(generate(model, prompt, gen, generator=torch.Generator(model.device).manual_seed(0),
                             steering=steering) for steering in (None, [Steering(constraint=constraint)]))


def ms_per_step(out) -> float:
    """A run's milliseconds per denoising step: the prefill left out, each canvas's commit in."""
    return (out.stats.seconds - out.stats.prefill_seconds) / out.stats.denoising_steps * 1e3


def tool_compile(vocab_size: int) -> None:
    from dgemma.control.tool_grammar import call_regex, tool_vocabulary
    from dgemma.control.tools import MARKERS

    base = synthetic_vocabulary(vocab_size)
    base = ConstraintVocabulary(base.token_bytes + (None,) * len(MARKERS), base.eos_token_ids, base.pad_token_ids)
    t = time.perf_counter()
    vocab = tool_vocabulary(base, {m: vocab_size + i for i, m in enumerate(MARKERS)})
    made = time.perf_counter()
    constraint = Constraint.from_regex(call_regex([TOOL]), vocab)
    print(f"vocabulary {vocab_size} + {len(MARKERS)} markers: tool vocabulary in {made - t:.2f} s, named-tool "
          f"constraint compiled in {time.perf_counter() - made:.1f} s ({constraint.num_states} states, "
          f"{constraint.num_classes} token classes)")


def cache_hit(vocab_size: int, hits: int) -> None:
    from dgemma.control.thought import after_thought

    vocab = synthetic_vocabulary(vocab_size)
    t = time.perf_counter()
    constraint = Constraint.from_json_schema(SCHEMA, vocab, max_tokens=256)
    print(f"vocabulary {vocab_size}: compiled in {time.perf_counter() - t:.2f} s ({constraint.num_states} states)")
    t = time.perf_counter()
    after_thought(constraint, 0, 2)  # two ids that spell no text stand for the channel markers
    print(f"  after a thought, built once in {(time.perf_counter() - t) * 1e3:.1f} ms")
    for label, ask in (("cache hit", lambda: Constraint.from_json_schema(SCHEMA, vocab, max_tokens=256)),
                       ("cache hit after a thought", lambda: after_thought(
                           Constraint.from_json_schema(SCHEMA, vocab, max_tokens=256), 0, 2))):
        times = []
        for _ in range(hits):
            t = time.perf_counter()
            assert ask() is not None
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        print(f"  {label}: p50 {times[len(times) // 2]:.3f} ms, p99 {times[int(len(times) * 0.99)]:.3f} ms, "
              f"max {times[-1]:.3f} ms over {hits}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["validity", "cost", "tool-compile", "cache-hit"])
    ap.add_argument("--hits", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--kinds", nargs="+", default=["regex", "choice", "schema", "object", "tool"],
                    choices=["regex", "choice", "schema", "object", "tool"])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=2, help="cost: alternating without/with runs")
    ap.add_argument("--device", default="cpu", help="cost: where the model runs (cuda: in bfloat16)")
    ap.add_argument("--json", action="store_true", help="cost: a JSON line of the figures last")
    args = ap.parse_args()
    if args.what == "validity":
        torch.set_num_threads(1)
        validity(args.requests, args.kinds)
    elif args.what == "tool-compile":
        tool_compile(args.vocab)
    elif args.what == "cache-hit":
        cache_hit(args.vocab, args.hits)
    else:
        cost(args.vocab, args.steps, args.threads, args.pairs, args.device, args.json)


if __name__ == "__main__":
    main()
