"""Steps 1 and 6 of the canvas DP (dp.py): a canvas's log-probabilities read as the best log-prob of each token
class at each position, and, once the DP has chosen a class for each position, the token that stands for it.

Step 1 runs where the log-probs are: numpy on the CPU (classes with at least 1/8 of the vocabulary from the row
maxima, the rest grouped and reduced), or one scatter-max on an accelerator, which copies only the (C, K) maxima
to the host instead of the (C, V) log-probs (C x 262,144 floats a canvas for the release vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .constraint import Constraint
from .moves import moves_of
from .scratch import scratch

FLOOR = -1e30  # stands for -inf log-probs: finite so that a valid sequence is always found
RESCAN_ROWS = 8  # rows masked and rescanned at a time in step 1
SINGLE_UP_TO = 1024  # canvases of at most this many positions score in float32 (score_dtype)


@dataclass
class ClassScores:
    """Step 1 for one canvas: the best log-prob of each token class at each position, which several solves
    (different start states, held or preferred tokens) can share. best (C, K) numpy (score_dtype), floored."""

    constraint: Constraint
    log_probs: torch.Tensor  # (C, V) as given (probabilities when `probs`)
    probs: bool
    best: np.ndarray
    best_raw: np.ndarray  # (C, K) before flooring (for -inf rows of big classes)
    small: np.ndarray  # (C, Vs) the columns of the small classes, grouped by class (Moves.small_tokens)
    big_argmax: dict  # big class -> (C,) its first best token at each position
    token_class: torch.Tensor | None = None  # (V,) long on log_probs' device: set when read by scatter (step 6 there)


def class_scores(log_probs: torch.Tensor, constraint: Constraint, probs: bool = False,
                 scatter: bool | None = None, reuse: bool = False) -> ClassScores:
    """Step 1 for one canvas's log_probs (C, V) (probabilities with `probs`). With `scatter` (default: when
    log_probs is off the CPU), the class maxima are one scatter-max on log_probs' device, and only they, (C, K),
    come to the host; otherwise numpy reads log_probs on the CPU, class by class. The same maxima either way
    (max is exact), and step 6 (`tokens_of`) picks the same tokens. With `reuse`, the read's copy of the columns
    is kept in this thread's scratch memory (scratch.py): the answer is valid until the next such read."""
    if log_probs.dtype not in (torch.float32, torch.float64):
        log_probs = log_probs.float()  # half-precision max is slow or missing on the CPU
    canvas_length, vocab_size = log_probs.shape
    if vocab_size != constraint.vocab_size:
        raise ValueError(f"log_probs has {vocab_size} columns but the constraint's vocabulary has "
                         f"{constraint.vocab_size}")
    if log_probs.device.type != "cpu" if scatter is None else scatter:
        return _scattered(log_probs, constraint, probs)
    moves = moves_of(constraint)

    # 1. best log-prob per (position, class); the argmax too for big classes. numpy: torch would run these
    # small operations on its thread pool, whose every wake-up stalls on a busy machine
    lp = log_probs.numpy()  # (C, V)
    best = np.full((canvas_length, constraint.num_classes), -np.inf, dtype=lp.dtype)
    out = scratch("read", (canvas_length, len(moves.small_tokens)), lp.dtype) if reuse else None
    small = np.take(lp, moves.small_tokens, axis=1, out=out, mode="clip")  # (C, Vs), grouped by class
    if len(moves.small_classes):
        best[:, moves.small_classes] = np.maximum.reduceat(small, moves.small_start[moves.small_classes], axis=1)
    big_argmax, rows_all = {}, np.arange(canvas_length)
    if moves.big_classes:
        row_argmax = lp.argmax(1)  # (C,): the first maximum of each row
    for cls in moves.big_classes:
        # where the row's first maximum lies in the class it is the class's; mask and rescan the other rows, or,
        # when that reads more (a second big class, whose rows' maxima lie elsewhere), read the class's columns
        members, outside = moves.big_members[cls], moves.outside_big[cls]
        rows = np.flatnonzero(outside[row_argmax])
        if len(rows) * vocab_size > canvas_length * len(members):
            index = members[np.take(lp, members, axis=1).argmax(1)]  # members ascend: the first maximum
        else:
            index = row_argmax.copy()
            for chunk in np.array_split(rows, -(-len(rows) // RESCAN_ROWS)) if len(rows) else []:
                index[chunk] = np.where(outside, -np.inf, lp[chunk]).argmax(1)  # a few rows: stays in cache
        best[:, cls], big_argmax[cls] = lp[rows_all, index], index
    if probs:  # given probabilities: the log is monotonic, so maxima and argmaxima are the same; log only (C, K)
        best = torch.from_numpy(best).log().numpy()
    best_np = np.maximum(best.astype(score_dtype(canvas_length)), FLOOR)  # (C, K); tokenless classes: no edges
    return ClassScores(constraint, log_probs, probs, best_np, best, small, big_argmax)


def _scattered(log_probs: torch.Tensor, constraint: Constraint, probs: bool) -> ClassScores:
    """Step 1 where log_probs lie: each class's maximum by one scatter-max over the columns, (C, K) copied out."""
    token_class = constraint.derived(("token classes on", log_probs.device),
                                     lambda: constraint.token_class.long().to(log_probs.device))
    canvas_length = log_probs.shape[0]
    best = torch.full((canvas_length, constraint.num_classes), -torch.inf, dtype=log_probs.dtype,
                      device=log_probs.device)
    best.scatter_reduce_(1, token_class.expand(canvas_length, -1), log_probs, "amax")
    best = (best.log() if probs else best).cpu().numpy()
    best_np = np.maximum(best.astype(score_dtype(canvas_length)), FLOOR)
    return ClassScores(constraint, log_probs, probs, best_np, best, None, {}, token_class)


def score_dtype(canvas_length: int) -> type:
    """float32 for canvases of up to SINGLE_UP_TO positions, float64 beyond. The forward pass gathers P' scores a
    position; in single precision a solve over Snowplow sp_87's 124k pairs took 120 ms, not 133 ms. Its rounding over
    a path's sum stays far below the 1/(C+1) that tells a path that drops a held token (C+1 floors) from one that
    keeps it (at most C), and sums stay finite (C (C+1) 1e30 < 3.4e38)."""
    return np.float32 if canvas_length <= SINGLE_UP_TO else np.float64


def tokens_of(scores: ClassScores, moves, classes: np.ndarray, fixed: dict) -> torch.Tensor:
    """6. At each position, the first token of the chosen class with the class's best log-prob (a steered position
    whose chosen class holds its token: that token)."""
    if scores.token_class is not None:  # read by scatter: the first best member of each position's class, there
        lp = scores.log_probs
        inside = scores.token_class[None, :] == torch.from_numpy(classes).to(lp.device)[:, None]  # (C, V)
        # a member whose log-prob is -inf still beats every token outside the class
        tokens = torch.where(inside, lp.clamp(min=torch.finfo(lp.dtype).min), -torch.inf).argmax(1).cpu()
        return _keep_fixed(scores, tokens, classes, fixed)
    tokens = np.empty(len(classes), dtype=np.int64)
    for cls in np.unique(classes).tolist():
        at = np.flatnonzero(classes == cls)
        if cls in scores.big_argmax:  # a row of -inf has its argmax outside the class; any member is as good
            members = moves.big_members[cls]
            tokens[at] = np.where(scores.best_raw[at, cls] > -np.inf, scores.big_argmax[cls][at], members[0])
        else:  # the first maximum among the class's columns (ids ascend)
            lo, hi = moves.small_start[cls], moves.small_start[cls + 1]
            tokens[at] = moves.small_tokens[lo + scores.small[at, lo:hi].argmax(1)]
    return _keep_fixed(scores, torch.from_numpy(tokens), classes, fixed)


def _keep_fixed(scores: ClassScores, tokens: torch.Tensor, classes: np.ndarray, fixed: dict) -> torch.Tensor:
    """A steered position keeps its token where the chosen class holds it."""
    for c, token in fixed.items():
        if int(scores.constraint.token_class[token]) == classes[c]:
            tokens[c] = token
    return tokens
