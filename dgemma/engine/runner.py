"""The model runner: the KV cache, the rows' canvas state, and one engine step through the one denoising step.

One engine step runs one decoder pass over every denoising request, whatever its context length and its step
within its canvas, through step.denoise_step with a per-request draw policy: each row draws from its own
request's generator (canvas init: randint (1, C); per step: the sample's draws, then randint (1, C) for
renoising), so a seed gives the same tokens whatever else is batched. With the exact sampler and pinning off a
row is token-for-token `generate` of one prompt; the default is the fast sampler.

KV memory (kv.py): each request holds a block table in the paged cache, reuses the cached blocks its prompt starts
with, and encodes the rest in grid-aligned chunks, a few per engine step (chunked prefill): begin, then
prefill_chunk until the prompt is in, then its first canvas starts.

CUDA graphs (cuda_graphs=True, off by default): the decoder pass runs in graphs.py's buckets of static buffers,
captured and replayed on CUDA; the head stays eager.

Settled prefix (pin_prefix): see step/step.py's _pin. Settled positions are pinned for the rest of the canvas, so the
settled prefix is final and can be streamed before the canvas is committed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..control.dp import canvas_constraints
from ..control.infill import check_suffix, infill_steering, middle_length
from ..control.pins import canvas_start
from ..model import DiffusionGemma
from ..sampling import random_tokens
from ..step import (CanvasState, PerRowDraws, Sampler, Strategy, default_strategy, denoise_step, make_head,
                    token_sampler)
from .block_manager import DEFAULT_BLOCK_SIZE
from .graphs import DecoderGraphs
from .kv import DEFAULT_PREFILL_CHUNK, KVPool, Prefill
from .request import Request


@dataclass
class StepResult:
    """Host view of one row after a step."""

    canvas_done: bool  # stopped (stable and confident, or out of steps): commit the argmax canvas
    num_pinned: int  # length of the settled prefix
    argmax: list[int]  # (C,) the argmax canvas
    logprobs: tuple | None = None  # a row that records them: CanvasState.logprobs_of


class ModelRunner:
    def __init__(self, model: DiffusionGemma, max_num_seqs: int, max_model_len: int, stability_threshold: int,
                 confidence_threshold: float, sampler: Sampler | str = Sampler.FAST,
                 strategy: Strategy | None = None, *, num_blocks: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_caching: bool = True, cuda_graphs: bool = False):
        self.model = model
        self.device = model.device
        self.canvas_length = model.canvas_length
        self.vocab_size = model.config.vocab_size
        if num_blocks is None:  # as many slots as max_num_seqs rows of max_model_len
            num_blocks = max_num_seqs * -(-max_model_len // block_size)
        self.kv = KVPool(model, num_blocks, block_size, max_num_seqs, max_model_len, prefill_chunk,
                         prefix_caching, spare_block=cuda_graphs)
        self.cache = self.kv.cache
        self.prefills: dict[str, Prefill] = {}  # request id -> its prompt chunks left, in admission order
        self.state = CanvasState(model, max_num_seqs, stability_threshold, confidence_threshold)  # by cache row
        # the step's strategies, chosen once: each row draws from its request's generator; the head by device
        self.draws = PerRowDraws(token_sampler(sampler, self.vocab_size, self.device))
        self.strategy = (Strategy(strategy) if strategy is not None
                         else default_strategy(self.device, self.draws.sampler.kind))
        # the decoder pass: the model's, planned per step, or bucketed on static buffers (graphs.py)
        self.graphs = DecoderGraphs(model, self.cache, max_num_seqs) if cuda_graphs else None
        self.head = make_head(self.strategy, model, None if self.graphs is None else self.graphs.decode)

    def nbytes(self) -> int:
        return self.cache.nbytes() + self.state.nbytes() + self.head.nbytes()

    def begin(self, request: Request) -> None:
        """1a. Admission: the request's block table, with its cached prefix; its prompt chunks are queued."""
        self.prefills[request.request_id] = self.kv.begin(request)

    def is_prefilling(self, request: Request) -> bool:
        return request.request_id in self.prefills

    def next_prefill(self, budget: int | None) -> tuple[Request, int] | None:
        """The request whose prompt chunk is encoded next, first admitted first, and that chunk's tokens; None when
        no prompt is left or the next chunk exceeds `budget` (None: any chunk fits). Chunks found in the prefix
        cache meanwhile are taken from it first, at no cost (KVPool.adopt_cached)."""
        for prefill in self.prefills.values():
            self.kv.adopt_cached(prefill)
            if not prefill.chunks:  # all of it was in the cache: prefill_chunk starts its canvas
                return prefill.request, 0
            a, b = prefill.chunks[0]
            return None if budget is not None and b - a > budget else (prefill.request, b - a)
        return None

    def free(self, request: Request) -> None:
        """A finished or cancelled request: its blocks go back."""
        self.prefills.pop(request.request_id, None)
        self.kv.free(request)

    @torch.inference_mode()
    def prefill_chunk(self, request: Request) -> None:
        """1b. Encode the request's next prompt chunk (if one is left: next_prefill); after the last one, start its
        first canvas."""
        prefill = self.prefills[request.request_id]
        if prefill.chunks:
            self.kv.encode_chunk(prefill)
        if not prefill.chunks:
            del self.prefills[request.request_id]
            self.start(request)

    def start(self, request: Request) -> None:
        """1c. The prompt is in the cache: choose an infill middle's length, then start the first canvas."""
        row = request.row
        steering = request.params.steering
        if steering is not None and steering.suffix is not None:  # fill in the middle (control/infill.py)
            # refused at submit if it cannot fit (Engine.add_request); middle_length applies the constraint
            longest = check_suffix(steering.suffix, self.canvas_length, request.max_new)
            length = middle_length(self.model, self.cache, row, steering.suffix, longest,
                                   constraint=steering.constraint)
            request.infill(length, infill_steering(steering.suffix, length, request.gen.eos_token_id[0], steering))
        self.start_canvases([request])

    def start_canvases(self, requests: list[Request]) -> None:
        """2a. A uniform random canvas per request, drawn from the request's generator."""
        if not requests:
            return
        canvas = torch.cat([random_tokens((1, self.canvas_length), self.vocab_size, r.generator, self.device)
                            for r in requests])  # (R, C)
        rows = [r.row for r in requests]
        steerings = [r.params.steering for r in requests]
        records = [r.records for r in requests]
        if all(s is None for s in steerings):
            self.state.start(rows, canvas, records=records)
            return
        # each request is at its own canvas, with its own generator, automaton state and budget
        self.state.start(rows, eos_ids=requests[0].gen.eos_token_id,
                         **canvas_constraints(canvas_start(canvas, steerings, [r.canvas_index for r in requests],
                                                           [r.generator for r in requests],
                                                           [r.automaton_state for r in requests],
                                                           [r.max_new for r in requests])), records=records)

    @torch.inference_mode()
    def commit(self, requests: list[Request]) -> None:
        """2d. The encoder appends each request's committed argmax canvas to its row; then a fresh canvas."""
        if not requests:
            return
        rows = [r.row for r in requests]
        canvases = self.state.argmax[torch.tensor(rows, device=self.device)]  # (R, C)
        self.model.encode(canvases, self.cache, rows=rows)
        for r, tokens in zip(requests, canvases.tolist()):
            self.kv.append(r, tokens)
        for r in requests:  # a constrained request's automaton goes on from where its canvas ended
            if self.state.constraints[r.row] is not None:
                r.automaton_state = self.state.constraints[r.row].end_state
        self.start_canvases(requests)

    @torch.inference_mode()
    def step(self, requests: list[Request]) -> list[StepResult]:
        """2b. One denoising step for every request in `requests` (each at its own step and context length)."""
        rows = [r.row for r in requests]
        # Per-row scalars go to the device in one copy, before any kernel is queued: a host-to-device copy from
        # pageable memory waits for the stream, so made here it costs nothing. fp32 holds the temperatures exactly.
        scalars = torch.tensor([[r.temperatures[r.step], r.gen.entropy_bound, r.params.pin_prefix,
                                 r.step + 1 >= r.gen.max_denoising_steps] for r in requests],
                               dtype=torch.float32).to(self.device)  # (R, 4)
        temps, bounds = scalars[:, 0], scalars[:, 1]
        pin, last = (scalars[:, 2:] > 0.5).unbind(dim=1)
        plan = (self.model.plan(self.cache, rows, self.canvas_length, encoder=False) if self.graphs is None
                else self.graphs.plan(rows))
        done = denoise_step(self.model, self.state, plan, self.head, self.draws, temps, bounds,
                            [r.generator for r in requests], [r.pick for r in requests], rows=rows,
                            settle=pin if any(r.params.pin_prefix for r in requests) else None, last=last,
                            first=all(r.step == 0 for r in requests))
        idx = torch.tensor(rows, device=self.device)
        # The one host sync per step: the scheduler must know which rows finished their canvas, and the stream
        # needs the settled tokens.
        host = torch.cat([done[:, None].long(), self.state.num_settled[idx][:, None], self.state.argmax[idx]],
                         dim=1).tolist()
        return [StepResult(bool(h[0]), h[1], h[2:], self.state.logprobs_of(r.row) if r.records else None)
                for h, r in zip(host, requests)]
