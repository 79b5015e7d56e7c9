"""JSONSchemaBench: which share of real-world JSON schemas each library compiles, and how fast.

    python benchmarks/jsonschemabench.py --data DIR --library dgemma [--per-subset 60] [--vocab 32000]
        [--timeout 10] [--subsets Glaiveai2K Kubernetes ...] [--out results.json]

DIR is the `data/` folder of github.com/guidance-ai/jsonschemabench (one folder per subset, one schema per file;
fetch it yourself, nothing is downloaded here). --library is one of:
- dgemma: `Constraint.from_json_schema` (dgemma's schema walker, then the token automaton over the vocabulary);
- dgemma-regex: dgemma's schema walker alone (`schema_to_regex`): which schemas it takes, without the automaton;
- dgemma-tool-regex: the same walker writing the schema as a forced tool call's `parameters`
  (`tool_grammar.arguments_regex`, the Gemma call syntax; a schema not of type object is refused);
- outlines: outlines-core's `build_regex_from_schema`, then the same token automaton (what dgemma would do with
  outlines' own schema walker, which drops keywords it does not know);
- llguidance: `LLMatcher(tokenizer, grammar_from_json_schema(schema))` without error;
- xgrammar: `GrammarCompiler.compile_json_schema` (cache off, one thread).
The tokenizer is a byte-level BPE of --vocab tokens trained on the benchmark's own schema files (cached next to
DIR), the same one for every library. Each subset is sampled (--per-subset files, seed 0, the same files for every
library; 0 = all). Files that are not JSON objects are left out and counted. Each schema compiles in a worker
process, killed and restarted when one takes longer than --timeout seconds (that schema fails). Printed per
subset: files sampled, the share that compiles, compile time p50/p95 over those that compile, and the most common
refusals.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import time
from pathlib import Path


def tokenizer_path(data: Path, vocab: int) -> Path:
    """A byte-level BPE of `vocab` tokens trained on the schema files (built once, then cached)."""
    path = data.parent / f"tokenizer-{vocab}.json"
    if path.exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = sorted(str(p) for p in data.glob("*/*.json"))
    tok.train(files, trainer)
    tok.save(str(path))
    return path


class Compiler:
    """One library, set up once per worker: `compile(schema)` raises on refusal."""

    def __init__(self, library: str, tokenizer_file: str, timeout: float):
        from tokenizers import Tokenizer
        self.library = library
        tok = Tokenizer.from_file(tokenizer_file)
        eos, pad = tok.token_to_id("<eos>"), tok.token_to_id("<pad>")
        if library == "dgemma-regex":
            from dgemma.control.schema import schema_to_regex
            self.schema_to_regex = schema_to_regex
        elif library == "dgemma-tool-regex":
            from dgemma.control.tool_grammar import arguments_regex
            self.schema_to_regex = arguments_regex
        elif library in ("dgemma", "outlines"):
            from dgemma.control import CompileLimits, Constraint, ConstraintVocabulary
            self.vocab = ConstraintVocabulary.from_tokenizer(tok, [eos], [pad])
            self.limits = CompileLimits(timeout_s=timeout * 2)
            self.constraint = Constraint
        elif library == "llguidance":
            import llguidance
            self.ll = llguidance
            self.lltok = llguidance.LLTokenizer(tok.to_str(), eos_token=eos)
        elif library == "xgrammar":
            import xgrammar
            from transformers import PreTrainedTokenizerFast
            info = xgrammar.TokenizerInfo.from_huggingface(
                PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>"), vocab_size=tok.get_vocab_size())
            self.xgr = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        else:
            raise SystemExit(f"unknown library {library!r}")

    def compile(self, schema: dict) -> None:
        if self.library in ("dgemma-regex", "dgemma-tool-regex"):
            self.schema_to_regex(schema)
        elif self.library == "dgemma":
            self.constraint.from_json_schema(schema, self.vocab, limits=self.limits)
        elif self.library == "outlines":
            from outlines_core.json_schema import build_regex_from_schema
            regex = build_regex_from_schema(json.dumps(schema))
            self.constraint.from_regex(regex, self.vocab, limits=self.limits)
        elif self.library == "llguidance":
            matcher = self.ll.LLMatcher(self.lltok, self.ll.LLMatcher.grammar_from_json_schema(schema))
            if matcher.is_error():
                raise ValueError(matcher.get_error())
        else:
            self.xgr.compile_json_schema(json.dumps(schema))


def serve(run) -> None:
    """A worker's loop: reads schema file paths on stdin, writes `run(schema)` (a dict) plus its seconds as one JSON
    line each. An exception is a failure: {"ok": False, "error": its type and first 160 characters}."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        schema = json.loads(Path(line.strip()).read_text())
        start = time.perf_counter()
        try:
            result = run(schema)
        except BaseException as err:  # pyo3 panics are BaseException
            if isinstance(err, KeyboardInterrupt):
                raise
            result = {"ok": False, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"}
        result["seconds"] = time.perf_counter() - start
        print(json.dumps(result), flush=True)


def worker(library: str, tokenizer_file: str, timeout: float) -> None:
    compiler = Compiler(library, tokenizer_file, timeout)
    serve(lambda schema: compiler.compile(schema) or {"ok": True})


class Pool:
    """A worker process (`command`, which answers with `serve`); killed and restarted when one schema takes longer
    than `timeout` seconds."""

    def __init__(self, command: list[str], timeout: float):
        self.command = command
        self.timeout = timeout
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def run(self, path: Path) -> dict:
        import select
        if self.proc is None:
            self.start()
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"ok": False, "error": f"timeout ({self.timeout:g} s)", "seconds": self.timeout}
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.proc = None
            return {"ok": False, "error": "worker died", "seconds": 0.0}
        return json.loads(line)


def sample(data: Path, subset: str, per_subset: int) -> tuple[list[Path], int]:
    """The subset's sampled files that hold a JSON object, and how many files the subset has in all."""
    files = sorted((data / subset).glob("*.json"))
    usable = []
    for path in files:
        try:
            if isinstance(json.loads(path.read_text()), dict):
                usable.append(path)
        except (ValueError, UnicodeDecodeError):
            pass
    if per_subset and per_subset < len(usable):
        usable = sorted(random.Random(0).sample(usable, per_subset))
    return usable, len(files)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--library", choices=["dgemma", "dgemma-regex", "dgemma-tool-regex", "outlines", "llguidance",
                                                   "xgrammar"])
    parser.add_argument("--per-subset", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--subsets", nargs="*")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker")
    parser.add_argument("--tokenizer")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.tokenizer, args.timeout)
    tokenizer_file = tokenizer_path(args.data, args.vocab)
    pool = Pool([sys.executable, __file__, "--worker", args.library, "--tokenizer", str(tokenizer_file),
                 "--timeout", str(args.timeout)], args.timeout)
    subsets = args.subsets or sorted(p.name for p in args.data.iterdir() if p.is_dir())
    report = {}
    print(f"{args.library}, vocab {args.vocab}, timeout {args.timeout:g} s, per subset {args.per_subset or 'all'}")
    print(f"{'subset':18} {'files':>6} {'sample':>6} {'compiles':>9} {'p50 s':>7} {'p95 s':>7}  top refusals")
    for subset in subsets:
        paths, total = sample(args.data, subset, args.per_subset)
        results = [pool.run(p) for p in paths]
        times = [r["seconds"] for r in results if r["ok"]]
        errors = collections.Counter(r["error"][:70] for r in results if not r["ok"])
        share = len(times) / max(1, len(results))
        report[subset] = {"files": total, "sample": len(results), "compiles": share,
                          "p50_s": percentile(times, 0.5), "p95_s": percentile(times, 0.95),
                          "results": {p.name: r for p, r in zip(paths, results)}}
        top = "; ".join(f"{n}x {e}" for e, n in errors.most_common(2))
        print(f"{subset:18} {total:6} {len(results):6} {share:9.1%} {percentile(times, .5):7.3f} "
              f"{percentile(times, .95):7.3f}  {top}", flush=True)
    done = [r for s in report.values() for r in s["results"].values()]
    print(f"{'all':18} {'':6} {len(done):6} {sum(r['ok'] for r in done) / max(1, len(done)):9.1%}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
