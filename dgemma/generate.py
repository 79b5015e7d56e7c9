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

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .budget import ContextLengthError, canvases_for, check_prompt
from .config import GenerationConfig
from .config.generation import first_eos
from .control.infill import check_suffix, infill_steering, middle_length
from .control.pins import Steering, canvas_start
from .images import PromptImages
from .model import DiffusionGemma
from .sampling import random_tokens, temperature
from .control.dp import canvas_constraints
from .step import (DRAW, GREEDY, CanvasState, Sampler, SharedDraws, Strategy, default_strategy, denoise_step,
                   make_head, token_sampler)


@dataclass
class GenerationStats:
    canvases: int = 0
    denoising_steps: int = 0  # decoder passes, summed over rows that were still denoising
    generated_tokens: int = 0
    tokens_per_forward: float = 0.0
    rows_skipped: int = 0  # decoder row passes not run because the row had stopped (the ROWS strategy)
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
    middle_lengths: list[int | None] = field(default_factory=list)  # per row: the infilled middle's length


@dataclass
class StepView:
    """What a canvas watcher sees after each denoising step."""

    canvas_index: int
    step: int  # 1-based step within the canvas
    max_steps: int
    argmax_canvas: torch.Tensor  # (B, C)
    accepted: torch.Tensor  # (B, C) bool
    finished: torch.Tensor  # (B,) bool: row stopped denoising this canvas


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


@torch.inference_mode()
def generate(model: DiffusionGemma, prompts: list[list[int]], gen: GenerationConfig,
             generator: torch.Generator | None = None,
             on_step: Callable[[StepView], None] | None = None,
             cuda_graphs: bool | None = None, sampler: Sampler | str = Sampler.EXACT,
             strategy: Strategy | None = None,
             steering: list[Steering | None] | None = None, greedy: bool = False,
             images: PromptImages | None = None) -> GenerationOutput:
    """Generate continuations for `prompts` (lists of token ids). With `generator=None` the global torch RNG is
    used, which is what makes `torch.manual_seed(S)` reproduce the reference's tokens.

    `cuda_graphs` (default: on for a CUDA model with generator=None) replays each canvas's denoising step as a
    CUDA graph; the tokens are the same either way. `sampler` "exact" reproduces the reference's draws; "fast"
    samples the same distribution with one uniform per position. `strategy` defaults to the device's.
    `steering` (one per prompt, or None) pins output positions and seeds canvases (control/pins.py). `greedy`:
    every row's sample is the argmax (a request's temperature 0 in the engine). `images`: the prompts' images, whose
    image tokens the prompts already hold expanded (images.expand_image_tokens)."""
    t0 = time.perf_counter()
    batch = _prefill(model, prompts, gen, steering, images)  # 1.
    if batch.steering is not None and any(s is not None and s.constraint is not None for s in batch.steering):
        cuda_graphs = False if cuda_graphs is None else cuda_graphs  # the automaton's DP runs on the host
    denoiser = LockstepDenoiser(model, gen, len(prompts), generator, cuda_graphs, sampler, strategy, batch.max_new,
                                greedy)
    done = _denoise_canvases(model, gen, batch, denoiser, on_step)  # 2.
    out_ids, reasons = _results(done.committed, batch.max_new, gen.eos_token_id)  # 3.
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(x) for x in out_ids)
    stats = GenerationStats(
        canvases=done.canvases,
        denoising_steps=done.passes,
        generated_tokens=n_tokens,
        tokens_per_forward=n_tokens / done.passes if done.passes else 0.0,
        rows_skipped=denoiser.state.rows_skipped,
        prefill_seconds=batch.prefill_seconds,
        seconds=seconds,
        tokens_per_second=n_tokens / seconds if seconds > 0 else 0.0,
    )
    return GenerationOutput(out_ids, reasons, stats, done.steps_per_canvas, batch.middles)


@dataclass
class _Prefilled:
    """A batch after step 1: its cache holds the prompts; its steering is checked (with infill's middles)."""

    cache: object
    num_canvases: int
    max_new: int
    steering: list[Steering | None] | None
    middles: list[int | None]
    prefill_seconds: float


def _prefill(model: DiffusionGemma, prompts: list[list[int]], gen: GenerationConfig,
             steering: list[Steering | None] | None, images: PromptImages | None) -> _Prefilled:
    """1. Check the prompts and the steering, left-pad, allocate the cache, encode the prompts; choose each
    infilled middle's length and pin its suffix."""
    t0 = time.perf_counter()
    cfg, device, C = model.config, model.device, model.canvas_length
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        check_prompt(p, cfg.vocab_size, name=f"prompt {i}")
    tokens, valid = left_pad(prompts, gen.pad_token_id)
    B, T = tokens.shape
    num_canvases = canvases_for(T, gen.max_new_tokens, C, cfg.max_position_embeddings)
    max_new = gen.max_new_tokens or num_canvases * C
    longest_middle: list[int | None] = [None] * B
    if steering is not None:
        if len(steering) != B:
            raise ValueError(f"steering has {len(steering)} entries for {B} prompts")
        for b, s in enumerate(steering):
            if s is not None:
                s.check(cfg.vocab_size, max_new)
                if s.suffix is not None:  # before the prefill: refused for free
                    longest_middle[b] = check_suffix(s.suffix, C, max_new, s.constraint)
        if all(s is None or s.is_empty() for s in steering):
            steering = None
    tokens, valid = tokens.to(device), valid.to(device)
    # grown as canvases are committed, so an open-ended request does not reserve the whole context up front
    cache = model.new_cache(B, T + min(num_canvases, 4) * C)
    cache.set_left_padding(valid)
    if images is None:
        model.encode(tokens, cache)
    else:
        images.encode(model, tokens, cache)
    middles: list[int | None] = [None] * B
    if steering is not None:  # fill in the middle: choose each middle's length, then pin the suffix after it
        steering = list(steering)
        for b, s in enumerate(steering):
            if s is not None and s.suffix is not None:
                middles[b] = middle_length(model, cache, b, s.suffix, longest_middle[b], constraint=s.constraint)
                steering[b] = infill_steering(s.suffix, middles[b], gen.eos_token_id[0], s)
    if device.type == "cuda":  # time the prefill, not its launch
        torch.cuda.synchronize(device)
    return _Prefilled(cache, num_canvases, max_new, steering, middles, time.perf_counter() - t0)


@dataclass
class _Denoised:
    """A batch after step 2: its committed canvases and what it took."""

    committed: list[torch.Tensor]  # (B, C) each, EOS-cut and padded
    steps_per_canvas: list[list[int]]  # per row
    passes: int  # decoder passes of rows still going, all canvases
    canvases: int


def _denoise_canvases(model: DiffusionGemma, gen: GenerationConfig, batch: _Prefilled,
                      denoiser: LockstepDenoiser, on_step: Callable[[StepView], None] | None) -> _Denoised:
    """2. Denoise, commit and append canvases until every row has ended or the budget is spent."""
    state, cache, C = denoiser.state, batch.cache, model.canvas_length
    B = state.num_rows
    eos = torch.tensor(gen.eos_token_id, device=model.device)
    finished_seq = torch.zeros(B, dtype=torch.bool, device=model.device)
    passes = torch.zeros(B, dtype=torch.long, device=model.device)
    done = _Denoised([], [[] for _ in range(B)], 0, 0)
    for canvas_index in range(batch.num_canvases):
        # 2a. random canvas
        denoiser.start(cache, canvas_index, batch.steering)
        done.canvases += 1
        # 2b. denoising steps (step/). A row whose sequence has ended denoises on as in the reference (its
        # canvas is thrown away at the commit): the loop runs until every row has stopped, which fixes how many
        # random numbers a canvas draws, and so every later canvas's tokens.
        for step in range(1, gen.max_denoising_steps + 1):
            passes += ~(state.finished | finished_seq)
            denoiser.step(step)
            if on_step is not None:
                on_step(StepView(canvas_index, step, gen.max_denoising_steps, state.argmax, state.accepted,
                                 state.finished))
            # One host sync per step: the early exit needs to know on the host whether every row has stopped.
            if bool(state.finished.all()):
                break
        for b, n in enumerate(state.steps.tolist()):
            if not bool(finished_seq[b]):
                done.steps_per_canvas[b].append(n)
        denoiser.commit_states()
        # 2c. commit; EOS ends a row, and what follows it is padding
        block, ends = _commit_block(state.argmax, finished_seq, eos, gen.pad_token_id)
        done.committed.append(block)
        finished_seq = finished_seq | ends
        if bool(finished_seq.all()) or canvas_index == batch.num_canvases - 1:
            break
        # 2d. the encoder appends the committed canvas (plus room for the next canvas's scratch slots)
        cache.reserve(cache.length + 2 * C)
        model.encode(block, cache)
    done.passes = int(passes.sum())
    return done


def _commit_block(argmax_canvas: torch.Tensor, ended: torch.Tensor, eos: torch.Tensor,
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2c. The committed canvas (B, C): pad for rows that had ended, and after each row's first EOS; and which
    rows end here (B,) (an EOS in a row still going)."""
    block = argmax_canvas.clone()
    block[ended] = pad_id
    is_eos = torch.isin(block, eos) & ~ended[:, None]
    seen = is_eos.cumsum(dim=-1)
    block[(seen > 0) & ~((seen == 1) & is_eos)] = pad_id
    return block, is_eos.any(dim=-1)


def _results(committed: list[torch.Tensor], max_new: int, eos_ids: list[int]) -> tuple[list[list[int]], list[str]]:
    """3. Each row's tokens up to and including EOS, with finish_reason "stop" or "length"."""
    generated = torch.cat(committed, dim=1).tolist()
    eos_set = set(eos_ids)
    out_ids, reasons = [], []
    for row in generated:
        ids = row[:max_new]
        cut = first_eos(ids, eos_set)
        if cut is not None:
            out_ids.append(ids[: cut + 1])
            reasons.append("stop")
        else:
            out_ids.append(ids)
            reasons.append("length")
    return out_ids, reasons


class LockstepDenoiser:
    """Drives denoise_step for a whole batch in lockstep (step 2b): one generator in the reference's draw order
    (SharedDraws), one pick for every row, one forward plan per canvas (positions, masks and the K/V writer depend
    only on the cache length), and on CUDA the step captured once per canvas as a CUDA graph and replayed. A small
    model's step is hundreds of kernel launches that each take longer to issue than to run; a replay issues them
    all at once, and draws from the default CUDA generator exactly as the eager kernels would, so both give the
    same tokens."""

    _warm = False  # a first CUDA step has run eagerly in this process (see _warm_up)

    def __init__(self, model: DiffusionGemma, gen: GenerationConfig, batch_size: int,
                 generator: torch.Generator | None = None, cuda_graphs: bool | None = None,
                 sampler: Sampler | str = Sampler.EXACT, strategy: Strategy | None = None,
                 max_new: int | None = None, greedy: bool = False):
        device = model.device
        self.max_new = max_new
        self.automaton: list[int | None] = [None] * batch_size  # per row: its constraint's state so far
        self.model, self.gen, self.generator, self.device = model, gen, generator, device
        self.draws = SharedDraws(token_sampler(sampler, model.config.vocab_size, device))
        self.strategy = (Strategy(strategy) if strategy is not None
                         else default_strategy(device, self.draws.sampler.kind))
        self.head = make_head(self.strategy, model)
        self.generators = [generator] * batch_size
        self.picks = [GREEDY if greedy else DRAW] * batch_size
        graphable = model.graphs_capturable() and generator is None and self.strategy is Strategy.BATCHED
        if cuda_graphs is None:
            cuda_graphs = graphable
        if cuda_graphs and not graphable:
            raise ValueError("CUDA graphs need a bf16 model on CUDA, the batched strategy and the default generator "
                             "(generator=None)")
        self.cuda_graphs = cuda_graphs
        self.state = CanvasState(model, batch_size, gen.stability_threshold, gen.confidence_threshold)
        # the temperature of each step, computed as the reference does (fp32), then copied into `temp` per step
        self.temps = torch.stack([temperature(gen, n, torch.device("cpu"))
                                  for n in range(gen.max_denoising_steps, 0, -1)]).to(device)
        self.temp = self.temps[0].clone()
        self.bound = torch.tensor(gen.entropy_bound, dtype=torch.float32, device=device)
        self._step: Callable[[bool], None] = self._run

    def start(self, cache, canvas_index: int = 0, steering: list[Steering | None] | None = None) -> None:
        """2a. A uniform random canvas for every row (seeded and pinned as `steering` asks); the forward plan."""
        state = self.state
        canvas = random_tokens((state.num_rows, state.canvas_length), state.vocab_size, self.generator, self.device)
        if steering is None:
            state.start(None, canvas)
        else:
            B = state.num_rows
            state.start(None, eos_ids=self.gen.eos_token_id,
                        **canvas_constraints(canvas_start(canvas, steering, [canvas_index] * B, [self.generator] * B,
                                                          self.automaton, [self.max_new] * B)))
        self.plan = self.model.plan(cache, None, self.model.canvas_length, encoder=False)
        # a new plan: eager steps, or a graph captured for this canvas (once the process has run a step eagerly)
        self._step = self._run if not self.cuda_graphs else self._capture if LockstepDenoiser._warm else self._warm_up

    def commit_states(self) -> None:
        """The canvas is committed: each constrained row's automaton goes on from where its canvas ended."""
        for r, c in enumerate(self.state.constraints):
            if c is not None:
                self.automaton[r] = c.end_state

    def step(self, step: int) -> None:
        """Run denoising step `step` (1-based) of the current canvas."""
        self.temp.copy_(self.temps[step - 1])
        self._step(step == 1)

    def _run(self, first: bool) -> None:
        denoise_step(self.model, self.state, self.plan, self.head, self.draws, self.temp, self.bound,
                     self.generators, self.picks, first=first)

    def _warm_up(self, first: bool) -> None:
        """The process's first step runs eagerly on a side stream, as graph capture requires (library handles and
        workspaces are created lazily); the next step captures."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run(first=False)
        torch.cuda.current_stream(self.device).wait_stream(side)
        LockstepDenoiser._warm = True
        self._step = self._capture

    def _capture(self, first: bool) -> None:
        """Record the step as a graph (recording runs nothing), replay it, and replay it for every later step of
        this canvas. The signal is zeros on a first step, so the graph serves every step."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run(first=False)
        graph.replay()
        self._step = lambda first: graph.replay()
