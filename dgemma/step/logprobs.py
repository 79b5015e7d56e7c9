"""What a row that asks for log-probabilities records at each step (the serving engine's `logprobs`).

A position's record is the model's own distribution at that position: the decoder's soft-capped logits at
temperature 1 (with EOS banned where it may not be sampled), whatever the row's temperature. The step holds the
tempered probabilities p_T (T the row's temperature this step); since p_1 is proportional to p_T ** T, the record
needs no second head pass:  log p_1(x) = T log p_T(x) - log sum_v p_T(v) ** T.  Tempering keeps the order of the
tokens, so the K most probable tokens are the same at either temperature. A token whose p_T underflows to 0 has
log p_1 below T * -103 + the top token's: its mass is far below fp32's resolution of the sum.

A position keeps being recorded every step until it joins the settled prefix (then its record is frozen: the step
at which its token became final); a position that never settles holds the record of its canvas's last step, the
step whose argmax is committed. The recorded token is the one committed: the argmax after the row's constraint,
or the pinned token.
"""

from __future__ import annotations

import torch

TOP_LOGPROBS = 20  # the most alternatives a position records (OpenAI's largest top_logprobs)
_CHUNK_ELEMENTS = 1 << 23  # the normaliser's pass on CPU, in blocks of 32 MiB of fp32 (smaller blocks measured
# slower on a loaded 2-core CPU: 11 s for 1-position blocks, 0.6 s for 32, over a 256 x 262,144 canvas)


def record_row(state, row: int, probs: torch.Tensor, argmax: torch.Tensor, temp: torch.Tensor) -> None:
    """Record row `row`'s log-probabilities from its tempered probabilities probs (C, V) at temperature `temp` (a
    scalar tensor) and its committed-token canvas `argmax` (C,), at the positions not yet settled."""
    C, V = probs.shape
    token = torch.where(state.pinned[row], state.pin_values[row], argmax) if state.any_pins else argmax
    top_probs, top_ids = torch.topk(probs, min(TOP_LOGPROBS, V), dim=-1)  # (C, K)
    norm = torch.empty(C, 1, dtype=torch.float32, device=probs.device)
    # on CPU a block at a time (no second (C, V) tensor); elsewhere launches are the cost
    chunk = max(1, _CHUNK_ELEMENTS // V) if probs.device.type == "cpu" else C
    for start in range(0, C, chunk):
        norm[start:start + chunk] = probs[start:start + chunk].pow(temp).sum(dim=-1, keepdim=True)
    log_norm = norm.log_()
    token_lp = probs.gather(-1, token[:, None]).log_().mul_(temp).sub_(log_norm)[:, 0]  # (C,)
    top_lp = top_probs.log_().mul_(temp).sub_(log_norm)  # (C, K)
    # not frozen yet (a stopped row that a batched head computes anyway keeps its record)
    fresh = (state.positions >= state.num_settled[row]) & ~state.finished[row]  # (C,)
    K = top_ids.shape[1]
    state.logprob[row] = torch.where(fresh, token_lp, state.logprob[row])
    state.top_ids[row, :, :K] = torch.where(fresh[:, None], top_ids, state.top_ids[row, :, :K])
    state.top_logprobs[row, :, :K] = torch.where(fresh[:, None], top_lp, state.top_logprobs[row, :, :K])
