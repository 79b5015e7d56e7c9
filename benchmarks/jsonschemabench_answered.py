"""JSONSchemaBench, answered: for which share of real-world JSON schemas dgemma returns output that validates.

    python benchmarks/jsonschemabench_answered.py --data DIR [--per-subset 10] [--max-tokens 512] [--canvas 64]
        [--steps 8] [--timeout 10] [--subsets Glaiveai2K Kubernetes ...] [--only Subset/file.json ...]
        [--tool-call] [--out results.json] [--log progress.jsonl]

DIR is the `data/` folder of github.com/guidance-ai/jsonschemabench (fetch it yourself; nothing is downloaded here).
Each schema goes through dgemma's real path: `Constraint.from_json_schema` under `CompileLimits(timeout_s=--timeout)`,
then `generate` with the constraint as the row's steering and `max_new_tokens=--max-tokens`, on a random-weight `tiny`
DiffusionGemma (weights std 0.3, seed 0) built in-process over the byte-level BPE of 32,000 tokens that
jsonschemabench.py trains on the data (the same tokenizer file), canvas --canvas, at most --steps denoising steps per
canvas, a fixed prompt, seed 0. The output's bytes (up to its EOS) are decoded as UTF-8, parsed as JSON and validated
with jsonschema under the schema's own draft, format checking on; that needs the format checkers of
`jsonschema[format-nongpl]`, and the script stops if date-time, uri or hostname would go unchecked.

Each schema has exactly one outcome:
- refused: the schema writer refuses it (a keyword it cannot enforce, a bound past its limits): a 400 naming it;
- too big: past a size limit (the regex's characters, the automaton's states, the compile's memory): a 400;
- timeout: compiling took longer than --timeout seconds: a 400;
- no fit: even the shortest valid output and its EOS need more than --max-tokens tokens: a 400 up front;
- valid: answered, and the output validates (what counts as answered);
- INVALID: answered, but the output does not validate, is not JSON or UTF-8, or finished with "length" (a bug);
- error: any other exception (a bug).
INVALID and error outcomes are printed with their file names. llguidance's compile rate on the same files
(`LLMatcher(tokenizer, grammar_from_json_schema(schema))` without error, as jsonschemabench.py counts it) is printed
beside, when llguidance is installed, then the p50 seconds of compiling and of generating. Files are sampled as
jsonschemabench.py samples them (seed 0, --per-subset per subset, the same files for the same size; 0 = all;
--only names files instead), and a schema runs in a worker process that is killed (outcome error) if one schema
takes longer than --timeout + 300 s in all.

With --tool-call each schema is a function's `parameters` instead, as a forced tool call sends it
(`Constraint.from_tool_call`, the Gemma call syntax over the tokenizer with the three tool marker tokens added): the
output must be exactly one call (`split_tool_calls`), whose arguments validate. A schema that is not of type object
cannot be a function's parameters: refused.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from jsonschemabench import Pool, percentile, sample, serve, tokenizer_path  # noqa: E402

OUTCOMES = ["refused", "too big", "timeout", "no fit", "valid", "INVALID", "error"]
PROMPT = "Reply with one JSON value that follows the schema."
MUST_CHECK = ("date-time", "uri", "hostname", "duration", "time")  # formats jsonschema skips without its extras


def check_formats() -> None:
    """Stop unless jsonschema can check the formats the writer writes (some need jsonschema's extras)."""
    import jsonschema
    missing = [f for f in MUST_CHECK if f not in jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers]
    if missing:
        raise SystemExit(f"jsonschema would not check the formats {missing}: pip install 'jsonschema[format-nongpl]'")


def validator_for(schema: dict):
    """jsonschema's validator for the schema's own draft (2020-12 when it names none), format checking on."""
    import jsonschema
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


class Answerer:
    """The tokenizer, constraint vocabulary and random model, built once per worker."""

    def __init__(self, tokenizer_file: str, args):
        import torch
        from tokenizers import Tokenizer
        from dgemma.control import CompileLimits, ConstraintVocabulary
        from dgemma.presets import default_generation, preset_config, random_model

        tok = Tokenizer.from_file(tokenizer_file)
        self.eos, pad = tok.token_to_id("<eos>"), tok.token_to_id("<pad>")
        self.tool_call = args.tool_call
        if self.tool_call:
            from dgemma.control.tool_grammar import tool_vocabulary
            from dgemma.control.tools import MARKERS
            tok.add_special_tokens(list(MARKERS))
        self.vocab = ConstraintVocabulary.from_tokenizer(tok, [self.eos], [pad])
        if self.tool_call:
            self.vocab = tool_vocabulary(self.vocab, {m: tok.token_to_id(m) for m in MARKERS})
        cfg = preset_config("tiny", canvas_length=args.canvas, vocab_size=tok.get_vocab_size(),
                            eos_token_id=[self.eos], pad_token_id=pad)
        self.model = random_model(cfg, std=0.3, seed=0)
        self.gen = default_generation(cfg).replace(max_denoising_steps=args.steps, max_new_tokens=args.max_tokens)
        self.limits = CompileLimits(timeout_s=args.timeout)
        self.max_tokens = args.max_tokens
        self.prompt = tok.encode(PROMPT).ids
        self.torch = torch
        try:
            import llguidance
            self.llg = (llguidance, llguidance.LLTokenizer(tok.to_str(), eos_token=self.eos))
        except ImportError:
            self.llg = None

    def llguidance_compiles(self, schema: dict) -> bool | None:
        if self.llg is None:
            return None
        llguidance, lltok = self.llg
        try:
            return not llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema)).is_error()
        except BaseException as err:  # pyo3 panics are BaseException
            if isinstance(err, KeyboardInterrupt):
                raise
            return False

    def answer(self, schema: dict) -> dict:
        import time
        from dgemma.control import Constraint, ConstraintError
        from dgemma.control.pins import Steering
        from dgemma.generate import generate

        result = {"llguidance": self.llguidance_compiles(schema)}
        start = time.perf_counter()
        try:
            if self.tool_call:
                constraint = Constraint.from_tool_call([{"name": "f", "parameters": schema}], False, self.vocab,
                                                       limits=self.limits)
            else:
                constraint = Constraint.from_json_schema(schema, self.vocab, limits=self.limits)
        except ConstraintError as err:
            return {**result, "outcome": compile_outcome(str(err)), "detail": " ".join(str(err).split())[:160]}
        result.update(compile_s=time.perf_counter() - start, states=constraint.num_states)
        shortest = constraint.min_tokens_to_accept(constraint.initial_state)
        if shortest + 1 > self.max_tokens:
            return {**result, "outcome": "no fit", "detail": f"the shortest valid output needs {shortest} tokens"}
        start = time.perf_counter()
        out = generate(self.model, [self.prompt], self.gen, generator=self.torch.Generator().manual_seed(0),
                       steering=[Steering(constraint=constraint)])
        result.update(generate_s=time.perf_counter() - start, tokens=len(out.token_ids[0]))
        problem = self.check(schema, out.token_ids[0], out.finish_reasons[0])
        return {**result, "outcome": "INVALID" if problem else "valid", "detail": problem}

    def check(self, schema: dict, ids: list[int], reason: str) -> str | None:
        """None when the output is complete and validates; else what is wrong with it."""
        if reason != "stop" or not ids or ids[-1] != self.eos or self.eos in ids[:-1]:
            return f"finish_reason {reason!r}, {len(ids)} tokens"
        text = b"".join(self.vocab.token_bytes[i] or b"" for i in ids[:-1])
        try:
            value = self.tool_arguments(text.decode("utf-8")) if self.tool_call else json.loads(text.decode("utf-8"))
        except ValueError as err:
            return f"not {'one call' if self.tool_call else 'JSON'} ({err}): {text[:120]!r}"
        error = next(iter(validator_for(schema).iter_errors(value)), None)
        if error is not None:
            return f"{'/'.join(map(str, error.absolute_path))}: {error.message[:120]} in {text[:200]!r}"
        return None


    @staticmethod
    def tool_arguments(text: str) -> dict:
        """The arguments of the one call `text` (markers spelled as their sentinels) makes; ValueError else."""
        from dgemma.control.tools import SENTINEL, split_tool_calls
        marks = {sentinel: marker for marker, sentinel in SENTINEL.items()}
        content, calls = split_tool_calls("".join(marks.get(c, c) for c in text))
        if content or len(calls) != 1:
            raise ValueError(f"{len(calls)} calls and content {content[:40]!r}")
        return calls[0].arguments


def compile_outcome(message: str) -> str:
    if "took longer than the limit" in message:
        return "timeout"
    if any(k in message for k in ("regex passes the limit", "automaton states, more than", "memory limit",
                                  "token table needs")):
        return "too big"
    return "refused"


def tally(files: int, results: list[dict]) -> dict:
    """A table row: the outcomes' counts, the share answered, llguidance's share, compile and generate p50."""
    counts = collections.Counter(r.get("outcome", "error") for r in results)
    llg = [r["llguidance"] for r in results if r.get("llguidance") is not None]
    return {"files": files, "sample": len(results), **{o: counts[o] for o in OUTCOMES},
            "answered": counts["valid"] / max(1, len(results)), "llguidance": sum(llg) / len(llg) if llg else None,
            "compile_p50_s": percentile([r["compile_s"] for r in results if "compile_s" in r], 0.5),
            "generate_p50_s": percentile([r["generate_s"] for r in results if "generate_s" in r], 0.5)}


def format_row(name: str, row: dict) -> str:
    llg = "" if row["llguidance"] is None else f"{row['llguidance']:.0%}"
    return (f"{name:16} {row['files']:>6} {row['sample']:>6} " + " ".join(f"{row[o]:>7}" for o in OUTCOMES) +
            f" {row['answered']:>9.0%} {llg:>6} {row['compile_p50_s']:>8.2f} {row['generate_p50_s']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--per-subset", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--subsets", nargs="*")
    parser.add_argument("--only", nargs="+", help="answer these files (Subset/name.json) instead of a sample")
    parser.add_argument("--tool-call", action="store_true", help="each schema as a forced tool call's parameters")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--log", type=Path, help="append one JSON line per schema as it finishes")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--tokenizer")
    args = parser.parse_args()
    check_formats()
    if args.worker:
        return serve(Answerer(args.tokenizer, args).answer)
    tokenizer_file = tokenizer_path(args.data, args.vocab)
    pool = Pool([sys.executable, __file__, "--worker", "--tokenizer", str(tokenizer_file)] + sys.argv[1:],
                args.timeout + 300)
    subsets = args.subsets or sorted(p.name for p in args.data.iterdir() if p.is_dir())
    chosen = collections.defaultdict(list)  # --only: subset -> its files
    for name in args.only or []:
        subset, _, file = name.partition("/")
        chosen[subset].append(args.data / subset / file)
    print(("forced tool calls, " if args.tool_call else "") +
          f"vocab {args.vocab}, max_tokens {args.max_tokens}, canvas {args.canvas}, steps {args.steps}, "
          f"compile limit {args.timeout:g} s, " +
          (f"{len(args.only)} named files" if chosen else f"per subset {args.per_subset or 'all'} (seed 0)"))
    print(f"{'subset':16} {'files':>6} {'sample':>6} " + " ".join(f"{o:>7}" for o in OUTCOMES) +
          f" {'answered':>9} {'llg':>6} {'compile':>8} {'generate':>8}")
    report, bugs = {}, []
    for subset in chosen or subsets:
        paths, total = (chosen[subset], len(list((args.data / subset).glob("*.json")))) if chosen else \
            sample(args.data, subset, args.per_subset)
        results = []
        for path in paths:
            results.append(pool.run(path))
            if args.log:
                with args.log.open("a") as log:
                    log.write(json.dumps({"subset": subset, "file": path.name, **results[-1]}) + "\n")
        report[subset] = {**tally(total, results), "results": {p.name: r for p, r in zip(paths, results)}}
        print(format_row(subset, report[subset]), flush=True)
        bugs += [f"{r.get('outcome', 'error')}: {subset}/{p.name}: {r.get('detail') or r.get('error')}"
                 for p, r in zip(paths, results) if r.get("outcome", "error") in ("INVALID", "error")]
    everything = [r for row in report.values() for r in row["results"].values()]
    print(format_row("all", tally(sum(row["files"] for row in report.values()), everything)))
    print("\n".join(bugs))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
