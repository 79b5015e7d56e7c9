"""Compile a regular expression into a token automaton, in a child process.

Run as a script (`python _compile_worker.py`), never imported by dgemma: the parent kills it when the time limit
passes, which is the only way to stop a regex whose DFA grows exponentially inside Rust. It reads one JSON
request on stdin and writes one JSON reply on stdout (bytes as base64); it imports only outlines_core, numpy and
dgemma.control's dfa and schema.

outlines-core builds the regex's DFA; we walk the tokens through it ourselves, because outlines' token index
walks every token from every state one byte at a time (about 100 s for JSON-object mode on a 262k vocabulary).
1. outlines' index over the 256 single bytes: the byte-level DFA (S, 256), counting a byte into a state that
   can neither match nor go on as dead, as outlines does; then minimized (dfa.minimize: Moore, hashed), which the size limit counts.
2. Bytes no state tells apart form byte classes; tokens spelled alike in byte classes form one group.
3. The groups' spellings form a trie; a chunk of states walks down it together, one trie level at a time, so
   shared prefixes are walked once: (S, trie nodes) gathers in all.
4. Groups that lead to the same state from every state share a class. After each chunk the classes are refined
   by its rows: a random 64-bit signature per group (its class so far plus, per state, weight(state) * (next
   state + 1)), then an exact check that every group matches its class's first group.

The child dies with its parent (a parent-death signal on Linux) and has a CPU-time limit, so a killed server
leaves nothing running. A JSON schema is turned into its regex here too (dgemma.control.schema), inside the same
limits, so a huge or deeply nested schema cannot stall the server.

Request: {"regex": str, or "schema": a JSON schema with "schema_limits": SchemaLimits' fields, "token_bytes": list[base64 | None] (None: never allowed), "max_states": int,
"max_memory_mb": int, "max_cpu_s": int}.
Reply: {"error": str} or {"initial": int, "finals": list[int], "table": base64 of int32 (S, K) row-major
(-1: not allowed), "num_states": S, "num_classes": K, "token_class": base64 of int32 (V,)}.
"""

import base64
import json
import os
import sys
from pathlib import Path

import numpy as np
from outlines_core import Index, Vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the dgemma that started us
from dgemma.control.dfa import minimize  # noqa: E402

_CELLS_PER_CHUNK = 1 << 23  # (states, trie nodes) int64 cells walked at once: 64 MiB


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _byte_dfa(index: Index) -> tuple[np.ndarray, int, list[int]]:
    """outlines' index over single bytes -> (table (S, 256) int32, -1 = dead; initial row; final rows)."""
    transitions = index.get_transitions()
    ids = set(transitions) | {index.get_initial_state()} | set(index.get_final_states())
    for row in transitions.values():
        ids.update(row.values())
    order = sorted(ids)
    row_of = {state: i for i, state in enumerate(order)}
    table = np.full((len(order), 256), -1, dtype=np.int32)
    for state, row in transitions.items():
        for byte, nxt in row.items():
            if byte < 256:  # outlines adds EOS (id 256) self-loops on final states
                table[row_of[state], byte] = row_of[nxt]
    return table, row_of[index.get_initial_state()], sorted(row_of[s] for s in index.get_final_states())


def _trie(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, alphabet: int):
    """Trie of spellings given as one array of symbols with offsets and lengths, built level by level (a node
    is its parent's id times `alphabet` plus a symbol, made unique). Returns parent (N,), label (N,),
    level_start (depth + 2 offsets; root 0 alone at level 0) and node_of_spelling."""
    node = np.zeros(len(lengths), dtype=np.int64)
    parent, label, level_start = [np.zeros(1, dtype=np.int64)], [np.zeros(1, dtype=np.int64)], [0, 1]
    for depth in range(int(lengths.max())):
        active = np.flatnonzero(lengths > depth)
        keys, inverse = np.unique(node[active] * alphabet + flat[offsets[active] + depth], return_inverse=True)
        node[active] = level_start[-1] + inverse.reshape(-1)
        parent.append(keys // alphabet)
        label.append(keys % alphabet)
        level_start.append(level_start[-1] + len(keys))
    return np.concatenate(parent), np.concatenate(label), level_start, node


def byte_dfa(regex: str) -> tuple[np.ndarray, int, list[int]]:
    """Step 1: the regex's byte-level DFA from outlines (table (S, 256) int32, -1 = dead; initial; finals).
    ValueError for a regex outlines refuses."""
    try:
        index = Index(regex, Vocabulary(256, {bytes([b]): [b] for b in range(256)}))
    except BaseException as err:  # outlines raises ValueError, or pyo3's PanicException (a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"invalid regular expression ({_one_line(err)})") from None
    return _byte_dfa(index)


def compile_regex(regex: str, token_bytes: list, max_states: int) -> dict:
    try:
        byte_table, initial, finals = minimize(*byte_dfa(regex))
    except ValueError as err:
        return {"error": str(err)}
    if byte_table.shape[0] > max_states:
        return {"error": f"needs {byte_table.shape[0]} automaton states, more than the limit of {max_states}"}
    return token_automaton(byte_table, initial, finals, token_bytes)


def token_automaton(byte_table: np.ndarray, initial: int, finals: list[int], token_bytes: list) -> dict:
    """Steps 2-4 over a minimized byte DFA: the reply (see the module docstring)."""
    num_states = byte_table.shape[0]

    # 2. byte classes, and token groups spelled alike in them
    class_columns, byte_class = np.unique(byte_table.T, axis=0, return_inverse=True)
    byte_class = byte_class.reshape(-1)
    num_byte_classes = class_columns.shape[0]
    dead = num_states  # an extra row: the dead state, which every byte keeps dead
    step = np.vstack([np.where(class_columns.T < 0, dead, class_columns.T),
                      np.full((1, num_byte_classes), dead)]).astype(np.int64).reshape(-1)  # ((S+1) * B,)
    spell = bytes(int(c) for c in byte_class)
    token_group = np.full(len(token_bytes), -1, dtype=np.int64)
    group_of: dict[bytes, int] = {}
    for token_id, text in enumerate(token_bytes):
        if text:
            token_group[token_id] = group_of.setdefault(text.translate(spell), len(group_of))
    if not group_of:
        return {"error": "the vocabulary has no tokens that spell text"}
    lengths = np.fromiter((len(t) for t in group_of), dtype=np.int64, count=len(group_of))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.frombuffer(b"".join(group_of), dtype=np.uint8).astype(np.int64)

    # 3-4. states walk down the trie a chunk at a time; after each chunk, refine the classes by its rows
    parent, label, level_start, node_of_group = _trie(flat, offsets, lengths, num_byte_classes)
    num_nodes, num_groups = len(parent), len(group_of)
    weights = np.random.default_rng(0).integers(1, 2**63 - 1, size=num_states + 1, dtype=np.int64).astype(np.uint64)
    group_class = np.zeros(num_groups, dtype=np.int64)  # (G,) refined chunk by chunk
    table = np.empty((0, 1), dtype=np.int32)  # (states done, K): next state of each class
    chunk = max(1, _CELLS_PER_CHUNK // num_nodes)
    for lo in range(0, num_states, chunk):
        states = np.arange(lo, min(lo + chunk, num_states))
        at = np.empty((len(states), num_nodes), dtype=np.int64)  # (chunk, N): the state at each trie node
        at[:, 0] = states
        for a, b in zip(level_start[1:-1], level_start[2:]):
            at[:, a:b] = step[at[:, parent[a:b]] * num_byte_classes + label[a:b]]
        nxt = at[:, node_of_group]  # (chunk, G); dead = S
        signature = group_class.astype(np.uint64) * weights[-1]
        for row, state in enumerate(states):
            signature += weights[state] * (nxt[row].astype(np.uint64) + np.uint64(1))
        _, refined = np.unique(signature, return_inverse=True)
        refined = refined.reshape(-1)
        first = np.zeros(refined.max() + 1, dtype=np.int64)
        first[refined[::-1]] = np.arange(num_groups)[::-1]  # the first group of each refined class
        if not (np.array_equal(nxt[:, first][:, refined], nxt) and np.array_equal(group_class[first][refined],
                                                                                    group_class)):
            return {"error": "internal error: token classes collided (please report)"}
        table = np.vstack([table[:, group_class[first]], nxt[:, first].astype(np.int32)])
        group_class = refined
    num_classes = table.shape[1]
    table[table == dead] = -1
    token_class = np.where(token_group >= 0, group_class[np.maximum(token_group, 0)], num_classes)
    table = np.hstack([table, np.full((num_states, 1), -1, dtype=np.int32)])  # the class of no-text tokens
    return {"initial": initial, "finals": finals, "table": table.astype(np.int32).tobytes(),
            "num_states": num_states, "num_classes": num_classes + 1,
            "token_class": token_class.astype(np.int32).tobytes()}


def _bound_this_process(max_memory_mb: int, max_cpu_s: int) -> None:
    """Die with the parent; cap the address space and CPU time. Set here rather than in a preexec_fn, which is
    unsafe in a threaded parent."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the parent dies
    except (OSError, AttributeError):  # not Linux
        pass
    try:
        import resource
        size = max_memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
        resource.setrlimit(resource.RLIMIT_CPU, (max_cpu_s, max_cpu_s + 1))
    except (ImportError, ValueError, OSError):  # no resource module (Windows), or a lower hard limit
        pass


def _regex_of(request: dict) -> dict:
    """{"regex": ...} or {"error": ...} for a request that carries a JSON schema."""
    from dgemma.control.schema import SchemaError, SchemaLimits, schema_to_regex
    try:
        return {"regex": schema_to_regex(request["schema"], limits=SchemaLimits(**request["schema_limits"]))}
    except SchemaError as err:
        return {"error": str(err), "schema_error": True}


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())  # JSON both ways: nothing is unpickled on either side
    _bound_this_process(request["max_memory_mb"], request["max_cpu_s"])
    if request.get("ppid") is not None and request["ppid"] != os.getppid():
        return  # the parent died before the death signal was set
    request["token_bytes"] = [None if t is None else base64.b64decode(t) for t in request["token_bytes"]]
    reply = _regex_of(request) if "schema" in request else {"regex": request["regex"]}
    if "regex" in reply:
        reply = compile_regex(reply["regex"], request["token_bytes"], request["max_states"])
    for key in ("table", "token_class"):
        if key in reply:
            reply[key] = base64.b64encode(reply[key]).decode("ascii")
    sys.stdout.buffer.write(json.dumps(reply).encode("utf-8"))
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
