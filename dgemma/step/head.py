"""The head of a step (its steps i-iii): the decoder pass, the LM head, tempering, scoring, accepting and
sampling, over the rows a step advances. Chosen once by the driver:

- `BatchedHead` runs them over all rows at once: a fixed kernel sequence (rows that have stopped are computed
  and discarded), which a CUDA graph can capture.
- `RowsHead` (CPU) runs the decoder over the rows still denoising, then the head and the sampler a row at a time
  through one reused (C, V) buffer, and only advances the generator of a row that has stopped (in row order),
  so every row draws what a whole-batch step would give it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from ..model import DiffusionGemma
from ..model.model import ForwardPlan
from ..sampling import cap_and_score_row_, entropy_bound_accept, race_matches_multinomial, score_blocks, score_whole
from .constraint import constrain_row
from .draws import Sampler
from .logprobs import record_row
from .state import CanvasState


class Strategy(str, enum.Enum):
    """The names of the heads (generate's and the runner's `strategy`)."""

    BATCHED = "batched"
    ROWS = "rows"


def default_strategy(device: torch.device, sampler: Sampler) -> Strategy:
    """ROWS on CPU (memory and cache locality; needs the race to reproduce multinomial for the exact sampler, as
    rows then draw one after another), BATCHED elsewhere."""
    if torch.device(device).type != "cpu":
        return Strategy.BATCHED
    return Strategy.ROWS if sampler is Sampler.FAST or race_matches_multinomial(device) else Strategy.BATCHED


@dataclass
class StepRows:
    """The rows one step advances, in order, and what each brings to it."""

    ids: list[int]  # their rows of the state (host)
    index: slice | torch.Tensor  # the same rows for indexing the state: a slice for the whole state (no index
    # tensor, so the step can be captured as a CUDA graph)
    temps: torch.Tensor  # their temperatures this step, (R,) or one for all (a scalar tensor)
    bounds: torch.Tensor  # their entropy bounds this step, likewise
    generators: list  # (R,) each row's generator (lockstep: one generator R times)
    picks: list  # (R,) each row's pick.Pick
    first: bool  # every row is on its first step (zero signal)


Scored = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # argmax, entropy,
# accepted, sampled (R, C) and the next signal (R, C, H)


class BatchedHead:
    def __init__(self, device: torch.device, decode=None):
        self.score = score_blocks if torch.device(device).type == "cpu" else score_whole
        self.decode = decode  # the decoder pass (canvas, signal, plan) -> hidden; None: the model's

    def nbytes(self) -> int:
        return 0  # every tensor is the step's own

    def __call__(self, model: DiffusionGemma, state: CanvasState, plan: ForwardPlan, rows: StepRows,
                 draws) -> Scored:
        idx = rows.index
        decode = self.decode or model.decode
        hidden = decode(state.canvas[idx], None if rows.first else state.signal[idx], plan)  # (R, C, H)
        logits = model.logits(hidden)  # (R, C, V), soft-capped
        until = [state.eos_until[r] for r in rows.ids]
        if any(until):
            ban = state.positions[None] < torch.tensor(until, device=state.device)[:, None]  # (R, C)
            for e in state.eos_ids:
                logits[..., e].masked_fill_(ban, float("-inf"))
        # in place: (R, C, V) tensors are the largest of a step, so at most two live at once
        probs, argmax, entropy = self.score(logits, rows.temps.reshape(-1, 1, 1))
        del logits
        if state.any_pins:
            entropy = torch.where(state.pinned[idx], 0.0, entropy)
        accepted = entropy_bound_accept(entropy, rows.bounds.reshape(-1, 1))
        sampled = draws.sample(probs, accepted, argmax, rows.generators, rows.picks)
        for i, row in enumerate(rows.ids):
            if state.constraints[row] is not None:
                drawn = sampled[i] if rows.picks[i].draws else None
                argmax[i], sampled[i] = constrain_row(state, row, probs[i], drawn, accepted[i])
            if state.records[row]:
                record_row(state, row, probs[i], argmax[i], rows.temps.expand(len(rows.ids))[i])
        signal = model.embed_probs(probs)  # (R, C, H) self-conditioning for the next step
        return argmax, entropy, accepted, sampled, signal


class RowsHead:
    def __init__(self, model: DiffusionGemma, decode=None):
        self.softcap = model.config.final_logit_softcapping
        self.decode = decode or model.decode  # the decoder pass (canvas, signal, plan) -> hidden
        self.buffer: torch.Tensor | None = None  # the one (C, V) fp32 buffer every row's logits and probs use

    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.nbytes

    def __call__(self, model: DiffusionGemma, state: CanvasState, plan: ForwardPlan, rows: StepRows,
                 draws) -> Scored:
        """The decoder runs over the rows still denoising; then, row by row, the head writes the row's raw logits
        into the buffer, the sampler caps, tempers and scores them block by block in cache and leaves the
        probabilities in their place, and the sample and the next signal read them there."""
        R, C, V, dev = len(rows.ids), state.canvas_length, state.vocab_size, state.device
        finished = state.finished[rows.index].tolist()  # a host sync, free on CPU
        computed = [i for i in range(R) if not finished[i]]
        argmax = torch.zeros(R, C, dtype=torch.long, device=dev)
        sampled = torch.zeros(R, C, dtype=torch.long, device=dev)
        entropy = torch.full((R, C), float("inf"), device=dev)  # inf: never confident; a stopped row stays as is
        accepted = torch.zeros(R, C, dtype=torch.bool, device=dev)
        signal = torch.zeros(R, C, state.signal.shape[-1], dtype=state.signal.dtype, device=dev)
        state.rows_skipped += R - len(computed)
        if computed:
            sel = torch.tensor([rows.ids[i] for i in computed], device=dev)
            hidden = self.decode(state.canvas[sel], None if rows.first else state.signal[sel], plan.select(computed))
        if self.buffer is None:
            self.buffer = torch.empty(C, V, dtype=torch.float32, device=dev)
        temps, bounds = rows.temps.expand(R), rows.bounds.expand(R)
        j = 0
        for i, row in enumerate(rows.ids):
            generator, pick = rows.generators[i], rows.picks[i]
            if finished[i]:
                draws.sampler.skip(C, generator)
                continue
            logits = model.head_into(hidden[j], self.buffer)
            j += 1
            probs, argmax[i], row_entropy = cap_and_score_row_(logits, temps[i], self.softcap, state.eos_until[row],
                                                               state.eos_ids)
            if state.any_pins:
                row_entropy = torch.where(state.pinned[row], 0.0, row_entropy)
            entropy[i] = row_entropy
            accepted[i] = entropy_bound_accept(row_entropy, bounds[i])
            # a constrained row draws as an unconstrained one would (so other rows' draws are unchanged); the
            # constraint then moves the argmax and the sample only where they are invalid
            sampled[i] = pick.sample(draws.sampler, probs, accepted[i], argmax[i], generator)
            if state.constraints[row] is not None:
                argmax[i], sampled[i] = constrain_row(state, row, probs, sampled[i] if pick.draws else None,
                                                      accepted[i])
            if state.records[row]:
                record_row(state, row, probs, argmax[i], temps[i])
            signal[i] = model.embed_probs(probs)
        return argmax, entropy, accepted, sampled, signal


def make_head(strategy: Strategy | str, model: DiffusionGemma, decode=None) -> BatchedHead | RowsHead:
    """The head; `decode` replaces the model's decoder pass (the engine's DecoderGraphs.decode), None: the model's."""
    return RowsHead(model, decode) if Strategy(strategy) is Strategy.ROWS else BatchedHead(model.device, decode)
