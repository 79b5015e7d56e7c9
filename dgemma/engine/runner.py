"""The model runner: the KV cache, the per-row denoising state, and one batched denoising step.

One engine step runs one decoder pass over every denoising request, whatever its context length and its step
within its canvas (`model.denoise(..., rows=...)`), then does the sampler's work for all rows at once. Per row
it is exactly the offline loop of generate.py (steps 2a-2d), with the same random draws from the request's own
generator, in the same order and shapes as a batch of one:
  canvas init: randint (1, C); per step: exponential (1, C, V) for the sample, then randint (1, C) for renoising.

Settled prefix (pin_prefix): a position has settled once it and every position before it have been accepted with
entropy below the confidence threshold and an unchanged argmax for `stability_threshold` + 1 consecutive steps.
Settled positions are pinned: the canvas and the argmax canvas keep their value for the rest of the canvas, so
the settled prefix is final and can be streamed before the canvas is committed. With pinning off a row is
token-for-token the offline loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import DiffusionGemma
from ..denoiser import RowSampler
from ..sampling import (StableAndConfident, entropy_bound_accept, race_matches_multinomial, race_sample,
                        random_tokens, temper_and_score)
from .request import Request


@dataclass
class StepResult:
    """Host view of one row after a step."""

    canvas_done: bool  # stopped (stable and confident, or out of steps): commit the argmax canvas
    num_pinned: int  # length of the settled prefix
    argmax: list[int]  # (C,) the argmax canvas


class ModelRunner:
    def __init__(self, model: DiffusionGemma, max_num_seqs: int, max_model_len: int, stability_threshold: int,
                 confidence_threshold: float):
        self.model = model
        self.device = model.device
        self.canvas_length = C = model.canvas_length
        self.vocab_size = model.config.vocab_size
        self.stability_threshold = K = stability_threshold
        self.confidence_threshold = confidence_threshold
        S, H = max_num_seqs, model.config.hidden_size
        self.cache = model.new_cache(S, max_model_len)
        dev = self.device
        # per-row state, indexed by cache row
        self.canvas = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.argmax = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.signal = torch.zeros(S, C, H, dtype=model.dtype, device=dev)  # self-conditioning for the next step
        self.stopper = StableAndConfident(K, confidence_threshold, S, C, dev)  # keeps the last K argmax canvases
        self.streak = torch.zeros(S, C, dtype=torch.long, device=dev)  # steps accepted, confident and unchanged
        self.num_pinned = torch.zeros(S, dtype=torch.long, device=dev)
        self.positions = torch.arange(C, device=dev)
        # CPU: the head and the sampler run a row at a time (RowSampler); elsewhere, batched
        self.row_sampler = RowSampler(model) if dev.type == "cpu" and race_matches_multinomial(dev) else None

    def nbytes(self) -> int:
        buffer = self.row_sampler.buffer.nbytes if self.row_sampler is not None else 0
        return self.cache.nbytes() + self.signal.nbytes + buffer

    @torch.inference_mode()
    def prefill(self, request: Request) -> None:
        """1. Encode the prompt into the request's (reset) row, then start its first canvas."""
        row = request.row
        self.cache.reset_row(row)
        prompt = torch.tensor([request.prompt], dtype=torch.long, device=self.device)  # (1, T)
        self.model.encode(prompt, self.cache, rows=[row])
        self.start_canvases([request])

    def start_canvases(self, requests: list[Request]) -> None:
        """2a. A uniform random canvas per request, drawn from the request's generator."""
        if not requests:
            return
        idx = self._index(requests)
        canvas = torch.cat([random_tokens((1, self.canvas_length), self.vocab_size, r.generator, self.device)
                            for r in requests])  # (R, C)
        self.canvas[idx] = canvas
        self.argmax[idx] = canvas
        self.stopper.reset(idx)
        self.streak[idx] = 0
        self.num_pinned[idx] = 0
        for r in requests:
            r.step = 0

    @torch.inference_mode()
    def commit(self, requests: list[Request]) -> None:
        """2d. The encoder appends each request's committed argmax canvas to its row; then a fresh canvas."""
        if not requests:
            return
        rows = [r.row for r in requests]
        self.model.encode(self.argmax[self._index(requests)], self.cache, rows=rows)
        self.start_canvases(requests)

    @torch.inference_mode()
    def step(self, requests: list[Request]) -> list[StepResult]:
        """2b. One denoising step for every request in `requests` (each at its own step and context length)."""
        model, dev, C = self.model, self.device, self.canvas_length
        rows = [r.row for r in requests]
        # Per-row scalars go to the device in one copy, before any kernel is queued: a host-to-device copy from
        # pageable memory waits for the stream, so made here it costs nothing. fp32 holds the temperatures exactly.
        scalars = torch.tensor([[r.temperatures[r.step], r.gen.entropy_bound, r.step > 0, r.params.pin_prefix,
                                 r.greedy, r.step + 1 >= r.gen.max_denoising_steps] for r in requests],
                               dtype=torch.float32).to(dev)  # (R, 6)
        idx = self._index(requests)
        temps, bounds = scalars[:, 0], scalars[:, 1]
        with_signal, pin, greedy, last = (scalars[:, 2:] > 0.5).unbind(dim=1)
        canvas, prev_argmax = self.canvas[idx], self.argmax[idx]  # (R, C)
        signal = None
        if any(r.step > 0 for r in requests):
            # a row on its first step gets a zero signal, which the self-conditioning MLP maps to exactly zero
            signal = self.signal[idx] * with_signal[:, None, None].to(self.signal.dtype)

        # i. decoder pass
        hidden = model.denoise_hidden(canvas, self.cache, signal=signal, rows=rows)  # (R, C, H)
        # ii. temper, each row at its own step of its own schedule; iii. sample (one generator per row), accept.
        # Each row makes its draws in generate()'s order: the sample's Exp(1) race over (C, V), then the
        # renoising tokens. Only accepted positions keep their sample; greedy rows keep the argmax and draw no race.
        if self.row_sampler is not None:  # CPU: row by row through one (C, V) buffer (denoiser.RowSampler)
            rows_out = [self.row_sampler(hidden[i], temps[i], bounds[i], r.generator, race=not r.greedy)
                        for i, r in enumerate(requests)]
            argmax, entropy, accepted, sampled, next_signal = (torch.stack(t) for t in zip(*rows_out))
        else:
            # In place: (R, C, V) tensors are the largest of a step (2 GiB each for 8 rows of the released
            # model), so at most three live at once.
            logits = model.logits(hidden)
            probs, argmax, entropy = temper_and_score(logits, temps[:, None, None])  # uses up `logits`
            del logits
            next_signal = model.embed_probs(probs)  # (R, C, H) self-conditioning for the next step
            accepted = entropy_bound_accept(entropy, bounds[:, None])
            sampled = argmax.clone()
            for i, r in enumerate(requests):
                if not r.greedy:
                    sampled[i] = race_sample(probs[i], accepted[i], r.generator)
            del probs
        noise = torch.cat([random_tokens((1, C), self.vocab_size, r.generator, dev) for r in requests])  # (R, C)
        canvas = torch.where(accepted, sampled, noise)

        # settled prefix: pinned positions keep their value; new ones join once they settle
        pinned = self.positions[None] < self.num_pinned[idx][:, None]  # (R, C)
        argmax = torch.where(pinned, prev_argmax, argmax)
        confident = accepted & (entropy < self.confidence_threshold)
        streak = torch.where(confident, torch.where(argmax == prev_argmax, self.streak[idx] + 1, 1), 0)
        settled = (streak > self.stability_threshold) | pinned
        num_pinned = torch.where(pin, settled.long().cumprod(dim=-1).sum(dim=-1), 0)  # (R,)
        pinned = self.positions[None] < num_pinned[:, None]
        canvas = torch.where(pinned, argmax, canvas)

        # iv. stable and confident, or out of steps
        done = self.stopper(argmax, entropy, idx) | last

        self.canvas[idx] = canvas
        self.argmax[idx] = argmax
        self.streak[idx] = streak
        self.num_pinned[idx] = num_pinned
        self.signal[idx] = next_signal
        for r in requests:
            r.step += 1
            r.denoising_steps += 1
        # The one host sync per step: the scheduler must know which rows finished their canvas, and the stream
        # needs the settled tokens.
        host = torch.cat([done[:, None].long(), num_pinned[:, None], argmax], dim=1).tolist()
        return [StepResult(bool(h[0]), h[1], h[2:]) for h in host]

    def _index(self, requests: list[Request]) -> torch.Tensor:
        return torch.tensor([r.row for r in requests], device=self.device)
