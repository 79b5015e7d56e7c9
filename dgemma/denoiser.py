"""Step 2b of generate.py: the denoising steps of one canvas, for a batch of rows in lockstep.

All state lives in buffers allocated once and updated in place, so a step is the same sequence of kernels on the
same memory every time. That lets it run eagerly, or, on CUDA, be captured once per canvas as a CUDA graph and
replayed: a small model's step is hundreds of kernel launches that each take longer to issue than to run, and a
replay issues them all at once. Replays draw from the default CUDA generator exactly as the eager kernels would,
so both give the same tokens.

Per step, for every row that is still denoising:
  i.   decoder pass over the canvas, self-conditioned on the previous step's tempered probabilities;
  ii.  temper the logits (t_max at the first step, falling linearly toward t_min);
  iii. sample a token per position; accept the entropy-bound set; renoise the rest uniformly;
  iv.  stop the row once its argmax canvas is stable and its mean entropy is below the threshold.
A row that has stopped keeps its state. The self-conditioning signal of the first step is zeros, which the block
maps exactly to "no signal".
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .config import GenerationConfig
from .model import DiffusionGemma
from .sampling import (StableAndConfident, entropy_bound_accept, race_matches_multinomial, race_sample, random_tokens,
                       sample_step, skip_race, temper_and_score, temperature)


class CanvasDenoiser:
    _warm = False  # a first CUDA step has run eagerly in this process (see step)
    skip_stopped_rows = True  # CPU: rows that stopped are not computed (_step_rows); False computes them

    def __init__(self, model: DiffusionGemma, gen: GenerationConfig, batch_size: int,
                 generator: torch.Generator | None = None, cuda_graphs: bool | None = None):
        device, C, H = model.device, model.canvas_length, model.config.hidden_size
        self.model, self.gen, self.generator = model, gen, generator
        self.batch_size, self.device = batch_size, device
        # The MoE's grouped GEMM keeps its group sizes on the device only in the native bf16 kernel; in fp32 torch
        # falls back to a loop that reads them on the host, which a graph cannot capture.
        graphable = device.type == "cuda" and generator is None and model.dtype == torch.bfloat16
        if cuda_graphs is None:
            cuda_graphs = graphable
        if cuda_graphs and not graphable:
            raise ValueError("CUDA graphs need a bf16 model on CUDA and the default generator (generator=None)")
        self.cuda_graphs = cuda_graphs
        B = batch_size
        self.canvas = torch.zeros(B, C, dtype=torch.long, device=device)
        self.argmax = torch.zeros(B, C, dtype=torch.long, device=device)
        self.accepted = torch.zeros(B, C, dtype=torch.bool, device=device)
        self.signal = torch.zeros(B, C, H, dtype=model.dtype, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)  # stopped denoising this canvas
        self.ended = torch.zeros(B, dtype=torch.bool, device=device)  # sequence ended (EOS) in an earlier canvas
        self.steps = torch.zeros(B, dtype=torch.long, device=device)  # steps this canvas, per row
        self.passes = torch.zeros(B, dtype=torch.long, device=device)  # decoder passes of live rows, all canvases
        self.stopper = StableAndConfident(gen.stability_threshold, gen.confidence_threshold, B, C, device)
        # the temperature of each step, computed as the reference does (fp32), then copied into `temp` per step
        self.temps = torch.stack([temperature(gen, n, torch.device("cpu"))
                                  for n in range(gen.max_denoising_steps, 0, -1)]).to(device)
        self.temp = self.temps[0].clone()
        self._plan = None
        self._graph: torch.cuda.CUDAGraph | None = None
        # CPU: the sampler runs row by row (_step_rows) through one reused (C, V) buffer. That needs the race
        # to reproduce multinomial's draws (a row's draws then come in batch order); where it does not, the
        # batch is sampled in one multinomial call as on a GPU.
        self._row_by_row = device.type == "cpu" and race_matches_multinomial(device)
        if self._row_by_row:
            self._row_sampler = RowSampler(model)
        self.rows_skipped = 0  # decoder passes not run because the row had stopped (CPU)

    def start(self, cache: KVCache, ended: torch.Tensor) -> None:
        """Begin a canvas after the cache's committed tokens: draw a uniform random canvas and reset the state."""
        canvas = random_tokens(tuple(self.canvas.shape), self.model.config.vocab_size, self.generator, self.device)
        self.canvas.copy_(canvas)
        self.argmax.copy_(canvas)
        self.signal.zero_()
        self.finished.zero_()
        self.steps.zero_()
        self.stopper.reset()
        self.ended.copy_(ended)
        # positions, masks and the K/V writer depend only on the cache length: fixed for the whole canvas
        self._plan = self.model._plan(cache, None, self.model.canvas_length, encoder=False)
        self._cache = cache
        self._graph = None

    def step(self, step: int) -> None:
        """Run denoising step `step` (1-based) of the current canvas."""
        self.temp.copy_(self.temps[step - 1])
        if self._row_by_row:  # CPU
            self._step_rows()
        elif not self.cuda_graphs:
            self._step()
        elif self._graph is not None:
            self._graph.replay()
        elif not CanvasDenoiser._warm:
            # The process's first step runs eagerly on a side stream, as graph capture requires (library handles
            # and workspaces are created lazily); the next step captures.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            CanvasDenoiser._warm = True
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the step without running it; the replay runs it
                self._step()
            self._graph = graph
            graph.replay()

    def all_finished(self) -> bool:
        """Whether every row has stopped (one host sync)."""
        return bool((self.finished | self.ended).all())

    def _step(self) -> None:
        """The whole-batch step (GPU): a fixed sequence of kernels, so it can be captured as a graph."""
        model, gen = self.model, self.gen
        positions, masks, writer, _, _ = self._plan
        finished = self.finished
        self.passes.add_(~(finished | self.ended))
        self.steps.add_(~finished)
        # i. decoder pass
        x = model.self_conditioning(model.embed(self.canvas), self.signal)
        logits = model.logits(model.run_layers(x, positions, masks, writer, encoder=False))
        # ii-iii. temper, sample, accept, renoise
        probs, sampled, new_argmax, entropy, accepted = sample_step(logits, self.temp, gen.entropy_bound,
                                                                    self.generator)
        del logits
        noise = random_tokens(tuple(self.canvas.shape), model.config.vocab_size, self.generator, self.device)
        # iv. rows already stopped keep their state
        keep = finished[:, None]
        self.canvas.copy_(torch.where(keep, self.canvas, torch.where(accepted, sampled, noise)))
        self.argmax.copy_(torch.where(keep, self.argmax, new_argmax))
        self.signal.copy_(torch.where(keep[..., None], self.signal, model.embed_probs(probs)))
        self.accepted.copy_(accepted)
        # a stopped row's entropy no longer matters: `finished` only ever turns on
        finished.logical_or_(self.stopper(self.argmax, entropy))

    def _step_rows(self) -> None:
        """The CPU step. The decoder runs over the rows still denoising (all rows if skip_stopped_rows is off);
        then, row by row, the head, the sampler and the next self-conditioning signal run through one (C, V)
        buffer that is reused every step, so a step's memory does not grow with the batch and the canvas x
        vocabulary work stays in warm memory. Each row draws its race (or throws it away, for a row that has
        stopped) in batch order, then the batch draws its noise, so every row gets exactly what the reference's
        whole-batch calls give it (a row's results do not depend on the other rows; the parity tests check this)."""
        model, gen, (B, C), V = self.model, self.gen, self.canvas.shape, self.model.config.vocab_size
        stopped = self.finished | self.ended
        self.passes.add_(~stopped)
        self.steps.add_(~self.finished)
        live = (~stopped).nonzero().squeeze(1).tolist()  # a host sync, free on CPU
        computed = live if self.skip_stopped_rows else list(range(B))
        self.accepted.zero_()
        if not computed:  # nothing to compute; the draws still happen
            self.rows_skipped += B
            skip_race(B * C, V, self.generator)
            random_tokens((B, C), V, self.generator, self.device)
            return
        # i. decoder pass over the computed rows
        positions, masks, writer, _, kv_start = self._plan
        if len(computed) < B:
            rows = torch.tensor(computed, device=self.device)
            masks = {k: (m if m is None or m.shape[0] == 1 else m[rows]) for k, m in masks.items()}
            length = self._cache.lengths[computed[0]]
            writer = self._cache.writer(computed, torch.full((len(computed),), length, device=self.device),
                                        kv_start, length + C)
            x = model.self_conditioning(model.embed(self.canvas[rows]), self.signal[rows])
        else:
            x = model.self_conditioning(model.embed(self.canvas), self.signal)
        hidden = model.run_layers(x, positions, masks, writer, encoder=False)  # (len(computed), C, H)
        self.rows_skipped += B - len(computed)
        # ii-iii. per row: head, temper, accept, race; a row that has stopped only advances the generator
        sampled = torch.zeros(B, C, dtype=torch.long, device=self.device)
        entropy = torch.full((B, C), float("inf"), device=self.device)  # inf: never confident, stays as it was
        where = {b: j for j, b in enumerate(computed)}  # batch row -> row of `hidden`
        live_rows = set(live)
        for b in range(B):
            if b in live_rows:
                self.argmax[b], entropy[b], self.accepted[b], sampled[b], self.signal[b] = self._row_sampler(
                    hidden[where[b]], self.temp, gen.entropy_bound, self.generator)
                continue
            if b in where:  # computed, as skip_stopped_rows=False asks, and thrown away
                self._row_sampler(hidden[where[b]], self.temp, gen.entropy_bound, None, race=False)
            skip_race(C, V, self.generator)
        noise = random_tokens((B, C), V, self.generator, self.device)
        # iv. only live rows change
        if live:
            rows = torch.tensor(live, device=self.device)
            self.canvas[rows] = torch.where(self.accepted[rows], sampled[rows], noise[rows])
        self.finished.logical_or_(self.stopper(self.argmax, entropy))


class RowSampler:
    """CPU: steps ii-iii of a denoising step and the next self-conditioning signal, for one row at a time, through
    one (C, V) buffer reused for every row and step: the head writes the row's raw logits into it, the sampler
    caps, tempers and scores them block by block in cache and leaves the probabilities in their place, and the
    race and the self-conditioning matmul read them from there. Needs race_sample to reproduce multinomial's
    draws (race_matches_multinomial), since the rows then draw one after another."""

    def __init__(self, model: DiffusionGemma):
        self.model = model
        self.buffer = torch.empty(model.canvas_length, model.config.vocab_size, dtype=torch.float32)

    def __call__(self, hidden: torch.Tensor, temp: torch.Tensor, entropy_bound: float | torch.Tensor,
                 generator: torch.Generator | None, race: bool = True):
        """hidden (C, H): the row's final decoder states. Returns (argmax, entropy, accepted, sampled, signal);
        without `race` (greedy), nothing is drawn and `sampled` is the argmax."""
        model = self.model
        logits = model.head_into(hidden, self.buffer)
        probs, argmax, entropy = temper_and_score(logits, temp, model.config.final_logit_softcapping,
                                                  probs_in_place=True)
        accepted = entropy_bound_accept(entropy, entropy_bound)
        sampled = race_sample(probs, accepted, generator) if race else argmax
        return argmax, entropy, accepted, sampled, model.embed_probs(probs)
