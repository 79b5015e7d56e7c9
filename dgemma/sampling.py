"""The entropy-bound sampler, the temperature schedule and the stable-and-confident early stop.

Random numbers are drawn in the reference's order and shapes, so a seed gives the reference's tokens:
  canvas init: randint (B, C); per step: exponential (B*C, V) for the sample, then randint (B, C) for renoising.
"""

from __future__ import annotations

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


def race_sample(probs: torch.Tensor, accepted: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """torch.multinomial(probs, 1) at the accepted positions, with its exact random draws. (..., V) -> (...).

    multinomial draws an Exp(1) race over every entry and takes argmax(p / race). On CPU torch draws each Exp(1)
    as -log1p(-U) from a float64 uniform U, and the log is most of the cost. Positions that are not accepted are
    renoised, so we draw the same uniforms (advancing the generator exactly as the race would) and take logs only
    where the sample is kept. Elsewhere the result is 0. The uniforms are drawn a few positions at a time into
    one small buffer, in order (the generator is sequential, so the values are the same): a fresh (C, V) float64
    tensor would cost more in page faults than the draws themselves."""
    V = probs.shape[-1]
    if not race_matches_multinomial(probs.device):  # a torch whose multinomial draws otherwise: call it
        return torch.multinomial(probs.reshape(-1, V), 1, generator=generator).view(accepted.shape)
    if probs.device.type != "cpu" or probs.dtype != torch.float32:
        race = torch.empty_like(probs).exponential_(generator=generator)
        return torch.argmax(torch.div(probs, race, out=race), dim=-1)
    flat_probs, flat_accepted = probs.reshape(-1, V), accepted.reshape(-1)
    sampled = torch.zeros(flat_accepted.numel(), dtype=torch.long)
    for start, stop, uniform in _race_uniforms(flat_accepted.numel(), V, generator):
        rows = flat_accepted[start:stop].nonzero().squeeze(1)  # accepted positions here; a host sync, free on CPU
        if rows.numel():
            race = (-torch.log1p(-uniform[rows])).float()  # exactly exponential_'s values there
            sampled[start + rows] = torch.argmax(flat_probs[start:stop][rows] / race, dim=-1)
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


def inverse_cdf_sample(probs: torch.Tensor, accepted: torch.Tensor,
                       generator: torch.Generator | None) -> torch.Tensor:
    """A sample from probs (..., V) per accepted position by the inverse CDF: one uniform per position (drawn for
    every position, so a step always draws the same count), then a binary search in the cumulative sum. The same
    distribution as torch.multinomial, with C uniforms instead of C x V (the "fast" sampler); not its draws.
    Elsewhere the result is 0. On CPU only accepted positions are summed, in float64."""
    V = probs.shape[-1]
    flat_probs, flat_accepted = probs.reshape(-1, V), accepted.reshape(-1)
    uniform = torch.rand(flat_accepted.shape[0], generator=generator, device=probs.device, dtype=torch.float64)
    if probs.device.type == "cpu":
        rows = flat_accepted.nonzero().squeeze(1)  # a host sync, free on CPU
        sampled = torch.zeros(flat_accepted.shape[0], dtype=torch.long)
        if rows.numel():
            sampled[rows] = inverse_cdf(flat_probs[rows].double(), uniform[rows])
        return sampled.view(accepted.shape)
    sampled = inverse_cdf(flat_probs, uniform)  # no host sync, so a CUDA graph can hold it
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


def temper_and_score(logits: torch.Tensor, temp: torch.Tensor, softcap: float | None = None,
                     probs_in_place: bool = False, ban: tuple[int, list[int]] | None = None):
    """Temper `logits` (..., V) in place by `temp` (a scalar tensor, or one broadcastable to (..., 1)) and return
    probs = softmax (fp32), argmax and token entropy of the tempered logits. `logits` is used up.

    With `softcap`, the raw logits are first soft-capped (cap * tanh(logits / cap), as DiffusionGemma.logits does)
    on the way. With `probs_in_place` (fp32 CPU logits), the probabilities are written over the logits, and the
    returned probs are `logits` itself: no second (..., V) tensor.

    Every one of these works along the vocabulary, position by position, so on CPU the positions go a few at a
    time: the dozen passes over each block stay in cache instead of streaming (C, V) tensors through memory, and
    the temporaries stay small. The results are the same bits as whole-tensor calls.

    `ban` = (n, ids): CPU, one row of positions: after the soft cap, the tokens `ids` get logit -inf (probability
    0) at the first n positions."""
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    flat = logits.view(-1, V)
    n = flat.shape[0]
    temp = temp.expand(*lead, 1).reshape(n, 1) if temp.dim() else temp
    if logits.device.type != "cpu":  # one kernel per op: on a GPU launches are the cost, not memory passes
        if probs_in_place:
            raise ValueError("probs_in_place is for CPU logits")
        if softcap is not None:
            flat.div_(softcap).tanh_().mul_(softcap)
        flat.div_(temp)
        probs = torch.softmax(flat, dim=-1, dtype=torch.float32)
        argmax = torch.argmax(flat, dim=-1)
        entropy = token_entropy_(flat)
        return probs.view(*lead, V), argmax.view(lead), entropy.view(lead)
    if probs_in_place and logits.dtype != torch.float32:
        raise ValueError("probs_in_place needs fp32 logits")
    probs = flat if probs_in_place else torch.empty(n, V, dtype=torch.float32)
    argmax = torch.empty(n, dtype=torch.long)
    entropy = torch.empty(n, dtype=torch.float32)
    chunk = max(1, _SCORE_CHUNK_ELEMENTS // V)
    # in place, a block's probabilities wait in a small buffer until the block's logits are used up
    scratch = torch.empty(min(chunk, n), V, dtype=torch.float32) if probs_in_place else None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = flat[start:stop]
        if softcap is not None:
            block.div_(softcap).tanh_().mul_(softcap)
        if ban is not None and start < ban[0]:
            block[: ban[0] - start, ban[1]] = float("-inf")
        block.div_(temp if not temp.dim() else temp[start:stop])
        block_probs = torch.softmax(block, dim=-1, dtype=torch.float32,
                                    out=probs[start:stop] if scratch is None else scratch[: stop - start])
        torch.argmax(block, dim=-1, out=argmax[start:stop])
        entropy[start:stop] = token_entropy_(block)
        if scratch is not None:
            block.copy_(block_probs)
    return probs.view(*lead, V), argmax.view(lead), entropy.view(lead)


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
