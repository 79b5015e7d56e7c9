"""The serving engine: continuous batching of block-diffusion requests on one background thread.

One engine step:
  1. drop cancelled requests (their rows are free at once);
  2. admit waiting requests onto free rows while their KV blocks fit (each reuses its prompt's cached blocks), then
     encode up to `prefill_budget` prompt tokens in chunks (encoder; chunked prefill: a long prompt takes several
     engine steps, and the requests already denoising keep stepping meanwhile; a chunk that a request admitted
     before it with the same prefix has encoded meanwhile, as the n choices of one prompt, is taken from the
     prefix cache instead, and the same prompt's last chunk from that request: kv.py);
  3. one batched denoising step for every request whose prompt is in (decoder; runner.py);
  4. per request: report newly settled tokens and text; finish on EOS, a stop string, max_tokens or the context
     limit; otherwise a request whose canvas is done commits it (encoder appends) and starts the next one.

HTTP handlers talk to the engine only through `add_request` / `abort` (thread-safe) and the sink callback each
request carries, which the engine calls from its thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass


from ..budget import PromptError, check_prompt
from ..config import ConfigError, GenerationConfig
from ..control.infill import check_suffix
from ..control.pins import SteeringError
from ..model import DiffusionGemma
from ..paged_cache import blocks_for_budget, default_kv_cache_gib
from ..step import Sampler
from .block_manager import DEFAULT_BLOCK_SIZE, PrefixCacheStats
from .detokenizer import TextStream
from .kv import DEFAULT_PREFILL_CHUNK
from .request import Request, RequestError, RequestOutput, SamplingParams, Sink
from .runner import ModelRunner
from .scheduler import Scheduler, canvases_for

log = logging.getLogger("dgemma.engine")


@dataclass
class Completion:
    """A whole request's result, gathered from its outputs (Engine.generate)."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    denoising_steps: int
    error: str | None = None


@dataclass(frozen=True)
class StepTime:
    """One engine step's wall time (Engine.step_times): when it began (time.monotonic), how long it took, the prompt
    tokens it encoded and the seconds that took (admission included), the rows it denoised, and the seconds the
    encoder took to append the canvases they committed."""

    start: float
    seconds: float
    prefill_tokens: int
    prefill_seconds: float
    rows: int
    commit_seconds: float = 0.0


STEP_TIMES_KEPT = 10_000  # the most recent engine steps Engine.step_times keeps


class Engine:
    def __init__(self, model: DiffusionGemma, generation: GenerationConfig, tokenizer=None, max_num_seqs: int = 8,
                 max_model_len: int | None = None, max_waiting: int | None = None, prefill_budget: int = 512,
                 sampler: Sampler | str = Sampler.FAST, kv_cache_gib: float | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_caching: bool = True, cuda_graphs: bool = False):
        cfg = model.config
        self.model = model
        self.generation = generation
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if self.max_model_len <= model.canvas_length:
            raise ValueError(f"max_model_len={self.max_model_len} leaves no room for a prompt and a "
                             f"{model.canvas_length}-token canvas")
        self.prefill_budget = prefill_budget
        if kv_cache_gib is None:
            kv_cache_gib = default_kv_cache_gib(cfg, block_size, model.dtype, max_num_seqs, self.max_model_len,
                                                model.device)
        self.kv_cache_gib = kv_cache_gib
        num_blocks = blocks_for_budget(cfg, block_size, model.dtype, kv_cache_gib, self.max_model_len)
        self.runner = ModelRunner(model, max_num_seqs, self.max_model_len, generation.stability_threshold,
                                  generation.confidence_threshold, sampler, num_blocks=num_blocks,
                                  block_size=block_size, prefill_chunk=prefill_chunk,
                                  prefix_caching=prefix_caching, cuda_graphs=cuda_graphs)
        self.scheduler = Scheduler(max_num_seqs, max_waiting if max_waiting is not None else 8 * max_num_seqs,
                                   on_release=lambda request: self.runner.free(request))
        self.num_steps = 0  # engine steps (batched decoder passes)
        self.step_times: deque[StepTime] = deque(maxlen=STEP_TIMES_KEPT)  # the steps that encoded or denoised
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- called from any thread ------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams, sink: Sink,
                    request_id: str | None = None) -> Request:
        """Validate and queue a request. Raises RequestError (400) or QueueFullError (429)."""
        try:
            check_prompt(prompt, self.model.config.vocab_size)
        except PromptError as e:
            raise RequestError(str(e), e.param) from None
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a model with a tokenizer", "stop")
        try:
            gen = params.generation_config(self.generation)
        except ConfigError as e:
            raise RequestError(str(e)) from None
        C = self.model.canvas_length
        max_canvases = canvases_for(len(prompt), params.max_tokens, C, self.max_model_len)
        text = None
        if self.tokenizer is not None:
            text = TextStream(self.tokenizer.decode, params.skip_special_tokens, gen.eos_token_id, params.stop)
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        if params.steering is not None:
            max_new = min(params.max_tokens or max_canvases * C, max_canvases * C)
            try:
                params.steering.check(self.model.config.vocab_size, max_new, span=max_canvases * C)
                if params.steering.suffix is not None:
                    check_suffix(params.steering.suffix, C, max_new, params.steering.constraint)
            except SteeringError as e:
                raise RequestError(str(e), e.param) from None
        request = Request(request_id or f"req-{next(self._ids)}", prompt, params, gen, C, max_canvases,
                          self.model.device, sink, text, decode, self.model.config.vocab_size)
        self.runner.kv.check_fits(request)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> None:
        """Cancel a request; its cache row is freed before the next engine step."""
        self.scheduler.abort(request_id)

    def generate(self, prompt: list[int], params: SamplingParams, timeout: float | None = None) -> Completion:
        """Blocking helper: run one request to the end (the engine thread must be running)."""
        outputs: queue.Queue[RequestOutput] = queue.Queue()
        request = self.add_request(prompt, params, outputs.put)
        ids, text = [], []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out = outputs.get(timeout=wait)
            except queue.Empty:
                self.abort(request.request_id)
                raise TimeoutError(f"request {request.request_id} did not finish in {timeout} s") from None
            ids += out.token_ids
            text.append(out.text)
            if out.finished:
                return Completion(ids, "".join(text), out.finish_reason, out.prompt_tokens, out.completion_tokens,
                                  out.denoising_steps, out.error)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="dgemma-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        with self.scheduler.lock:
            self.scheduler.wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- engine thread -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            self.scheduler.wait_for_work(timeout=0.5)
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 (keep serving; fail what was running)
                log.error("engine step failed:\n%s", traceback.format_exc())
                for request in list(self.scheduler.running.values()):
                    self._finish(request, "error", error=f"internal error: {type(e).__name__}: {e}")

    def step(self) -> None:
        """One engine step (see the module docstring). Runs on the engine thread, or directly in tests."""
        start = time.monotonic()
        # 1. cancelled requests
        running, waiting = self.scheduler.take_aborted()
        for request in running + waiting:
            self._report(request, [], "", finish_reason="abort")
        # 2. admission, then this step's prompt chunks
        while (request := self.scheduler.admit(self.runner.kv.can_admit)) is not None:
            self._prefill(self.runner.begin, request)
        spent = 0  # this step's prompt tokens: up to prefill_budget, and at least one chunk
        while (chunk := self.runner.next_prefill(self.prefill_budget - spent if spent else None)) is not None:
            request, size = chunk
            spent += size
            self._prefill(self.runner.prefill_chunk, request)
        prefilled = time.monotonic()
        batch = sorted((r for r in self.scheduler.running.values() if not self.runner.is_prefilling(r)),
                       key=lambda r: r.row)
        committed = self._denoise(batch) if batch else 0.0
        if batch or spent:
            self.step_times.append(StepTime(start, time.monotonic() - start, spent, prefilled - start, len(batch),
                                            committed))

    def _denoise(self, batch: list[Request]) -> float:
        """Steps 3 and 4 for the requests whose prompt is in -> the seconds their commits took."""
        # 3. one batched denoising step
        results = self.runner.step(batch)
        self.num_steps += 1
        # 4. report, finish or commit
        to_commit = []
        for request, result in zip(batch, results):
            progress = request.apply(result)
            if progress.finish_reason is not None:
                self._finish(request, progress.finish_reason, progress.token_ids, progress.text, progress.logprobs)
                continue
            self._report(request, progress.token_ids, progress.text, draft=progress.draft, logprobs=progress.logprobs)
            if progress.commit:
                to_commit.append(request)
        if not to_commit:
            return 0.0
        start = time.monotonic()
        self.runner.commit(to_commit)
        return time.monotonic() - start

    def _prefill(self, stage, request: Request) -> None:
        try:
            stage(request)
        except Exception as e:  # noqa: BLE001 (a prompt that breaks prefill must not stop the others)
            log.error("prefill failed:\n%s", traceback.format_exc())
            self._finish(request, "error", error=f"prefill failed: {type(e).__name__}: {e}")

    def kv_stats(self) -> PrefixCacheStats:
        """The paged KV cache's block usage and prefix-cache hits (for /metrics)."""
        return self.runner.kv.stats()

    def _finish(self, request: Request, reason: str, ids: list[int] | None = None, text: str = "",
                logprobs: list | None = None, error: str | None = None) -> None:
        self.scheduler.finish(request)
        self._report(request, ids if ids is not None else [], text, finish_reason=reason, error=error,
                     logprobs=logprobs)

    def _report(self, request: Request, ids: list[int], text: str, draft: str | None = None,
                finish_reason: str | None = None, error: str | None = None, logprobs: list | None = None) -> None:
        request.num_reported += len(ids)
        if not ids and not text and draft is None and finish_reason is None:
            return
        if ids and request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        if logprobs is None and request.records:
            logprobs = []  # an output of a request that asked carries its (possibly empty) list
        out = RequestOutput(request.request_id, ids, text, draft, finish_reason is not None, finish_reason,
                            error, len(request.prompt), request.num_reported, request.denoising_steps,
                            logprobs=logprobs)
        if out.finished:
            now = time.perf_counter()
            out.latency = now - request.arrival
            out.ttft = None if request.first_token_time is None else request.first_token_time - request.arrival
        try:
            request.sink(out)
        except Exception:  # noqa: BLE001 (a broken sink, e.g. a closed event loop, must not stop the engine)
            log.warning("dropping output for %s: its sink failed", request.request_id)
            self.abort(request.request_id)

    # -- EngineClient (client.py): the model facts the server reads --------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def canvas_length(self) -> int:
        return self.model.canvas_length
