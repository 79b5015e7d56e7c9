"""Where compiling a JSON schema into a token automaton spends its time, stage by stage, over JSONSchemaBench.

    python benchmarks/compile_profile.py --data DIR [--per-subset 8] [--vocab 32000] [--timeout 60]
        [--pad-vocab 262144] [--e2e ROOT ...] [--files FILE ...] [--out profile.json]

DIR is JSONSchemaBench's `data/` folder, sampled as benchmarks/jsonschemabench.py samples it (seed 0, the same
files; --files: those schema files instead), with the same byte-level BPE (--pad-vocab: padded with synthetic
tokens, for the 262k figures). Each schema runs in a worker process that reports each stage as it ends and is killed after --timeout seconds (the
stage it was in is then the one that timed out). Stages:
- regex: the schema writer (`schema_to_regex`);
- dfa: the regex's byte DFA (outlines-core's `Index` over the 256 single bytes, read with `get_transitions()`);
- minimize: the minimal DFA (dgemma.control.dfa);
- tokens: the token walk and token classes (`token_automaton`);
- parent: what the server's process does with the child's tables (pruning, EOS, classes: `constraint.from_reply`).
Printed: per schema and per stage, p50/p95/max of each stage's seconds over the schemas that finished it, the
regex length and the DFA's states before and after minimizing, and the share that finished within 10 s and
within --timeout.

With --e2e ROOT ..., each ROOT is a dgemma source tree (for example an older commit, `git archive`d), and the
one stage timed is the whole `Constraint.from_json_schema` (compile child, limits and all, CompileLimits with
twice --timeout, as benchmarks/jsonschemabench.py sets them), the trees alternating schema by schema.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jsonschemabench import percentile, sample, tokenizer_path  # noqa: E402

STAGES = ("regex", "dfa", "minimize", "tokens", "parent")


def padded(vocab, size: int):
    """The vocabulary padded to `size` ids with structured_output.py's synthetic tokens (random short strings of
    letters, digits and JSON punctuation), as our 262k figures are measured."""
    from dgemma.control import ConstraintVocabulary
    from structured_output import synthetic_vocabulary
    seen = set(vocab.token_bytes)
    extra = [t for t in synthetic_vocabulary(size + 40_000).token_bytes if t is not None and t not in seen]
    return ConstraintVocabulary(tuple([*vocab.token_bytes, *extra[:size - vocab.vocab_size]]), vocab.eos_token_ids,
                                vocab.pad_token_ids)


def worker(mode: str, tokenizer_file: str, timeout: float, pad_vocab: int) -> None:
    """Reads schema paths on stdin; writes one JSON line per finished stage, then {"done": ...}."""
    from tokenizers import Tokenizer
    from dgemma.control import CompileLimits, ConstraintVocabulary
    tok = Tokenizer.from_file(tokenizer_file)
    vocab = ConstraintVocabulary.from_tokenizer(tok, [tok.token_to_id("<eos>")], [tok.token_to_id("<pad>")])
    if pad_vocab > vocab.vocab_size:
        vocab = padded(vocab, pad_vocab)
    print(json.dumps({"ready": True}), flush=True)
    if mode == "e2e":
        return _e2e_worker(vocab, CompileLimits(timeout_s=2 * timeout))
    from dgemma.control import _compile_worker as cw
    from dgemma.control.constraint import from_reply
    from dgemma.control.schema import SchemaError, schema_to_regex
    for line in sys.stdin:
        schema = json.loads(Path(line.strip()).read_text())

        def stage(name, fn, *args):
            start = time.perf_counter()
            out = fn(*args)
            print(json.dumps({"stage": name, "seconds": time.perf_counter() - start}), flush=True)
            return out
        try:
            regex = stage("regex", schema_to_regex, schema)
            print(json.dumps({"regex_chars": len(regex)}), flush=True)
            table, initial, finals = stage("dfa", cw.byte_dfa, regex)
            print(json.dumps({"dfa_states": table.shape[0]}), flush=True)
            table, initial, finals = stage("minimize", cw.minimize, table, initial, finals)
            print(json.dumps({"min_states": table.shape[0]}), flush=True)
            if table.shape[0] > CompileLimits().max_states:
                raise ValueError(f"{table.shape[0]} states, more than the limit")
            reply = stage("tokens", cw.token_automaton, table, initial, finals, vocab.token_bytes)
            if "error" not in reply:
                stage("parent", from_reply, reply, vocab, "JSON schema")
            print(json.dumps({"done": "error" not in reply, "classes": reply.get("num_classes"),
                              "error": reply.get("error")}), flush=True)
        except (SchemaError, ValueError, MemoryError) as err:
            print(json.dumps({"done": False, "error": f"{type(err).__name__}: {str(err)[:100]}"}), flush=True)


def _e2e_worker(vocab, limits) -> None:
    from dgemma.control import Constraint, ConstraintError
    for line in sys.stdin:
        schema = json.loads(Path(line.strip()).read_text())
        start = time.perf_counter()
        try:
            constraint = Constraint.from_json_schema(schema, vocab, limits=limits)
        except ConstraintError as err:
            print(json.dumps({"done": False, "error": f"{type(err).__name__}: {str(err)[:100]}"}), flush=True)
            continue
        print(json.dumps({"stage": "compile", "seconds": time.perf_counter() - start}), flush=True)
        print(json.dumps({"done": True, "min_states": constraint.num_states, "classes": constraint.num_classes}),
              flush=True)


class Worker:
    def __init__(self, root: Path | None, tokenizer_file: Path, timeout: float, pad_vocab: int):
        mode = "stages" if root is None else "e2e"
        self.command = [sys.executable, __file__, "--worker", mode, "--tokenizer", str(tokenizer_file),
                        "--timeout", str(timeout), "--pad-vocab", str(pad_vocab)]
        self.env = None if root is None else {**os.environ, "PYTHONPATH": str(root)}
        self.timeout, self.proc = timeout, None

    def run(self, path: Path) -> dict:
        if self.proc is None:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         env=self.env)
            self.lines = queue.Queue()
            threading.Thread(target=_pump, args=(self.proc.stdout, self.lines), daemon=True).start()
            assert json.loads(self.lines.get())["ready"]
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        result, start = {"stages": {}}, time.perf_counter()
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, self.timeout - (time.perf_counter() - start)))
            except queue.Empty:
                line = None
            if not line:
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                result.update(done=False, error="timeout" if line is None else "worker died")
                break
            item = json.loads(line)
            if "stage" in item:
                result["stages"][item["stage"]] = item["seconds"]
            else:
                result.update(item)
            if "done" in item:
                break
        result["seconds"] = sum(result["stages"].values()) if result["done"] else None
        return result


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")


def summarize(name: str, results: list[dict], stages: tuple[str, ...]) -> None:
    n = len(results)
    done = [r for r in results if r["done"]]
    refused = [r for r in results if not r["done"] and r.get("error") != "timeout"]
    timeouts = [r for r in results if r.get("error") == "timeout"]
    print(f"\n{name}: {n} schemas; finished {len(done)}, refused {len(refused)}, timed out {len(timeouts)}"
          f" (in stage: {', '.join(_stage_of(r, stages) for r in timeouts) or '-'})")
    within = sum(1 for r in done if r["seconds"] <= 10)
    print(f"  finished within 10 s: {within}/{n} = {within / max(1, n):.1%} of all, "
          f"{within / max(1, n - len(refused)):.1%} of those not refused")
    print(f"  {'stage':10} {'n':>4} {'p50 s':>8} {'p95 s':>8} {'max s':>8} {'total s':>8}")
    for stage in stages:
        times = [r["stages"][stage] for r in results if stage in r["stages"]]
        print(f"  {stage:10} {len(times):4} {percentile(times, .5):8.3f} {percentile(times, .95):8.3f} "
              f"{max(times, default=float('nan')):8.3f} {sum(times):8.1f}")
    totals = [r["seconds"] for r in done]
    print(f"  {'all':10} {len(totals):4} {percentile(totals, .5):8.3f} {percentile(totals, .95):8.3f} "
          f"{max(totals, default=float('nan')):8.3f} {sum(totals):8.1f}")
    for key in ("regex_chars", "dfa_states", "min_states", "classes"):
        values = [r[key] for r in results if r.get(key) is not None]
        print(f"  {key:12} n={len(values):3} p50 {percentile(values, .5):>9} p95 {percentile(values, .95):>9} "
              f"max {max(values, default=0):>9}")


def _stage_of(result: dict, stages: tuple[str, ...]) -> str:
    return next((s for s in stages if s not in result["stages"]), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--per-subset", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pad-vocab", type=int, default=0, help="pad the BPE with synthetic tokens to this size")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--e2e", nargs="+", type=Path, help="dgemma source trees to time end to end")
    parser.add_argument("--subsets", nargs="*")
    parser.add_argument("--files", nargs="+", type=Path, help="these schema files instead of the sample")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker")
    parser.add_argument("--tokenizer")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.tokenizer, args.timeout, args.pad_vocab)
    tokenizer_file = tokenizer_path(args.data, args.vocab)
    roots = args.e2e or [None]
    names = ["stages"] if args.e2e is None else [str(r) for r in roots]
    workers = {n: Worker(r, tokenizer_file, args.timeout, args.pad_vocab) for n, r in zip(names, roots)}
    subsets = args.subsets or sorted(p.name for p in args.data.iterdir() if p.is_dir())
    paths = args.files or [p for s in subsets for p in sample(args.data, s, args.per_subset)[0]]
    print(f"{len(paths)} schemas, vocab {max(args.vocab, args.pad_vocab)}, timeout {args.timeout:g} s, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results = {n: {} for n in names}
    stages = STAGES if args.e2e is None else ("compile",)
    for path in paths:
        for name, w in workers.items():
            r = results[name][f"{path.parent.name}/{path.name}"] = w.run(path)
            print(f"{name[-12:]:12} {path.parent.name + '/' + path.name:56.56} "
                  + " ".join(f"{s}={r['stages'][s]:.3f}" for s in stages if s in r["stages"])
                  + f" chars={r.get('regex_chars')} states={r.get('dfa_states')}->{r.get('min_states')}"
                  + ("" if r["done"] else f" FAIL {r.get('error', '')[:60]}"), flush=True)
    for name in names:
        summarize(name, list(results[name].values()), stages)
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
