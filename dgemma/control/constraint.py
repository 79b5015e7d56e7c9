"""A constraint automaton over token ids: regex, JSON schema, any JSON object, or a choice among strings.

A `Constraint` answers, from ANY state, which tokens are allowed and where each one leads, whether the text so
far is complete (`is_final`) and how many more tokens completing it needs at least (`min_tokens_to_accept`).
That is what a diffusion step needs: it scores whole canvases, not one next token after a fixed prefix.

Compiling (`_compile`):
1. The pattern goes to a child process (`_compile_worker.py`: outlines-core's DFA, then our own token walk),
   which we kill at the time limit; the child refuses a DFA with more states than the size limit. The child was
   started ahead of time (spare.py), so it has its imports done.
2. Tokens that lead to the same state from every state share a class: a table (S, K) of next states plus a
   class for each token id (V,) replaces a (S, V) table. JSON-object mode on a 32k vocabulary has K = 206.
3. States that no token sequence reaches, or from which no final state is reachable, are dropped, and the
   tokens into them disallowed, so every allowed token keeps the text completable. `min_tokens_to_accept`
   comes from a BFS toward the final states.
4. End-of-text: an EOS token is allowed only from a final state and leads to the DONE state; from DONE only
   EOS and pad tokens are allowed (and lead back to DONE). DONE is final.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .dfa import distinct_entry_columns, ranges
from .kept import Kept
from .schema import SchemaLimits, schema_to_regex
from .spare import SpareChild
from .vocabulary import ConstraintVocabulary
from ..errors import DgemmaError

_WORKER = Path(__file__).with_name("_compile_worker.py")
_SPARE = SpareChild([sys.executable, str(_WORKER)])  # a compile child started ahead of time
INVALID = -1  # next_state of a token that is not allowed


class ConstraintError(DgemmaError, ValueError):
    """A constraint that cannot be built or satisfied; the message (one line) says why."""


@dataclass(frozen=True)
class CompileLimits:
    """Bounds on compiling one constraint. Exceeding one raises ConstraintError.

    max_states: states of the pattern's minimized DFA (JSON-object mode needs 294).
    timeout_s: wall time of the compiling child process.
    max_memory_mb: address space of the child (a DFA can grow exponentially with the pattern).
    max_table_mb: the token table this process keeps, states x token classes x 4 bytes (JSONSchemaBench's largest
    within 100,000 states, Snowplow sp_334: 55,026 x 1,300, 273 MiB).
    """

    max_states: int = 100_000
    timeout_s: float = 60.0
    max_memory_mb: int = 8192
    max_table_mb: int = 512

    def __post_init__(self):
        for name in ("max_states", "timeout_s", "max_memory_mb", "max_table_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CompileLimits.{name} must be positive, got {getattr(self, name)}")


def _json_text(value, what: str) -> str:
    """`value` as canonical JSON text (a cache key, and what the compiling child reads); ConstraintError naming
    `what` when it is not JSON."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise ConstraintError(f"{what} must be JSON (no NaN, no cycles, not nested too deeply)") from None


def escape_literal(text: str) -> str:
    """`text` as a regex (outlines uses Rust's regex syntax) that matches exactly it."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~" else c for c in text)


class Constraint(Kept):
    """Token-level automaton. States are ints in [0, num_states); `done_state` is the state after EOS.

    Tensors (CPU): `token_class` (V,) int32, the class of each token id; `transitions` (S, K) int32 (whatever
    is given: half the memory of long), the next state per (state, class) or INVALID; `distance` (S,) long, min
    tokens to a final state; `final` (S,) bool. What is made from them once (the DP's layout, a thought's automaton)
    is kept with it by `derived` (kept.py) and counted in `nbytes`.
    """

    def __init__(self, description: str, token_class: torch.Tensor, transitions: torch.Tensor,
                 distance: torch.Tensor, final: torch.Tensor, initial_state: int, done_state: int,
                 vocabulary: ConstraintVocabulary):
        self.description = description
        self.token_class = token_class
        self.transitions = transitions.to(torch.int32)
        self.distance = distance
        self.final = final
        self.initial_state = initial_state
        self.done_state = done_state
        self.vocabulary = vocabulary
        self._keep()

    def __repr__(self) -> str:
        return (f"Constraint({self.description}, states={self.num_states}, classes={self.num_classes}, "
                f"vocab={self.vocab_size})")

    # ---- building

    @classmethod
    def from_regex(cls, pattern: str, vocabulary: ConstraintVocabulary, *, max_tokens: int | None = None,
                   limits: CompileLimits = CompileLimits(), description: str | None = None) -> "Constraint":
        """Text that fully matches `pattern` (Rust regex syntax: no lookaround or backreferences)."""
        if not isinstance(pattern, str):
            raise ConstraintError(f"a regex must be a string, got {type(pattern).__name__}")
        return cls._cached((pattern, limits), {"regex": pattern}, vocabulary, max_tokens, limits,
                           description or f"regex {pattern!r:.60}")

    @classmethod
    def _cached(cls, key, source: dict, vocabulary: ConstraintVocabulary, max_tokens: int | None,
                limits: CompileLimits, description: str) -> "Constraint":
        from .gate import COMPILES, CompileFailure

        constraint = vocabulary.cache.get(key)
        if constraint is None:  # compiled under the gate's bounds; a failure is cached too
            constraint = COMPILES.compiled(key, vocabulary.cache,
                                           lambda: _compile(source, vocabulary, limits, description), description)
        if isinstance(constraint, CompileFailure):
            raise ConstraintError(constraint.message)
        constraint.check_budget(max_tokens)
        return constraint

    @classmethod
    def from_json_schema(cls, schema: dict, vocabulary: ConstraintVocabulary, *, max_tokens: int | None = None,
                         limits: CompileLimits = CompileLimits(),
                         schema_limits: SchemaLimits = SchemaLimits()) -> "Constraint":
        """JSON text valid against `schema` (what dgemma.control.schema enforces). The schema becomes a regex
        inside the compiling child, under the same time and memory limits."""
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
        text = _json_text(schema, "a JSON schema")
        source = {"schema": schema, "schema_limits": dataclasses.asdict(schema_limits)}
        return cls._cached(("json-schema", text, limits, schema_limits), source, vocabulary, max_tokens, limits,
                           "JSON schema")

    @classmethod
    def from_tool_call(cls, functions: list[dict], repeat: bool, vocabulary: ConstraintVocabulary, *,
                       limits: CompileLimits = CompileLimits(), schema_limits: SchemaLimits = SchemaLimits(),
                       description: str = "tool call") -> "Constraint":
        """A reply that is one call of one of `functions` ({"name", "parameters"}), or one or more calls when
        `repeat`, in the Gemma syntax with arguments valid against their parameters (tool_grammar.py); `vocabulary`
        spells the markers (tool_grammar.tool_vocabulary). Written inside the compiling child, as a schema is."""
        functions = [{"name": f["name"], "parameters": f.get("parameters")} for f in functions]
        text = _json_text(functions, "a function's parameters")
        source = {"tool_call": {"functions": functions, "repeat": bool(repeat)},
                  "schema_limits": dataclasses.asdict(schema_limits)}
        return cls._cached(("tool-call", text, bool(repeat), limits, schema_limits), source, vocabulary, None,
                           limits, description)

    @classmethod
    def json_object(cls, vocabulary: ConstraintVocabulary, *, max_tokens: int | None = None,
                    limits: CompileLimits = CompileLimits()) -> "Constraint":
        """Any JSON object (`{"type": "json_object"}`), nested up to outlines' default depth of 2."""
        return cls.from_regex(schema_to_regex({"type": "object"}), vocabulary, max_tokens=max_tokens,
                              limits=limits, description="JSON object")

    @classmethod
    def from_choice(cls, options, vocabulary: ConstraintVocabulary, *, max_tokens: int | None = None,
                    limits: CompileLimits = CompileLimits()) -> "Constraint":
        """Exactly one of the strings in `options`."""
        options = list(options) if not isinstance(options, str) else None
        if not options or not all(isinstance(o, str) for o in options):
            raise ConstraintError("a choice needs a non-empty list of strings")
        pattern = "|".join(f"({escape_literal(o)})" for o in dict.fromkeys(options))
        return cls.from_regex(pattern, vocabulary, max_tokens=max_tokens, limits=limits,
                              description=f"choice of {len(options)}")

    def check_budget(self, max_tokens: int | None) -> None:
        """ConstraintError unless some accepted text and its EOS fit in `max_tokens` tokens (None: no limit): an
        output that stops within its budget, as every constrained output does."""
        if max_tokens is None:
            return
        shortest = self.min_tokens_to_accept(self.initial_state)
        if shortest + 1 > max_tokens:
            raise ConstraintError(f"{self.description}: no accepted text fits in max_tokens={max_tokens} "
                                  f"(the shortest needs {shortest} tokens and EOS)")

    # ---- queries

    @property
    def vocab_size(self) -> int:
        return self.token_class.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held by the tables and what is kept with them (`derived`): what the constraint cache counts."""
        return self.kept_bytes + sum(t.numel() * t.element_size() for t in (self.token_class, self.transitions,
                                                                            self.distance, self.final))

    @property
    def num_states(self) -> int:
        return self.transitions.shape[0]

    @property
    def num_classes(self) -> int:
        return self.transitions.shape[1]

    def allowed_mask(self, state: int) -> torch.Tensor:
        """(V,) bool: the tokens allowed from `state`."""
        return self.transitions[state][self.token_class] != INVALID

    def allowed_tokens(self, state: int) -> torch.Tensor:
        """Sorted token ids allowed from `state` (long)."""
        return self.allowed_mask(state).nonzero().squeeze(1)

    def next_state(self, state: int, token: int) -> int:
        """The state after `token`, or INVALID (-1) when `token` is not allowed from `state`."""
        return int(self.transitions[state, self.token_class[token]])

    def is_final(self, state: int) -> bool:
        """The text so far is complete (EOS is allowed)."""
        return bool(self.final[state])

    def min_tokens_to_accept(self, state: int) -> int:
        """Fewest tokens (not counting EOS) that make the text complete from `state`; 0 in a final state."""
        return int(self.distance[state])

    def walk(self, tokens, state: int | None = None) -> torch.Tensor:
        """(n,) long: the state after each of `tokens` from `state` (default: initial); INVALID from the
        first token that is not allowed onwards."""
        state = self.initial_state if state is None else state
        out = torch.full((len(tokens),), INVALID, dtype=torch.long)
        for i, token in enumerate(torch.as_tensor(tokens).tolist()):
            state = self.next_state(state, token)
            if state == INVALID:
                break
            out[i] = state
        return out


def _run_worker(source: dict, vocabulary: ConstraintVocabulary, limits: CompileLimits, description: str) -> dict:
    """Step 1: the child process, bounded in time, CPU time and memory, and killed with us."""
    token_bytes = [None if t is None else base64.b64encode(t).decode("ascii") for t in vocabulary.token_bytes]
    request = json.dumps({**source, "token_bytes": token_bytes, "max_states": limits.max_states,
                          "max_table_mb": limits.max_table_mb,
                          "max_memory_mb": limits.max_memory_mb, "max_cpu_s": math.ceil(limits.timeout_s) + 1,
                          "ppid": os.getpid()}).encode("utf-8")
    child = _SPARE.take()
    try:
        stdout, stderr = child.communicate(request, timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        raise ConstraintError(f"{description}: compiling took longer than the limit of {limits.timeout_s:g} s"
                              ) from None
    finally:
        if child.poll() is None:  # the time limit, or an exception here (KeyboardInterrupt)
            child.kill()
            child.communicate()
    if child.returncode != 0:
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1] if lines else f"exit status {child.returncode}"
        if child.returncode < 0 or "memory" in last.lower():
            last = f"{last} (memory limit {limits.max_memory_mb} MiB)"
        raise ConstraintError(f"{description}: compiling failed: {last[:300]}")
    head, _, arrays = stdout.partition(b"\n")
    reply = json.loads(head)  # JSON and raw int32 arrays, not pickle: nothing is unpickled
    if "error" in reply:
        raise ConstraintError(reply["error"] if reply.get("schema_error") else f"{description}: {reply['error']}")
    sizes = [4 * reply["num_entries"]] * 3 + [4 * vocabulary.vocab_size]  # state, class, next; token_class
    if len(arrays) != sum(sizes):
        raise ConstraintError(f"{description}: compiling failed: a truncated reply")
    for key, start, size in zip(("state", "class", "next", "token_class"), np.cumsum([0] + sizes[:-1]), sizes):
        reply[key] = arrays[start:start + size]
    return reply


def _state_pairs(src: np.ndarray, dst: np.ndarray, num_states: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (state, next state) pairs of the table's entries, sorted by state."""
    codes = np.sort(src * num_states + dst)  # sorted, then duplicates dropped: quicker than np.unique here
    codes = codes[np.append(True, codes[1:] != codes[:-1])] if len(codes) else codes
    return codes // num_states, codes % num_states


def _bfs(pairs: tuple[np.ndarray, np.ndarray], num_states: int, sources: np.ndarray, backward: bool
         ) -> np.ndarray:
    """(S,) int64: BFS distance in tokens from `sources` over the (state, next state) pairs (backward: to
    `sources`); -1 where unreachable. Each state's pairs are read once."""
    src, dst = pairs
    if backward:
        order = np.argsort(dst, kind="stable")
        src, dst = dst[order], src[order]
    start = np.searchsorted(src, np.arange(num_states + 1))
    dist = np.full(num_states, -1, dtype=np.int64)
    dist[sources] = 0
    level, d = np.asarray(sources), 0
    while level.size:
        d += 1
        count = start[level + 1] - start[level]
        index = ranges(start[level], count)
        reached = np.unique(dst[index])
        level = reached[dist[reached] < 0]
        dist[level] = d
    return dist


def _compile(source: dict, vocabulary: ConstraintVocabulary, limits: CompileLimits, description: str
             ) -> Constraint:
    return from_reply(_run_worker(source, vocabulary, limits, description), vocabulary, description, limits)


def from_reply(reply: dict, vocabulary: ConstraintVocabulary, description: str,
               limits: CompileLimits = CompileLimits()) -> Constraint:
    """Steps 2-4 in this process, over the child's reply (its arrays as int32 bytes or arrays); ConstraintError
    before the token table is made when it would pass `limits.max_table_mb`."""
    src, cls, dst = (np.frombuffer(reply[key], dtype=np.int32).astype(np.int64) for key in ("state", "class", "next"))
    worker_class = np.frombuffer(reply["token_class"], dtype=np.int32)
    finals = np.asarray(reply["finals"], dtype=np.int64)
    num_states, num_classes = reply["num_states"], reply["num_classes"]

    # 3. drop states that cannot reach a final state, and the transitions into them
    pairs = _state_pairs(src, dst, num_states)
    dist = _bfs(pairs, num_states, finals, backward=True)
    if dist[reply["initial"]] < 0:
        raise ConstraintError(f"{description}: no text the tokenizer can spell satisfies it")
    alive = (dist >= 0) & (_bfs(pairs, num_states, np.array([reply["initial"]]), backward=False) >= 0)
    num_live = int(alive.sum())
    new_id = np.full(num_states, -1, dtype=np.int64)
    new_id[np.flatnonzero(alive)] = np.arange(num_live)
    dist, initial = dist[alive], int(new_id[reply["initial"]])
    final = np.zeros(num_live + 1, dtype=bool)
    final[new_id[finals[alive[finals]]]] = True
    kept = alive[src] & alive[dst]  # a state that went is not allowed
    src, cls, dst = new_id[src[kept]], cls[kept], new_id[dst[kept]]

    # 4. the DONE state (the last row) and four more columns: tokens that spell no text (the child's class K),
    # EOS (from every final state to DONE), pad (DONE to DONE), and never allowed
    done = num_live
    final[done] = True
    ends = np.flatnonzero(final)
    src = np.concatenate([src, ends, [done]])
    cls = np.concatenate([cls, np.full(len(ends), num_classes + 1), [num_classes + 2]])
    dst = np.concatenate([dst, np.full(len(ends) + 1, done)])
    dist = np.append(dist, 0)

    # 2. classes that became alike once dead states went, merged with the special columns
    first, column_class = distinct_entry_columns(src, cls, dst, num_classes + 4)
    eos_class, pad_class = column_class[num_classes + 1:num_classes + 3]
    token_class = column_class[worker_class]
    token_class[list(vocabulary.pad_token_ids)] = pad_class
    token_class[list(vocabulary.eos_token_ids)] = eos_class
    table_mb = 4 * (num_live + 1) * len(first) / 2**20
    if table_mb > limits.max_table_mb:
        raise ConstraintError(f"{description}: its token table needs {table_mb:,.0f} MiB ({num_live + 1:,} states x "
                              f"{len(first):,} token classes), more than the limit of {limits.max_table_mb:,} MiB")
    table = np.full((num_live + 1, len(first)), INVALID, dtype=np.int32)  # (S, K): what the DP reads
    table[src, column_class[cls]] = dst

    return Constraint(description, torch.from_numpy(token_class.astype(np.int32)), torch.from_numpy(table),
                      torch.from_numpy(dist), torch.from_numpy(final), initial, done, vocabulary)
