"""A constraint on the answer after a free thought: thinking and structured output together.

With thinking on, a reply is `<|channel>thought\\n...<channel|>answer` (dgemma/thinking.py). The constraint asked for
(a JSON schema, a regex, a forced tool call) applies to the answer; the thought stays free. `after_thought` builds
that automaton at the token level from the answer's own compiled one, so nothing is compiled again and the
answer's cache entry serves both:

- state OPEN (initial): the thought-channel open token leads to THOUGHT; every move the answer allows from its
  initial state is allowed too (a reply may answer without thinking);
- state THOUGHT: any token that spells text stays in THOUGHT; the close token leads to the answer's initial state.
  EOS is not allowed there: an answer must follow the thought;
- then the answer's own states, moves and DONE, unchanged. The markers spell no text, so the answer never holds
  one (a stray close marker cannot cut the answer short).

Tokens keep one class per (answer class, kind) with kind one of: spells text, open marker, close marker, other.
The budget rule is the answer's, plus the thought: the DP leaves room for the close marker, the answer and EOS.
"""

from __future__ import annotations

import numpy as np
import torch

from .constraint import INVALID, Constraint

OPEN, THOUGHT = 0, 1  # the two states before the answer's; the answer's state s becomes s + 2
_TEXT, _OPEN, _CLOSE, _OTHER = range(4)


def after_thought(answer: Constraint, open_id: int, close_id: int) -> Constraint:
    """`answer` after an optional thought opened by token `open_id` and closed by `close_id` (built once per
    answer automaton and marker pair, kept with it)."""
    return answer.derived(("after a thought", open_id, close_id), lambda: _build(answer, open_id, close_id))


def _build(answer: Constraint, open_id: int, close_id: int) -> Constraint:
    spelled = answer.vocabulary.token_bytes
    kind = np.array([_OTHER if b is None else _TEXT for b in spelled], dtype=np.int64)
    kind[[open_id, close_id]] = _OPEN, _CLOSE
    kind = np.pad(kind, (0, answer.vocab_size - len(kind)), constant_values=_OTHER)
    # one class per (answer class, kind) that some token has
    pairs, token_class = np.unique(answer.token_class.numpy().astype(np.int64) * 4 + kind, return_inverse=True)
    answer_class, pair_kind = pairs // 4, pairs % 4
    shift = 2
    moves = answer.transitions.numpy()[:, answer_class]  # (S, K') the answer's moves per new class
    body = np.where(moves == INVALID, INVALID, moves + shift)
    start = answer.initial_state + shift
    thought = np.where(pair_kind == _TEXT, THOUGHT, INVALID)
    thought[pair_kind == _CLOSE] = start
    opening = body[answer.initial_state].copy()
    opening[pair_kind == _OPEN] = THOUGHT
    table = np.vstack([opening, thought, body])
    distance = answer.distance.numpy()
    start_distance = int(distance[answer.initial_state])
    final = answer.final.numpy()
    return Constraint(f"{answer.description} after a thought",
                      torch.from_numpy(token_class.reshape(-1).astype(np.int32)),
                      torch.from_numpy(np.ascontiguousarray(table)),
                      torch.from_numpy(np.concatenate([[start_distance, start_distance + 1], distance])),
                      torch.from_numpy(np.concatenate([[final[answer.initial_state], False], final])),
                      OPEN, answer.done_state + shift, answer.vocabulary)
