"""Offline block-autoregressive generation for a batch of prompts.

The algorithm (numbers reused in the code):
  1. Left-pad the prompts, allocate the KV cache, encode the prompts (prefill).
  2. For each canvas:
     a. Initialise the canvas with uniform random tokens.
     b. For each denoising step n = N..1:
        i.   decoder pass over the canvas, self-conditioned on the previous step's tempered logits;
        ii.  temper the logits (t_max at the first step, falling linearly toward t_min);
        iii. sample a token per position; accept the entropy-bound set; renoise the rest uniformly;
        iv.  stop a row early once its argmax canvas is stable and its mean entropy is below the threshold.
     c. Commit the argmax canvas. A row that emits EOS is finished; what follows EOS is padding.
     d. If any row goes on, the encoder appends the canvas to the cache.
  3. Return each row's tokens up to and including EOS, with finish_reason "stop" or "length".

Padding: prompts are left-padded; pad slots are masked out of every attention, and a token's RoPE position is
its slot index, as in the reference. RoPE depends only on position differences, so a padded row computes what
it would alone, up to float rounding.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .config import GenerationConfig
from .denoiser import CanvasDenoiser
from .model import DiffusionGemma


@dataclass
class GenerationStats:
    canvases: int = 0
    denoising_steps: int = 0  # decoder passes, summed over rows that were still denoising
    generated_tokens: int = 0
    tokens_per_forward: float = 0.0
    prefill_seconds: float = 0.0
    seconds: float = 0.0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]
    finish_reasons: list[str]
    stats: GenerationStats = field(default_factory=GenerationStats)
    steps_per_canvas: list[list[int]] = field(default_factory=list)  # per row


@dataclass
class StepView:
    """What a canvas watcher sees after each denoising step."""

    canvas_index: int
    step: int  # 1-based step within the canvas
    max_steps: int
    argmax_canvas: torch.Tensor  # (B, C)
    accepted: torch.Tensor  # (B, C) bool
    finished: torch.Tensor  # (B,) bool: row stopped denoising this canvas


class ContextLengthError(ValueError):
    pass


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens (B, T) and valid (B, T), with padding on the left."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, width - len(p):] = True
    return tokens, valid


def _check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not (isinstance(t, int) and 0 <= t < vocab_size)]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})")


@torch.inference_mode()
def generate(model: DiffusionGemma, prompts: list[list[int]], gen: GenerationConfig,
             generator: torch.Generator | None = None,
             on_step: Callable[[StepView], None] | None = None,
             cuda_graphs: bool | None = None) -> GenerationOutput:
    """Generate continuations for `prompts` (lists of token ids). With `generator=None` the global torch RNG is
    used, which is what makes `torch.manual_seed(S)` reproduce the reference's tokens.

    `cuda_graphs` (default: on for a CUDA model with generator=None) replays each canvas's denoising step as a
    CUDA graph; the tokens are the same either way."""
    cfg = model.config
    _check_prompts(prompts, cfg.vocab_size)
    device, C = model.device, model.canvas_length
    t0 = time.perf_counter()

    # 1. left-pad, allocate, prefill
    tokens, valid = left_pad(prompts, gen.pad_token_id)
    B, T = tokens.shape
    room = cfg.max_position_embeddings - T
    if room < 1:
        raise ContextLengthError(f"prompt of {T} tokens fills the context of {cfg.max_position_embeddings}")
    max_new = min(gen.max_new_tokens or room, room)
    num_canvases = math.ceil(max_new / C)
    if T + num_canvases * C > cfg.max_position_embeddings:
        num_canvases = (cfg.max_position_embeddings - T) // C
        max_new = num_canvases * C
        if num_canvases == 0:
            raise ContextLengthError(f"prompt of {T} tokens leaves no room for a {C}-token canvas within the "
                                     f"context of {cfg.max_position_embeddings}")
    tokens, valid = tokens.to(device), valid.to(device)
    # grown as canvases are committed, so an open-ended request does not reserve the whole context up front
    cache = model.new_cache(B, T + min(num_canvases, 4) * C)
    cache.set_left_padding(valid)
    model.encode(tokens, cache)
    if device.type == "cuda":  # time the prefill, not its launch
        torch.cuda.synchronize(device)
    prefill_seconds = time.perf_counter() - t0

    eos = torch.tensor(gen.eos_token_id, device=device)
    finished_seq = torch.zeros(B, dtype=torch.bool, device=device)
    committed: list[torch.Tensor] = []
    steps_per_canvas: list[list[int]] = [[] for _ in range(B)]
    canvases_run = 0
    denoiser = CanvasDenoiser(model, gen, B, generator, cuda_graphs)

    for canvas_index in range(num_canvases):
        # 2a. random canvas
        denoiser.start(cache, finished_seq)
        canvases_run += 1
        # 2b. denoising steps (denoiser.py)
        for step in range(1, gen.max_denoising_steps + 1):
            denoiser.step(step)
            if on_step is not None:
                on_step(StepView(canvas_index, step, gen.max_denoising_steps, denoiser.argmax, denoiser.accepted,
                                 denoiser.finished))
            # One host sync per step: the early exit needs to know on the host whether every row has stopped.
            if denoiser.all_finished():
                break
        for b, n in enumerate(denoiser.steps.tolist()):
            if not bool(finished_seq[b]):
                steps_per_canvas[b].append(n)
        argmax_canvas = denoiser.argmax

        # 2c. commit; EOS ends a row, and what follows it is padding
        done_before = finished_seq.clone()
        block = argmax_canvas.clone()
        block[done_before] = gen.pad_token_id
        is_eos = torch.isin(block, eos) & ~done_before[:, None]
        seen = is_eos.cumsum(dim=-1)
        block[(seen > 0) & ~((seen == 1) & is_eos)] = gen.pad_token_id
        committed.append(block)
        finished_seq = finished_seq | is_eos.any(dim=-1)
        if bool(finished_seq.all()) or canvas_index == num_canvases - 1:
            break
        # 2d. the encoder appends the committed canvas (plus room for the next canvas's scratch slots)
        cache.reserve(cache.length + 2 * C)
        model.encode(block, cache)

    # 3. per-row results
    generated = torch.cat(committed, dim=1).tolist()
    ended = finished_seq.tolist()
    eos_set = set(gen.eos_token_id)
    out_ids, reasons = [], []
    for row, is_done in zip(generated, ended):
        ids = row[:max_new]
        cut = next((i for i, t in enumerate(ids) if t in eos_set), None)
        if cut is not None:
            out_ids.append(ids[: cut + 1])
            reasons.append("stop")
        else:
            out_ids.append(ids)
            reasons.append("length")
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(x) for x in out_ids)
    passes = int(denoiser.passes.sum())
    stats = GenerationStats(
        canvases=canvases_run,
        denoising_steps=passes,
        generated_tokens=n_tokens,
        tokens_per_forward=n_tokens / passes if passes else 0.0,
        prefill_seconds=prefill_seconds,
        seconds=seconds,
        tokens_per_second=n_tokens / seconds if seconds > 0 else 0.0,
    )
    return GenerationOutput(out_ids, reasons, stats, steps_per_canvas)
