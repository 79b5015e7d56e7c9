"""A request as the engine sees it: its sampling parameters, its per-request RNG and its progress.

A request moves WAITING -> (prefill) DENOISING -> (commit, next canvas) ... -> FINISHED. Everything on the host;
the per-row device state (canvas, argmax canvas, self-conditioning signal) lives in the runner.
"""

from __future__ import annotations

import dataclasses

import enum
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import GenerationConfig
from ..config.checks import is_int, is_num
from ..config.generation import first_eos
from ..control.pins import Steering
from ..errors import DgemmaError
from ..sampling import temperature
from ..step import TOP_LOGPROBS, pick_for
from .detokenizer import TextStream


class RequestError(DgemmaError, ValueError):
    """A request the engine cannot serve (bad parameter, too long for the context). The server answers 400."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """Per-request parameters. Diffusion parameters left as None take the checkpoint's generation config.

    temperature (tau) scales both ends of the t_max -> t_min schedule: the step-n temperature is
    tau * (t_min + (t_max - t_min) * n / N). tau = 1 is the checkpoint's schedule. tau = 0 is greedy: the sampled
    token is the argmax; entropies, acceptance and self-conditioning still use the tau = 1 schedule.

    top_k, top_p (None: off): the token kept at an accepted position is drawn from its top_k most probable tokens,
    then from the smallest most-probable set of those whose mass reaches top_p of theirs (sampling.TopKTopP, as
    vLLM applies them per request). The cut shapes only that draw: which positions are accepted (the entropy
    bound), the stop test and the self-conditioning read the whole tempered distribution, as with temperature 0,
    so top_k=1 writes the argmax and a canvas settles at the pace it would uncut. A greedy request ignores them.

    pin_prefix: once a prefix of the canvas has settled (see runner.py) it is kept fixed for the rest of that
    canvas, so it can be streamed before the canvas is committed and is never retracted.

    logprobs (None: off): each output token comes with its log-probability and those of the `logprobs` most
    probable tokens at its position (0 to TOP_LOGPROBS), as step/logprobs.py records them.

    read_only (vLLM's diffusion_read_only): the request reads its first canvas and ends there, after
    max_denoising_steps steps or once the canvas has stopped: the output is the whole argmax canvas, one token per
    canvas position (not cut at max_tokens or EOS), with the log-probabilities of every position (TOP_LOGPROBS
    alternatives unless `logprobs` says otherwise).
    """

    max_tokens: int | None = None  # None: until EOS or the context limit
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    temperature: float = 1.0
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    pin_prefix: bool = True
    include_drafts: bool = False
    skip_special_tokens: bool = True
    steering: Steering | None = None  # pinned output positions and a seeded canvas (control/pins.py)
    logprobs: int | None = None
    read_only: bool = False
    images: object = None  # images.PromptImages of the prompt (its image tokens expanded); the tower runs at prefill

    def __post_init__(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise RequestError(f"{param} {message}", param)

        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens > 0), "max_tokens",
              f"must be a positive integer, got {self.max_tokens!r}")
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop), "stop",
              "must be a list of non-empty strings")
        check(self.seed is None or is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        check(is_num(self.temperature) and 0 <= self.temperature <= 2, "temperature",
              f"must be in [0, 2], got {self.temperature!r}")
        check(self.max_denoising_steps is None or (is_int(self.max_denoising_steps)
                                                   and 0 < self.max_denoising_steps <= 1024),
              "max_denoising_steps", f"must be an integer in [1, 1024], got {self.max_denoising_steps!r}")
        check(self.entropy_bound is None or (is_num(self.entropy_bound) and self.entropy_bound > 0),
              "entropy_bound", f"must be a number > 0, got {self.entropy_bound!r}")
        check(self.top_k is None or (is_int(self.top_k) and self.top_k > 0), "top_k",
              f"must be a positive integer (leave it unset for no cut), got {self.top_k!r}")
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= TOP_LOGPROBS), "logprobs",
              f"must be an integer in [0, {TOP_LOGPROBS}], got {self.logprobs!r}")
        check(isinstance(self.read_only, bool), "read_only", f"must be a boolean, got {self.read_only!r}")
        check(self.top_p is None or (is_num(self.top_p) and 0 < self.top_p <= 1), "top_p",
              f"must be a number in (0, 1] (leave it unset for no cut), got {self.top_p!r}")
        for name in ("t_min", "t_max"):
            value = getattr(self, name)
            check(value is None or (is_num(value) and 0 <= value <= 100), name,
                  f"must be a number in [0, 100], got {value!r}")

    def generation_config(self, base: GenerationConfig) -> GenerationConfig:
        """The checkpoint's config with this request's overrides; tau scales the schedule (tau = 0 keeps it)."""
        t_min = base.t_min if self.t_min is None else self.t_min
        t_max = base.t_max if self.t_max is None else self.t_max
        if t_max <= t_min:
            raise RequestError(f"t_max ({t_max}) must be greater than t_min ({t_min})", "t_max")
        gen = base.replace(max_denoising_steps=self.max_denoising_steps, entropy_bound=self.entropy_bound,
                           t_min=t_min, t_max=t_max)
        if self.temperature not in (0, 1):
            gen = gen.replace(t_min=gen.t_min * self.temperature, t_max=gen.t_max * self.temperature)
        return gen


class Status(enum.Enum):
    WAITING = "waiting"
    DENOISING = "denoising"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What the engine reports to a request's sink: new settled tokens and text, an optional draft, the end."""

    request_id: str
    token_ids: list[int]  # new output tokens since the last report
    text: str  # new text since the last report ("" without a tokenizer)
    draft: str | None = None  # include_drafts: the unsettled rest of the current canvas
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    denoising_steps: int = 0
    ttft: float | None = None  # seconds from arrival to the first output token (set when finished)
    latency: float | None = None  # seconds from arrival to the end (set when finished)
    # with SamplingParams.logprobs, per token of token_ids: (its log-probability, [(token id, log-probability) of
    # the most probable tokens at its position, most probable first])
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    def merged(self, later: RequestOutput) -> RequestOutput:
        """This output followed by `later`, as one: tokens and text joined, the newest draft, `later`'s end."""
        logprobs = None if self.logprobs is None else self.logprobs + (later.logprobs or [])
        return dataclasses.replace(later, token_ids=self.token_ids + later.token_ids, text=self.text + later.text,
                                   draft=later.draft if later.draft is not None else self.draft, logprobs=logprobs)


Sink = Callable[[RequestOutput], None]


class Request:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, gen: GenerationConfig,
                 canvas_length: int, max_canvases: int, device: torch.device, sink: Sink,
                 text: TextStream | None, decode: Callable[[list[int], bool], str] | None = None,
                 vocab_size: int | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.gen = gen
        self.sink = sink
        self.text = text
        self.decode = decode  # token ids, skip_special_tokens -> text (drafts); None without a tokenizer
        self.status = Status.WAITING
        self.row: int | None = None
        self.max_canvases = max_canvases
        self.max_new = min(params.max_tokens or max_canvases * canvas_length, max_canvases * canvas_length)
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        # One generator per request, on the model's device, so a seed gives the same draws whatever is batched.
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        # The temperature of each step, computed once with the offline loop's own fp32 arithmetic.
        n_steps = gen.max_denoising_steps
        self.temperatures = [float(temperature(gen, n, torch.device("cpu"))) for n in range(n_steps, 0, -1)]
        # how the row picks its kept tokens, made once: the step never tests a request's parameters
        self.pick = pick_for(params.temperature == 0, params.top_k, params.top_p, vocab_size)
        self.eos = set(gen.eos_token_id)
        # log-probabilities: recorded by the step for this row; `num_top` alternatives reported per token
        self.records = params.logprobs is not None or params.read_only
        self.num_top = TOP_LOGPROBS if params.logprobs is None else params.logprobs
        self.stop_at: int | None = None  # fill in the middle: the output is the middle, this many tokens
        self.automaton_state: int | None = None  # a constrained request's automaton state after its commits
        self.committed: list[int] = []  # tokens of committed canvases
        self.settled: list[int] = []  # the settled prefix of the current canvas
        self.committed_logprobs: list = []  # with records: per token of committed / settled, RequestOutput's entry
        self.settled_logprobs: list = []
        self.num_reported = 0  # output tokens already sent to the sink
        self.last_draft: str | None = None
        self.canvas_index = 0
        self.step = 0  # denoising steps done on the current canvas
        self.denoising_steps = 0
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None

    @property
    def num_canvases_left(self) -> int:
        return self.max_canvases - self.canvas_index

    def new_output_ids(self) -> tuple[list[int], bool]:
        """Output tokens not yet reported (committed + settled prefix, cut at max_new and after EOS), and whether EOS
        was reached. Only the new tokens are looked at: the ones before were checked when they were reported."""
        start, num_committed = self.num_reported, len(self.committed)
        if start < num_committed:
            new = self.committed[start:] + self.settled
        else:
            new = self.settled[start - num_committed:]
        new = new[: self.max_new - start]
        cut = first_eos(new, self.eos)
        return (new, False) if cut is None else (new[: cut + 1], True)

    def infill(self, length: int, steering) -> None:
        """Fill in the middle: the output is the first `length` tokens; the suffix is pinned after them."""
        self.params = dataclasses.replace(self.params, steering=steering)
        self.stop_at = length

    def apply(self, result) -> Progress:
        """Take one denoising step's result (runner.StepResult): advance the step counters, take a committed
        canvas or a longer settled prefix, and say what to report and whether the request has finished."""
        self.step += 1
        self.denoising_steps += 1
        if self.params.read_only:
            return self._read(result)
        if result.canvas_done:
            self.committed += result.argmax
            self.committed_logprobs += self._entries(result)
            self.settled, self.settled_logprobs = [], []
            self.canvas_index += 1
            self.step = 0
        elif result.num_pinned > len(self.settled):
            self.settled = result.argmax[: result.num_pinned]
            self.settled_logprobs = self._entries(result)[: result.num_pinned]
        ids, hit_eos = self.new_output_ids()
        logprobs = self._new_logprobs(len(ids))
        reason = None
        if self.stop_at is not None and self.num_reported + len(ids) >= self.stop_at:
            ids, reason = ids[: self.stop_at - self.num_reported], "stop"
            logprobs = None if logprobs is None else logprobs[: len(ids)]
        elif hit_eos:
            reason = "stop"
        elif self.num_reported + len(ids) >= self.max_new or self.num_canvases_left == 0:
            reason = "length"
        text = ""
        if self.text is not None and (ids or reason is not None):
            text = self.text.update(ids, final=reason is not None)
            if self.text.stopped:
                reason = "stop"
        draft = None
        if self.params.include_drafts and reason is None and not result.canvas_done:
            draft = self._draft(result)
            draft, self.last_draft = (None if draft == self.last_draft else draft), draft
        return Progress(ids, text, draft, reason, commit=result.canvas_done and reason is None, logprobs=logprobs)

    def _read(self, result) -> Progress:
        """A read-only request (SamplingParams.read_only): nothing until its canvas has stopped, then the whole
        argmax canvas and its log-probabilities, and the end."""
        if not result.canvas_done:
            return Progress([], "", None, None, False)
        ids = result.argmax
        text = self.text.update(ids, final=True) if self.text is not None else ""
        return Progress(ids, text, None, "length", False, logprobs=self._entries(result))

    def _entries(self, result) -> list:
        """RequestOutput.logprobs' entries of a step's canvas, one per position ([] when the row records none)."""
        if result.logprobs is None:
            return []
        logprob, top_ids, top_logprobs = result.logprobs
        n = self.num_top
        return [(lp, list(zip(ids[:n], lps[:n]))) for lp, ids, lps in zip(logprob, top_ids, top_logprobs)]

    def _new_logprobs(self, count: int) -> list | None:
        """The entries of the `count` output tokens after the reported ones (as new_output_ids takes them)."""
        if not self.records:
            return None
        start, num_committed = self.num_reported, len(self.committed_logprobs)
        if start < num_committed:
            new = self.committed_logprobs[start:start + count]
            return new + self.settled_logprobs[: count - len(new)]
        return self.settled_logprobs[start - num_committed:start - num_committed + count]

    def _draft(self, result) -> str:
        """The unsettled rest of the current canvas, up to EOS."""
        rest = result.argmax[result.num_pinned:]
        cut = first_eos(rest, self.eos)  # None: all of it
        if self.decode is None:
            return " ".join(map(str, rest[:cut]))
        return self.decode(rest[:cut], self.params.skip_special_tokens)


@dataclass
class Progress:
    """What one step means for a request: new tokens and text to report, a draft, and whether it finished (with
    its reason) or must commit its canvas."""

    token_ids: list[int]
    text: str
    draft: str | None
    finish_reason: str | None
    commit: bool
    logprobs: list | None = None  # with SamplingParams.logprobs: one entry per token of token_ids
