"""Compile a regular expression into a token automaton, in a child process.

Run as a script (`python _compile_worker.py`), never imported by dgemma: the parent kills it when the time limit
passes, which is the only way to stop a regex whose DFA grows exponentially inside Rust. It reads one JSON
request on stdin and writes one JSON reply line on stdout, then the reply's arrays as raw bytes; it imports only
outlines_core, numpy and dgemma.control's byte_dfa, dfa, regex_factor, chains, token_walk, schema, tools and
tool_grammar.

outlines-core builds the regex's DFA; we walk the tokens through it ourselves, because outlines' token index
walks every token from every state one byte at a time (about 100 s for JSON-object mode on a 262k vocabulary).
1. outlines' index over the 256 single bytes: the byte-level DFA (S, 256), counting a byte into a state that
   can neither match nor go on as dead, as outlines does; then minimized (dfa.py), which the size limit counts.
   The regex goes in framed and factored (byte_dfa.py): `\x00(?:regex)\x01`, common suffixes written once.
2. The token walk and token classes (token_walk.py): bytes no state tells apart form byte classes, tokens spelled
   alike in them form groups, the groups' spellings form a trie that batches of states walk down keeping only
   live (state, node) pairs, states of counting chains (chains.py) are derived from the state below, and groups
   that lead to the same state from every state share a class.

The child dies with its parent (a parent-death signal on Linux) and has a CPU-time limit, so a killed server
leaves nothing running. A JSON schema is turned into its regex here too (dgemma.control.schema), inside the same
limits, so a huge or deeply nested schema cannot stall the server (and a forced tool call's functions,
tool_grammar.call_regex); one whose automaton passes max_states (or
whose table may pass max_table_mb) is written again with half the length and item caps, at most CAP_RETRIES
times (compile_schema).

Request: {"regex": str, or "schema": a JSON schema, or "tool_call": {"functions": [{"name", "parameters"}],
"repeat": bool}, the last two with "schema_limits": SchemaLimits' fields, "token_bytes":
list[base64 | None] (None: never allowed), "max_states": int, "max_table_mb": number, "max_memory_mb": int,
"max_cpu_s": int}.
Reply: one line, {"error": str} or {"initial": int, "finals": list[int], "num_states": S, "num_classes": K,
"num_entries": E}, then for the latter the bytes of int32 arrays: the E allowed (state, class, next state)
entries of the (S, K) table as three arrays (every other entry is "not allowed"), and the (V,) token_class (K for
a token that spells no text: never allowed).
"""

import base64
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the dgemma that started us
from dgemma.control.byte_dfa import byte_dfa  # noqa: E402
from dgemma.control.dfa import minimize  # noqa: E402
from dgemma.control.token_walk import token_groups, token_table  # noqa: E402

ARRAYS = ("state", "class", "next", "token_class")  # the reply's arrays, in the order they are written


def compile_regex(regex: str, token_bytes: list, max_states: int) -> dict:
    try:
        byte_table, initial, finals = minimize(*byte_dfa(regex))
    except ValueError as err:
        return {"error": str(err)}
    if byte_table.shape[0] > max_states:
        return {"error": f"needs {byte_table.shape[0]} automaton states, more than the limit of {max_states}",
                "too_many_states": True}
    return token_automaton(byte_table, initial, finals, token_bytes)


def token_automaton(byte_table: np.ndarray, initial: int, finals: list[int], token_bytes: list) -> dict:
    """Steps 2-4 over a minimized byte DFA (dgemma.control.token_walk): the reply (see the module docstring)."""
    byte_class, token_group, spellings = token_groups(byte_table, token_bytes)
    if not spellings:
        return {"error": "the vocabulary has no tokens that spell text"}
    classes = token_table(byte_table, byte_class, spellings)
    if classes is None:
        return {"error": "internal error: token classes collided (please report)"}
    (state, column, target), num_classes, group_class = classes
    token_class = np.where(token_group >= 0, group_class[np.maximum(token_group, 0)], num_classes)
    return {"initial": initial, "finals": finals, "num_states": byte_table.shape[0], "num_classes": num_classes,
            "num_entries": len(state), "state": state, "class": column, "next": target,
            "token_class": token_class.astype(np.int32)}


def _die_with_parent() -> None:
    """The kernel kills us when the parent (the thread that started us) ends (PR_SET_PDEATHSIG, Linux)."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        pass


def _bound_this_process(max_memory_mb: int, max_cpu_s: int) -> None:
    """Cap the address space and CPU time. Set here rather than in a preexec_fn, which is unsafe in a threaded
    parent."""
    try:
        import resource
        size = max_memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
        resource.setrlimit(resource.RLIMIT_CPU, (max_cpu_s, max_cpu_s + 1))
    except (ImportError, ValueError, OSError):  # no resource module (Windows), or a lower hard limit
        pass


CAP_RETRIES = 2  # how often a schema past max_states or max_table_mb is written again with half the caps


def _regex_of(request: dict, limits: dict) -> dict:
    """{"regex": ...} or {"error": ...} for the request's JSON schema, or its forced tool call's functions
    (tool_grammar.call_regex), under SchemaLimits' fields `limits`."""
    from dgemma.control.schema import SchemaError, SchemaLimits, schema_to_regex
    from dgemma.control.tool_grammar import call_regex
    try:
        if "tool_call" in request:
            call = request["tool_call"]
            return {"regex": call_regex(call["functions"], call["repeat"], SchemaLimits(**limits))}
        return {"regex": schema_to_regex(request["schema"], limits=SchemaLimits(**limits))}
    except SchemaError as err:
        return {"error": str(err), "schema_error": True}


def compile_schema(request: dict) -> dict:
    """A schema (or a tool call's) written and compiled; when its automaton passes max_states, or its token table
    may pass max_table_mb (counted here as (S + 1) x (K + 4) entries, at least what the parent makes of it),
    written again with half the length and item caps (SchemaLimits.length_cap, items_cap: shorter strings and
    arrays, still valid), at most CAP_RETRIES times. Caps multiply where arrays and strings nest: Snowplow sp_202, 64 items of
    64-character strings inside 16 items, needs 187,876 states with caps 64 and 16, and 27,220 with 32 and 8."""
    limits, last = dict(request["schema_limits"]), None
    for retry in range(CAP_RETRIES + 1):
        written = _regex_of(request, limits)
        if "regex" not in written or written["regex"] == last:  # (a retry that writes the same regex: no cap
            return written if last is None else reply  # bound anything, so the same automaton again)
        last = written["regex"]
        reply = compile_regex(last, request["token_bytes"], request["max_states"])
        too_big = reply.pop("too_many_states", False) or ("error" not in reply and 4 * (reply["num_states"] + 1) *
                                                          (reply["num_classes"] + 4) > request["max_table_mb"] * 2**20)
        if not too_big or retry == CAP_RETRIES:
            return reply
        limits.update(length_cap=max(1, limits["length_cap"] // 2), items_cap=max(1, limits["items_cap"] // 2))
    return reply


def main() -> None:
    """argv[1], when given, is the parent's pid: started ahead of time (spare.py), we may wait a while for the
    request, so the death signal is set first."""
    _die_with_parent()
    if len(sys.argv) > 1 and int(sys.argv[1]) != os.getppid():
        return  # the parent died before the death signal was set
    request = json.loads(sys.stdin.buffer.read())  # JSON both ways: nothing is unpickled on either side
    _bound_this_process(request["max_memory_mb"], request["max_cpu_s"])
    if request.get("ppid") is not None and request["ppid"] != os.getppid():
        return
    request["token_bytes"] = [None if t is None else base64.b64decode(t) for t in request["token_bytes"]]
    if "schema" in request or "tool_call" in request:
        reply = compile_schema(request)
    else:
        reply = compile_regex(request["regex"], request["token_bytes"], request["max_states"])
        reply.pop("too_many_states", None)
    arrays = [np.ascontiguousarray(reply.pop(key), dtype=np.int32) for key in ARRAYS if key in reply]
    sys.stdout.buffer.write(json.dumps(reply).encode("utf-8") + b"\n")
    for data in arrays:  # raw, not base64 in JSON
        sys.stdout.buffer.write(memoryview(data).cast("B"))
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
