"""The denoising state of a set of canvas rows, allocated once and updated in place."""

from __future__ import annotations

import torch

from ..model import DiffusionGemma
from ..sampling import StableAndConfident
from .constraint import CanvasConstraint
from .logprobs import TOP_LOGPROBS


class CanvasState:
    """The denoising state of `num_rows` canvas rows, allocated once and updated in place (CUDA-graph safe):

    canvas (S, C)      the tokens the decoder reads next step
    argmax (S, C)      the argmax canvas (what a commit writes)
    signal (S, C, H)   self-conditioning for the next step (zeros: none)
    accepted (S, C)    positions accepted by the last step
    finished (S,)      stopped denoising this canvas
    steps (S,)         denoising steps run this canvas
    pinned (S, C)      positions fixed by the caller; pin_values (S, C) their tokens
    streak (S, C), num_settled (S,)   the settled prefix (serving's pin_prefix): see step._pin
    logprob (S, C), top_ids (S, C, K), top_logprobs (S, C, K)   per position, for the rows that record them (see
        logprobs.py): the committed token's log-probability and the K most probable tokens', frozen once the
        position joins the settled prefix
    """

    def __init__(self, model: DiffusionGemma, num_rows: int, stability_threshold: int,
                 confidence_threshold: float):
        S, C, H, dev = num_rows, model.canvas_length, model.config.hidden_size, model.device
        self.num_rows, self.canvas_length, self.vocab_size, self.device = S, C, model.config.vocab_size, dev
        self.stability_threshold, self.confidence_threshold = stability_threshold, confidence_threshold
        self.canvas = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.argmax = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.signal = torch.zeros(S, C, H, dtype=model.dtype, device=dev)
        self.accepted = torch.zeros(S, C, dtype=torch.bool, device=dev)
        self.finished = torch.zeros(S, dtype=torch.bool, device=dev)
        self.steps = torch.zeros(S, dtype=torch.long, device=dev)
        self.pinned = torch.zeros(S, C, dtype=torch.bool, device=dev)
        self.pin_values = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.streak = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.num_settled = torch.zeros(S, dtype=torch.long, device=dev)
        self.eos_until = [0] * S  # host: EOS may not be sampled before this canvas position (an output must
        self.eos_ids: list[int] = []  # reach its last pin)
        # per row, host: its constraint over the current canvas (None: unconstrained); see constraint.py
        self.constraints: list[CanvasConstraint | None] = [None] * S
        self.stopper = StableAndConfident(stability_threshold, confidence_threshold, S, C, dev)
        self.positions = torch.arange(C, device=dev)
        self.any_pins = False  # host flag: some row has caller pins (skips the pin work when none has)
        self.logprob = torch.zeros(S, C, dtype=torch.float32, device=dev)
        self.top_ids = torch.zeros(S, C, TOP_LOGPROBS, dtype=torch.long, device=dev)
        self.top_logprobs = torch.zeros(S, C, TOP_LOGPROBS, dtype=torch.float32, device=dev)
        self.records = [False] * S  # host, per row: record log-probabilities (a batch where none does runs as before)
        self.rows_skipped = 0  # decoder passes not run because the row had stopped (the rows head)

    def start(self, rows: list[int] | None, canvas: torch.Tensor, pinned: torch.Tensor | None = None,
              pin_values: torch.Tensor | None = None, eos_until: list[int] | None = None,
              eos_ids: list[int] | None = None, constraints: list[CanvasConstraint | None] | None = None,
              records: list[bool] | None = None) -> None:
        """Begin a canvas on `rows` (None: all) from `canvas` (R, C) (the caller draws it, in its draw order),
        optionally with pinned positions (R, C) bool and their tokens (R, C), and per row the canvas position
        before which no EOS (`eos_ids`) may be sampled, its constraint over this canvas, and whether it records
        log-probabilities."""
        idx = slice(None) if rows is None else torch.tensor(rows, device=self.device)
        for i, r in enumerate(range(self.num_rows) if rows is None else rows):
            self.eos_until[r] = 0 if eos_until is None else eos_until[i]
            self.constraints[r] = None if constraints is None else constraints[i]
            self.records[r] = False if records is None else records[i]
        if eos_ids is not None:
            self.eos_ids = list(eos_ids)
        if pinned is not None:
            canvas = torch.where(pinned, pin_values, canvas)
            self.any_pins = True
        self.canvas[idx] = canvas
        self.argmax[idx] = canvas
        self.signal[idx] = 0
        self.accepted[idx] = False
        self.finished[idx] = False
        self.steps[idx] = 0
        self.pinned[idx] = False if pinned is None else pinned
        if pin_values is not None:
            self.pin_values[idx] = pin_values
        self.streak[idx] = 0
        self.num_settled[idx] = 0
        self.stopper.reset(None if rows is None else idx)

    def logprobs_of(self, row: int) -> tuple[list[float], list[list[int]], list[list[float]]]:
        """Row `row`'s recorded log-probabilities on the host: per position, the committed token's, and the top
        tokens' ids and log-probabilities (a host sync)."""
        return self.logprob[row].tolist(), self.top_ids[row].tolist(), self.top_logprobs[row].tolist()

    def nbytes(self) -> int:
        return sum(t.nbytes for t in [self.canvas, self.argmax, self.signal, self.pin_values, self.streak,
                                      self.logprob, self.top_ids, self.top_logprobs])
