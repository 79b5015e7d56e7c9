"""Training examples and their collation into a right-padded batch cut into canvases."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Example:
    """One supervised pair; ids only. The response excludes the final EOS (collation appends it)."""

    prompt_ids: list[int]
    response_ids: list[int]
    # Response positions held clean: never corrupted and not scored by the decoder loss (the givens of a puzzle,
    # pinned into the canvas as inference pins them). None: every position is noised and scored.
    fixed: list[int] | None = None


@dataclass
class Batch:
    """A right-padded batch. Row i is `prompt ; response ; EOS ; pad...` with the response part (EOS included)
    padded to a whole number of canvases.

    tokens (B, L); prompt_lengths, num_canvases (B,) long; enc_targets (B, L) bool: positions whose token is a
    next-token target of the encoder loss (position j is predicted from hidden state j - 1); fixed (B, L) bool or
    None: positions held clean and left out of the decoder loss (Example.fixed)."""

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    num_canvases: torch.Tensor
    enc_targets: torch.Tensor
    fixed: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device), self.prompt_lengths.to(device), self.num_canvases.to(device),
                     self.enc_targets.to(device), None if self.fixed is None else self.fixed.to(device))

    def rows(self, rows: slice) -> Batch:
        """The batch's rows `rows` (one process's share under data parallelism)."""
        return Batch(self.tokens[rows], self.prompt_lengths[rows], self.num_canvases[rows], self.enc_targets[rows],
                     None if self.fixed is None else self.fixed[rows])


def collate(examples: list[Example], canvas_length: int, eos_id: int, pad_id: int,
            enc_on_prompt: bool = False) -> Batch:
    """Pad every response (plus EOS) to whole canvases with pad tokens, then right-pad the rows to one length.

    The pad tokens inside the last canvas are decoder targets (so the model learns to end); the encoder loss
    covers the response and its EOS, and the prompt too when `enc_on_prompt`. `fixed` is None unless an example
    has fixed positions."""
    rows, prompt_lengths, num_canvases, targets = [], [], [], []
    for ex in examples:
        if not ex.prompt_ids:
            raise ValueError("an example has an empty prompt")
        response = list(ex.response_ids) + [eos_id]
        n = math.ceil(len(response) / canvas_length)
        padded = response + [pad_id] * (n * canvas_length - len(response))
        rows.append(list(ex.prompt_ids) + padded)
        P = len(ex.prompt_ids)
        prompt_lengths.append(P)
        num_canvases.append(n)
        first = 1 if enc_on_prompt else P
        targets.append((first, P + len(response)))
    L = max(len(r) for r in rows)
    tokens = torch.full((len(rows), L), pad_id, dtype=torch.long)
    enc_targets = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (row, (lo, hi)) in enumerate(zip(rows, targets)):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        enc_targets[i, lo:hi] = True
    fixed = None
    if any(ex.fixed for ex in examples):
        fixed = torch.zeros((len(rows), L), dtype=torch.bool)
        for i, (ex, P) in enumerate(zip(examples, prompt_lengths)):
            positions = list(ex.fixed or [])
            if any(not 0 <= j < len(ex.response_ids) for j in positions):
                raise ValueError(f"fixed positions must lie in the response (length {len(ex.response_ids)})")
            fixed[i, [P + j for j in positions]] = True
    return Batch(tokens, torch.tensor(prompt_lengths), torch.tensor(num_canvases), enc_targets, fixed)
