"""Compile a regular expression into a token automaton with outlines-core, in a child process.

Run as a script (`python _compile_worker.py`), never imported by dgemma: the parent kills it when the time limit
passes, which is the only way to stop a regex whose DFA grows exponentially inside Rust. It reads one pickled
request on stdin and writes one pickled reply on stdout; it imports only outlines_core and numpy.

1. Build outlines' token index (each distinct token spelling once) and refuse more states than the limit.
2. Group tokens into classes that lead to the same state from every state: a random 64-bit signature per
   token (the sum over states of weight(state) * (next state + 1)), then an exact check of every transition.
   A (S, V) table becomes (S, K) plus a (V,) class map: JSON-object mode has K = 205 on a 32k vocabulary.

Request: {"regex": str, "token_bytes": list[bytes | None] (None: never allowed), "max_states": int,
"max_memory_mb": int}.
Reply: {"error": str} or {"initial": int, "finals": list[int], "table": bytes of int32 (S, K) row-major
(-1: not allowed), "num_states": S, "num_classes": K, "token_class": bytes of int32 (V,)}.
"""

import pickle
import sys

import numpy as np
from outlines_core import Index, Vocabulary


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def compile_regex(regex: str, token_bytes: list, max_states: int) -> dict:
    # 1. outlines' index; the EOS id it wants is one past the vocabulary (we add EOS ourselves)
    vocab_size = len(token_bytes)
    spellings: dict[bytes, list[int]] = {}
    for token_id, text in enumerate(token_bytes):
        if text:
            spellings.setdefault(text, []).append(token_id)
    try:
        index = Index(regex, Vocabulary(vocab_size, spellings))
    except BaseException as err:  # outlines raises ValueError, or pyo3's PanicException (a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        text = _one_line(err)
        if "incompatible" in text.lower() or "missing" in text.lower():
            return {"error": f"the tokenizer cannot spell what the pattern needs ({text})"}
        return {"error": f"invalid regular expression ({text})"}
    transitions = index.get_transitions()
    ids = set(transitions)
    for row in transitions.values():
        ids.update(row.values())
    ids.add(index.get_initial_state())
    ids.update(index.get_final_states())
    if len(ids) > max_states:
        return {"error": f"needs {len(ids)} automaton states, more than the limit of {max_states}"}
    order = np.array(sorted(ids), dtype=np.int64)
    rows = []  # (state row, token ids, next state rows)
    for state, row in transitions.items():
        tokens = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
        dst = np.searchsorted(order, np.fromiter(row.values(), dtype=np.int64, count=len(row)))
        keep = tokens < vocab_size
        rows.append((int(np.searchsorted(order, state)), tokens[keep], dst[keep]))
    del transitions

    # 2. classes by signature, then checked exactly
    weights = np.random.default_rng(0).integers(1, 2**63 - 1, size=len(order), dtype=np.int64).astype(np.uint64)
    signature = np.zeros(vocab_size, dtype=np.uint64)
    for state, tokens, dst in rows:
        signature[tokens] += weights[state] * (dst.astype(np.uint64) + np.uint64(1))
    _, token_class = np.unique(signature, return_inverse=True)
    token_class = token_class.reshape(-1).astype(np.int64)
    class_size = np.bincount(token_class)
    table = np.full((len(order), len(class_size)), -1, dtype=np.int32)
    for state, tokens, dst in rows:
        classes = token_class[tokens]
        table[state, classes] = dst
        counts = np.bincount(classes, minlength=len(class_size))
        if (table[state, classes] != dst).any() or (counts[classes] != class_size[classes]).any():
            return {"error": "internal error: token classes collided (please report)"}
    finals = [int(np.searchsorted(order, s)) for s in index.get_final_states()]
    return {"initial": int(np.searchsorted(order, index.get_initial_state())), "finals": finals,
            "table": table.tobytes(), "num_states": table.shape[0], "num_classes": table.shape[1],
            "token_class": token_class.astype(np.int32).tobytes()}


def main() -> None:
    request = pickle.load(sys.stdin.buffer)
    try:  # bound the address space here rather than in a preexec_fn, which is unsafe in a threaded parent
        import resource
        size = request["max_memory_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    except (ImportError, ValueError, OSError):  # no resource module (Windows), or a lower hard limit
        pass
    reply = compile_regex(request["regex"], request["token_bytes"], request["max_states"])
    pickle.dump(reply, sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
