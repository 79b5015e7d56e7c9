"""The entropy-bound sampler, the temperature schedule and the stable-and-confident early stop.

Random numbers are drawn in the reference's order and shapes, so a seed gives the reference's tokens:
  canvas init: randint (B, C); per step: exponential (B*C, V) for the sample, then randint (B, C) for renoising.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GenerationConfig


def temperature(gen: GenerationConfig, steps_remaining: int, device: torch.device) -> torch.Tensor:
    """Linear schedule t_min + (t_max - t_min) * n / N for n = N..1 (t_max at the first step).

    Computed in fp32 tensor arithmetic, exactly as the reference does."""
    n = torch.tensor(steps_remaining, dtype=torch.int32, device=device)
    return gen.t_min + ((gen.t_max - gen.t_min) * (n / gen.max_denoising_steps))


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position. (B, C, V) -> (B, C)."""
    log_p = logits - logits.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(log_p, dim=-1)
    return -(log_p.clamp(min=torch.finfo(log_p.dtype).min) * p).sum(-1)


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept the largest lowest-entropy set whose entropy sum minus its max is <= bound.

    Sorted ascending, the running max is the current element, so the test is cumsum - sorted <= bound. The
    lowest-entropy position is always accepted. (B, C) -> bool (B, C)."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    keep_sorted = (torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy) <= bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def token_entropy_(logits: torch.Tensor) -> torch.Tensor:
    """token_entropy, bit for bit, computed in place: `logits` is used up (it holds log probabilities after)."""
    log_p = logits.sub_(logits.logsumexp(dim=-1, keepdim=True))
    p = torch.softmax(log_p, dim=-1)
    return -log_p.clamp_(min=torch.finfo(log_p.dtype).min).mul_(p).sum(-1)


@dataclass(frozen=True)
class TopKTopP:
    """A cut of the sampling distribution (a request's top_k and top_p, as vLLM applies them): per position, keep
    the `top_k` most probable tokens, then of those the smallest most-probable set whose mass reaches `top_p` of
    theirs; None leaves that cut off. Ties with the last kept token are kept too.

    It shapes only the draw of a kept token. The argmax, the entropies that choose which positions are kept (the
    entropy bound), the stop test and the self-conditioning signal all read the whole tempered distribution, as
    they do for a greedy request. So a cut changes which token is written where a position is accepted, never
    how fast a canvas settles, and top_k=1 writes the argmax there. (vLLM cuts the logits before its whole
    denoising step, so its entropies read the cut distribution: the tail is gone, entropies fall and more
    positions are accepted per step; with top_k=1 every position has entropy 0 and the whole canvas is accepted
    at the first step, from a noise-conditioned argmax.)"""

    top_k: int | None = None
    top_p: float | None = None

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (..., V) -> a copy with the tokens outside each position's kept set at 0. Not renormalised: both
        samplers read relative weights (the race's argmax of p / race, the inverse CDF scaled by the row's total)."""
        if self.top_k is not None and self.top_k < probs.shape[-1]:
            top = torch.topk(probs, self.top_k, dim=-1).values  # (..., k), descending
        else:
            top = torch.sort(probs, dim=-1, descending=True).values  # (..., V)
        floor = top[..., -1:]
        if self.top_p is not None:
            mass_before = top.cumsum(dim=-1) - top  # (..., k): the mass of the tokens ranked above each
            inside = mass_before < self.top_p * top.sum(dim=-1, keepdim=True)  # the first token always is
            floor = top.gather(-1, inside.sum(dim=-1, keepdim=True).clamp_(min=1) - 1)
        return torch.where(probs >= floor, probs, 0.0)


def race_sample(probs: torch.Tensor, accepted: torch.Tensor, generator: torch.Generator | None,
                keep: TopKTopP | None = None) -> torch.Tensor:
    """torch.multinomial(probs, 1) at the accepted positions, with its exact random draws. (..., V) -> (...).
    With `keep`, the draw is from the tokens it keeps (the same random numbers: a cut changes no draw count).

    multinomial draws an Exp(1) race over every entry and takes argmax(p / race). On CPU torch draws each Exp(1)
    as -log1p(-U) from a float64 uniform U, and the log is most of the cost. Positions that are not accepted are
    renoised, so we draw the same uniforms (advancing the generator exactly as the race would) and take logs only
    where the sample is kept. Elsewhere the result is 0. The uniforms are drawn a few positions at a time into
    one small buffer, in order (the generator is sequential, so the values are the same): a fresh (C, V) float64
    tensor would cost more in page faults than the draws themselves."""
    V = probs.shape[-1]
    if not race_matches_multinomial(probs.device):  # a torch whose multinomial draws otherwise: call it
        flat = probs.reshape(-1, V)
        return torch.multinomial(flat if keep is None else keep(flat), 1, generator=generator).view(accepted.shape)
    if probs.device.type != "cpu" or probs.dtype != torch.float32:
        race = torch.empty_like(probs).exponential_(generator=generator)
        kept = probs if keep is None else keep(probs.reshape(-1, V)).view(probs.shape)
        return torch.argmax(torch.div(kept, race, out=race), dim=-1)
    flat_probs, flat_accepted = probs.reshape(-1, V), accepted.reshape(-1)
    sampled = torch.zeros(flat_accepted.numel(), dtype=torch.long)
    for start, stop, uniform in _race_uniforms(flat_accepted.numel(), V, generator):
        rows = flat_accepted[start:stop].nonzero().squeeze(1)  # accepted positions here; a host sync, free on CPU
        if rows.numel():
            race = (-torch.log1p(-uniform[rows])).float()  # exactly exponential_'s values there
            kept = flat_probs[start:stop][rows]
            sampled[start + rows] = torch.argmax((kept if keep is None else keep(kept)) / race, dim=-1)
    return sampled.view(accepted.shape)


_RACE_CHUNK_ELEMENTS = 1 << 19  # 4 MiB of float64 uniforms per chunk


def _race_uniforms(positions: int, vocab_size: int, generator: torch.Generator | None):
    """The race's float64 uniforms on CPU, a few positions at a time through one buffer, in draw order: yields
    (start, stop, uniforms of positions [start, stop)). Each block is overwritten by the next."""
    chunk = max(1, min(positions, _RACE_CHUNK_ELEMENTS // vocab_size))
    buffer = torch.empty(chunk, vocab_size, dtype=torch.float64)
    for start in range(0, positions, chunk):
        stop = min(start + chunk, positions)
        yield start, stop, buffer[: stop - start].uniform_(generator=generator)


def skip_race(positions: int, vocab_size: int, generator: torch.Generator | None) -> None:
    """Advance a CPU generator exactly as race_sample over `positions` x `vocab_size` would, keeping nothing. (On
    CPU the generator is sequential, so drawing a batch's race row by row gives the same numbers.)"""
    for _ in _race_uniforms(positions, vocab_size, generator):
        pass


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token whose cumulative probability first passes `uniform` (N,) times the row's total, per row of
    `probs` (N, V): a sample of each row, fixed by its uniform (any device, any split of the rows)."""
    cdf = probs.cumsum(dim=-1)
    target = (uniform[:, None] * cdf[:, -1:].to(uniform.dtype)).to(cdf.dtype)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def inverse_cdf_sample(probs: torch.Tensor, accepted: torch.Tensor, generator: torch.Generator | None,
                       keep: TopKTopP | None = None) -> torch.Tensor:
    """A sample from probs (..., V) per accepted position by the inverse CDF: one uniform per position (drawn for
    every position, so a step always draws the same count), then a binary search in the cumulative sum. The same
    distribution as torch.multinomial, with C uniforms instead of C x V (the "fast" sampler); not its draws.
    With `keep`, the draw is from the tokens it keeps. Elsewhere the result is 0. On CPU only accepted positions
    are summed, in float64."""
    V = probs.shape[-1]
    flat_probs, flat_accepted = probs.reshape(-1, V), accepted.reshape(-1)
    uniform = torch.rand(flat_accepted.shape[0], generator=generator, device=probs.device, dtype=torch.float64)
    if probs.device.type == "cpu":
        rows = flat_accepted.nonzero().squeeze(1)  # a host sync, free on CPU
        sampled = torch.zeros(flat_accepted.shape[0], dtype=torch.long)
        if rows.numel():
            kept = flat_probs[rows]
            sampled[rows] = inverse_cdf((kept if keep is None else keep(kept)).double(), uniform[rows])
        return sampled.view(accepted.shape)
    # no host sync, so a CUDA graph can hold it
    sampled = inverse_cdf(flat_probs if keep is None else keep(flat_probs), uniform)
    return torch.where(flat_accepted, sampled, 0).view(accepted.shape)


def skip_inverse_cdf(positions: int, generator: torch.Generator | None, device: torch.device) -> None:
    """Advance a generator exactly as inverse_cdf_sample over `positions` positions would."""
    torch.rand(positions, generator=generator, device=device, dtype=torch.float64)


_RACE_CHECKED: dict[str, bool] = {}


def race_matches_multinomial(device: torch.device) -> bool:
    """Whether race_sample reproduces this torch's multinomial on `device`: the same samples and the generator
    left in the same state. It relies on how multinomial draws its race (verified on torch 2.13 CPU), which a
    torch version may change; where it does not hold, race_sample calls multinomial itself. Checked once per
    device type, on a small input."""
    key = torch.device(device).type
    if key not in _RACE_CHECKED:
        _RACE_CHECKED[key] = False  # while checking, race_sample must not recurse into the check
        g = torch.Generator().manual_seed(0)
        probs = torch.softmax(torch.randn(6, 97, generator=g) * 3, dim=-1).to(device)
        accepted = torch.ones(6, dtype=torch.bool, device=device)
        a, b = torch.Generator(device).manual_seed(1), torch.Generator(device).manual_seed(1)
        want = torch.multinomial(probs, 1, generator=a).squeeze(1)
        _RACE_CHECKED[key] = True
        try:
            got = race_sample(probs, accepted, b)
            _RACE_CHECKED[key] = torch.equal(got, want) and torch.equal(a.get_state(), b.get_state())
        except Exception:  # noqa: BLE001 (any failure means: use multinomial)
            _RACE_CHECKED[key] = False
    return _RACE_CHECKED[key]


def temper_and_score(logits: torch.Tensor, temp: torch.Tensor):
    """Temper `logits` (..., V) in place by `temp` (a tensor broadcastable to (..., 1)) and return probs = softmax
    (fp32), argmax and token entropy of the tempered logits. `logits` is used up. On CPU the positions go a few
    at a time (score_blocks), elsewhere one kernel per op (score_whole); the bits are the same."""
    return score_blocks(logits, temp) if logits.device.type == "cpu" else score_whole(logits, temp)


def score_whole(logits: torch.Tensor, temp: torch.Tensor):
    """temper_and_score with one kernel per op over the whole tensor: on a GPU launches are the cost, not memory
    passes."""
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    flat = logits.view(-1, V).div_(_per_position(temp, lead))
    probs = torch.softmax(flat, dim=-1, dtype=torch.float32)
    argmax = torch.argmax(flat, dim=-1)
    entropy = token_entropy_(flat)
    return probs.view(*lead, V), argmax.view(lead), entropy.view(lead)


def score_blocks(logits: torch.Tensor, temp: torch.Tensor):
    """temper_and_score on CPU, a few positions at a time: the dozen passes over each block stay in cache instead
    of streaming (..., V) tensors through memory, and the temporaries stay small. The probabilities go to a new
    fp32 tensor."""
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    flat = logits.view(-1, V)
    probs = torch.empty(flat.shape[0], V, dtype=torch.float32)
    argmax, entropy = _score_blocks(flat, _per_position(temp, lead), probs, None, None, 0, [])
    return probs.view(*lead, V), argmax.view(lead), entropy.view(lead)


def cap_and_score_row_(logits: torch.Tensor, temp: torch.Tensor, softcap: float | None, eos_until: int,
                       eos_ids: list[int]):
    """One row's raw head outputs (C, V) fp32 on CPU, block by block as score_blocks: soft-capped (cap *
    tanh(logits / cap), as DiffusionGemma.logits does), EOS banned (logit -inf) at the first `eos_until`
    positions, tempered by the scalar tensor `temp` and scored, with the probabilities written over the logits:
    returns (probs, which is `logits` itself, argmax, entropy), and no second (C, V) tensor is made."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu":
        raise ValueError("cap_and_score_row_ needs fp32 CPU logits")
    # a block's probabilities wait in a small buffer until the block's logits are used up
    scratch = torch.empty(min(max(1, _SCORE_CHUNK_ELEMENTS // logits.shape[-1]), logits.shape[0]),
                          logits.shape[-1], dtype=torch.float32)
    argmax, entropy = _score_blocks(logits, temp, logits, scratch, softcap, eos_until, eos_ids)
    return logits, argmax, entropy


def _per_position(temp: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """temp broadcast to one value per position, (N, 1); a scalar stays a scalar."""
    return temp.expand(*lead, 1).reshape(-1, 1) if temp.dim() else temp


def _score_blocks(flat: torch.Tensor, temp: torch.Tensor, probs: torch.Tensor, scratch: torch.Tensor | None,
                  softcap: float | None, eos_until: int, eos_ids: list[int]):
    """The block loop of score_blocks and cap_and_score_row_: flat (N, V) is used up, probs (N, V) written (with
    `scratch`, probs is flat and each block's probabilities are copied over it once its logits are spent).
    temp: a scalar tensor, or (N, 1). Returns argmax (N,) and entropy (N,)."""
    n, V = flat.shape
    argmax = torch.empty(n, dtype=torch.long)
    entropy = torch.empty(n, dtype=torch.float32)
    chunk = max(1, _SCORE_CHUNK_ELEMENTS // V)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = flat[start:stop]
        if softcap is not None:
            block.div_(softcap).tanh_().mul_(softcap)
        if start < eos_until:
            block[: eos_until - start, eos_ids] = float("-inf")
        block.div_(temp if not temp.dim() else temp[start:stop])
        block_probs = torch.softmax(block, dim=-1, dtype=torch.float32,
                                    out=probs[start:stop] if scratch is None else scratch[: stop - start])
        torch.argmax(block, dim=-1, out=argmax[start:stop])
        entropy[start:stop] = token_entropy_(block)
        if scratch is not None:
            block.copy_(block_probs)
    return argmax, entropy


_SCORE_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32 logits per block


def sample_step(logits: torch.Tensor, temp: torch.Tensor, entropy_bound: float,
                generator: torch.Generator | None):
    """Steps ii-iii of a denoising step (temper, sample, accept) with few passes over the (B, C, V) logits.
    Returns (probs, sampled, argmax, entropy, accepted); `logits` is used up.

    Bit for bit temperature -> torch.multinomial -> argmax -> token_entropy -> entropy_bound_accept, with the same
    random draws; `sampled` is only meaningful where `accepted` (see race_sample). `probs` is softmax(tempered
    logits), which the next step's self-conditioning needs too."""
    probs, argmax, entropy = temper_and_score(logits, temp)  # draws nothing, so it may come before the race
    accepted = entropy_bound_accept(entropy, entropy_bound)
    return probs, race_sample(probs, accepted, generator), argmax, entropy, accepted


def random_tokens(shape: tuple[int, ...], vocab_size: int, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """Uniform-state noise: tokens drawn uniformly from the whole vocabulary."""
    return torch.randint(0, vocab_size, shape, generator=generator, device=device)


class StableAndConfident:
    """Stop a row when its argmax canvas has not changed for `stability_threshold` steps and the mean entropy of
    its tempered logits is below `confidence_threshold`. Keeps the last `stability_threshold` argmax canvases of
    every row, updated in place (CUDA-graph safe). Rows are all of them in lockstep (generate), or a subset
    given by index (the serving engine, whose rows are at different steps)."""

    def __init__(self, stability_threshold: int, confidence_threshold: float, batch_size: int, canvas_length: int,
                 device: torch.device | str):
        self.confidence_threshold = confidence_threshold
        self.history = torch.full((batch_size, stability_threshold, canvas_length), -1, dtype=torch.long,
                                  device=device)

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the history (of `rows`, default all): a new canvas begins."""
        if rows is None:
            self.history.fill_(-1)
        else:
            self.history[rows] = -1

    def __call__(self, argmax_canvas: torch.Tensor, entropy: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """argmax_canvas, entropy (R, C) of all rows, or of `rows` -> whether each stops, (R,) bool."""
        if self.history.shape[1] == 0:
            stable = torch.ones(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)
        else:
            history = self.history if rows is None else self.history[rows]
            stable = (history == argmax_canvas[:, None]).all(dim=-1).all(dim=-1)
            history = torch.cat([history[:, 1:], argmax_canvas[:, None]], dim=1)
            if rows is None:
                self.history.copy_(history)
            else:
                self.history[rows] = history
        return stable & (entropy.mean(dim=-1) < self.confidence_threshold)
