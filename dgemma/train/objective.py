"""The block-diffusion training objective (see /work/shared/TRAINING.md).

Per example (numbers reused in the code):
  1. Draw a noise level t ~ U(eps, 1 - eps).
  2. Pick the scored canvas b uniformly among the example's canvases.
  3. Corrupt canvas b with uniform-state noise at level t, except its fixed positions (Example.fixed), which stay
     clean.
  4. Encoder pass: the shared stack runs causally over the clean sequence; its K/V are what the decoder reads.
     L_enc is next-token cross-entropy on the response (optionally on the prompt too).
  5. Decoder mask: canvas b sees the prompt, the clean canvases before it and itself (sliding layers: the last
     window - 1 context slots), the inference rule.
  6. Self-conditioning in two passes: a first decoder pass with no signal and no gradient gives logits l1; per
     example, with probability p, the signal is softmax(l1) @ E * sqrt(d) (raw logits, as every public recipe
     does; inference uses tempered logits), otherwise zeros; the second pass runs with gradient. With
     `self_cond_passes` N > 1, k ~ U{1..N} (one draw per batch) no-gradient passes run first, each one's signal
     feeding the next, so that the gradient pass learns to refine beliefs already refined, as the denoising steps
     of inference do (AlphaFold's "recycling").
     With `sampled_canvas` p > 0, per example with probability p the passes after the first read another canvas:
     each corrupted position, with probability r ~ U(0, 1) drawn per example, holds a token sampled from the first
     pass's distribution instead of its noise. That is the canvas of inference's second step (the sampler's kept
     tokens among renoised ones), wrong guesses included: uniform noise over a large vocabulary almost never puts a
     plausible wrong token on the canvas, so without it a model never practises undoing one. (On the Sudoku model
     it did not raise the solve rate: TRAINING.md, run 8.)
  7. L_dec is the mean cross-entropy of the second pass against the clean tokens over every position of canvas b
     (corrupted or not, canvas padding included), fixed positions excepted (then it is the mean over the batch's
     scored positions). `fixed_positions` separates the two halves of fixing: "pin" (the default) holds the fixed
     positions clean and leaves them out of L_dec, "clean" holds them clean and scores them, "unscored" noises them
     like any other position and leaves them out of L_dec. L = w_dec * L_dec + w_enc * L_enc. The `reweighted`
     variant weights each example's L_dec by 1 / (1 - t), clipped at `max_weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..model import DiffusionGemma
from ..sampling import inverse_cdf
from .batch import Batch
from .corruption import sample_noise_level, uniform_corrupt
from .masks import block_diffusion_decoder_mask, encoder_training_mask


FIXED_POSITIONS = ("pin", "clean", "unscored")


@dataclass
class LossConfig:
    w_dec: float = 1.0
    w_enc: float = 1.0
    eps: float = 1e-3
    self_cond_prob: float = 0.5
    self_cond_passes: int = 1
    sampled_canvas: float = 0.0
    reweighted: bool = False
    max_weight: float = 10.0
    fixed_positions: str = "pin"  # Example.fixed: "pin" (clean, unscored), "clean" (clean, scored), "unscored"

    def __post_init__(self) -> None:
        if self.w_dec < 0 or self.w_enc < 0 or self.w_dec + self.w_enc == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got w_dec={self.w_dec} w_enc={self.w_enc}")
        if not 0.0 <= self.eps < 0.5:
            raise ValueError(f"eps must be in [0, 0.5), got {self.eps}")
        if not 0.0 <= self.self_cond_prob <= 1.0:
            raise ValueError(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob}")
        if self.self_cond_passes < 1:
            raise ValueError(f"self_cond_passes must be >= 1, got {self.self_cond_passes}")
        if not 0.0 <= self.sampled_canvas <= 1.0:
            raise ValueError(f"sampled_canvas must be in [0, 1], got {self.sampled_canvas}")
        if self.fixed_positions not in FIXED_POSITIONS:
            raise ValueError(f"fixed_positions must be one of {', '.join(FIXED_POSITIONS)}, "
                             f"got {self.fixed_positions!r}")
        if self.max_weight < 1.0:
            raise ValueError(f"max_weight must be >= 1, got {self.max_weight}")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar with grad
    dec_loss: float
    enc_loss: float
    dec_accuracy: float  # argmax accuracy of the second decoder pass on canvas b
    tokens: int  # tokens the encoder ran over (throughput)


def canvas_slots(starts: torch.Tensor, canvas_length: int) -> torch.Tensor:
    """(B,) canvas start slots -> (B, C) slot of every canvas position."""
    return starts[:, None] + torch.arange(canvas_length, device=starts.device)[None, :]


EncoderKV = tuple[list[torch.Tensor], list[torch.Tensor]]


def encoder_pass(model: DiffusionGemma, tokens: torch.Tensor) -> tuple[torch.Tensor, EncoderKV]:
    """Causal pass over clean right-padded `tokens` (B, L) at positions 0..L-1. Returns the final hidden states
    (B, L, H) and every layer's K and V (B, nkv, L, hd), which attention used as they are."""
    L, device = tokens.shape[1], tokens.device
    enc_k: list[torch.Tensor] = [None] * len(model.layers)  # type: ignore[list-item]
    enc_v: list[torch.Tensor] = [None] * len(model.layers)  # type: ignore[list-item]

    def record(layer_idx, is_sliding, k, v):
        enc_k[layer_idx], enc_v[layer_idx] = k, v
        return k, v

    window = model.config.sliding_window
    masks = {True: encoder_training_mask(L, window, device), False: encoder_training_mask(L, None, device)}
    hidden = model.run_layers(model.embed(tokens), torch.arange(L, device=device), masks, record, encoder=True)
    return hidden, (enc_k, enc_v)


def decoder_pass(model: DiffusionGemma, enc_kv: EncoderKV, canvas: torch.Tensor, starts: torch.Tensor,
                 signal: torch.Tensor | None) -> torch.Tensor:
    """One decoder pass over `canvas` (B, C), whose row i sits at slots starts[i] + 0..C-1, reading the encoder's
    K/V through the block-diffusion mask. `signal` (B, C, H) is the self-conditioning input (None: zeros).
    -> logits (B, C, V); what model.denoise gives for the same canvas after encoding the first starts[i] tokens."""
    enc_k, enc_v = enc_kv
    L, C = enc_k[0].shape[2], canvas.shape[1]
    window = model.config.sliding_window
    masks = {True: block_diffusion_decoder_mask(starts, L, C, window),
             False: block_diffusion_decoder_mask(starts, L, C, None)}

    def read_encoder(layer_idx, is_sliding, k, v):
        return torch.cat([enc_k[layer_idx], k], dim=2), torch.cat([enc_v[layer_idx], v], dim=2)

    x = model.self_conditioning(model.embed(canvas), signal)
    hidden = model.run_layers(x, canvas_slots(starts, C), masks, read_encoder, encoder=False)  # per-row RoPE
    return model.logits(hidden)


def _corrupt_canvas(clean: torch.Tensor, t: torch.Tensor, vocab_size: int, fixed: torch.Tensor | None,
                    cfg: LossConfig, generator: torch.Generator | None):
    """Step 3 with `cfg.fixed_positions`. -> (noisy canvas, replaced mask, the positions L_dec leaves out or None)."""
    held = None if fixed is None or cfg.fixed_positions == "unscored" else fixed  # never noised
    noisy, replaced = uniform_corrupt(clean, t, vocab_size, None if held is None else ~held, generator=generator)
    return noisy, replaced, None if cfg.fixed_positions == "clean" else fixed


def _decoder_loss(logits: torch.Tensor, clean: torch.Tensor, t: torch.Tensor, fixed: torch.Tensor | None,
                  cfg: LossConfig, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 7's L_dec and argmax accuracy of `logits` (B, C, V) against `clean` (B, C), over every position or,
    with `fixed`, over the others: then each rank's share of the mean over the batch's scored positions, times world
    (`share` = world / scored positions in the whole batch), as the encoder loss."""
    B, C, V = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, V), clean.reshape(-1), reduction="none").view(B, C)
    weight = (1.0 / (1.0 - t)).clamp(max=cfg.max_weight)[:, None] if cfg.reweighted else None
    correct = (logits.argmax(-1) == clean).float()
    if fixed is None:
        return (ce.mean() if weight is None else (ce * weight).mean()), correct.mean()
    scored = (~fixed).to(logits.device)
    per_token = ce if weight is None else ce * weight
    return per_token[scored].sum() * share, correct[scored].sum() * share


def block_diffusion_loss(model: DiffusionGemma, batch: Batch, cfg: LossConfig,
                         generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)) -> LossOutput:
    """The loss of one batch. All random draws come from `generator` (a CPU generator), in a fixed order, so a
    restored generator state reproduces the step exactly.

    shard = (rank, world): the draws are made for the whole batch, as one process makes them, and the model runs
    on this rank's rows only (B must divide by world). The returned loss is scaled so that its mean over the ranks,
    which DDP's gradient averaging takes, is the one-process loss; so are dec_loss, enc_loss and dec_accuracy."""
    device, C, V, (rank, world) = model.device, model.canvas_length, model.config.vocab_size, shard
    B = batch.size
    if B % world:
        raise ValueError(f"a batch of {B} does not split evenly over {world} processes")
    cpu = batch.to("cpu")

    # 1. noise level;  2. scored canvas;  3. corruption  (drawn on the CPU generator)
    t = sample_noise_level(B, cfg.eps, generator)
    b = (torch.rand(B, generator=generator) * cpu.num_canvases).long().clamp(max=cpu.num_canvases - 1)
    starts = cpu.prompt_lengths + b * C  # (B,)
    clean = torch.gather(cpu.tokens, 1, canvas_slots(starts, C))  # (B, C)
    fixed = None if cpu.fixed is None else torch.gather(cpu.fixed, 1, canvas_slots(starts, C))  # (B, C)
    noisy, replaced, fixed = _corrupt_canvas(clean, t, V, fixed, cfg, generator)  # fixed: now the unscored
    use_signal = torch.rand(B, generator=generator) < cfg.self_cond_prob  # (B,)
    passes = 1  # no-gradient passes before the gradient pass (step 6); no draw for 1, so older runs replay
    if cfg.self_cond_passes > 1:
        passes = 1 + int(torch.randint(cfg.self_cond_passes, (1,), generator=generator))
    resample = None  # (positions that take the first pass's sample, the uniforms that sample it), step 6
    if cfg.sampled_canvas > 0:  # no draws at 0: older runs replay
        rows_sampled = torch.rand(B, generator=generator) < cfg.sampled_canvas
        share = torch.rand(B, generator=generator)
        picked = replaced & rows_sampled[:, None] & (torch.rand((B, C), generator=generator) < share[:, None])
        resample = (picked, torch.rand((B, C), generator=generator))
    n_enc_targets = int(cpu.enc_targets[:, 1:].sum())  # over the whole batch: the encoder loss's denominator
    n_scored = B * C if fixed is None else max(int((~fixed).sum()), 1)  # and the decoder loss's
    if world > 1:  # this rank's rows of everything drawn (distributed.py, step 2)
        rows = slice(rank * B // world, (rank + 1) * B // world)
        t, starts, clean, noisy, use_signal = (x[rows] for x in (t, starts, clean, noisy, use_signal))
        fixed = None if fixed is None else fixed[rows]
        resample = None if resample is None else tuple(x[rows] for x in resample)
        batch = cpu.rows(rows)
        B = B // world
    t, starts, clean, noisy, use_signal = (x.to(device) for x in (t, starts, clean, noisy, use_signal))
    resample = None if resample is None else tuple(x.to(device) for x in resample)

    # 4. encoder pass over the clean sequence. Without an encoder loss only the context before the latest scored
    # canvas is needed, and causality makes the truncated K/V identical.
    tokens, enc_targets = batch.tokens.to(device), batch.enc_targets.to(device)
    L = tokens.shape[1] if cfg.w_enc > 0 else int(starts.max())
    tokens, enc_targets = tokens[:, :L], enc_targets[:, :L]
    hidden, enc_kv = encoder_pass(model, tokens)
    enc_loss = torch.zeros((), device=device)
    if cfg.w_enc > 0:
        sel = enc_targets[:, 1:]  # token j is predicted from hidden state j - 1
        logits = model.logits(hidden[:, :-1][sel])  # (N, V)
        if world == 1:
            enc_loss = F.cross_entropy(logits, tokens[:, 1:][sel])
        else:  # each rank's share of the batch mean, times world: the mean over ranks is the batch mean
            enc_loss = F.cross_entropy(logits, tokens[:, 1:][sel], reduction="sum") * (world / n_enc_targets)

    # 5. (inside decoder_pass) the mask over [encoder keys ; canvas keys]
    # 6. self-conditioning: first pass without signal or gradient, then the signal masked per example
    with torch.no_grad():
        signal = None
        for i in range(passes):
            logits = decoder_pass(model, enc_kv, noisy, starts, signal)
            signal = model.soft_embed(logits)
            if i == 0 and resample is not None:  # the sampled canvas (step 6), read by every later pass
                picked, u = resample
                sample = inverse_cdf(logits.float().softmax(-1).view(-1, V), u.view(-1)).view(u.shape)
                noisy = torch.where(picked, sample, noisy)
        signal = signal * use_signal[:, None, None].to(model.dtype)  # (B, C, H)
    logits = decoder_pass(model, enc_kv, noisy, starts, signal)  # (B, C, V)

    # 7. loss
    dec_loss, accuracy = _decoder_loss(logits, clean, t, fixed, cfg, world / n_scored)
    loss = cfg.w_dec * dec_loss + cfg.w_enc * enc_loss
    if world > 1 and cfg.w_enc == 0:
        # The encoder's final hidden states then feed nothing, and FSDP2's backward hooks crash (SIGSEGV, torch
        # 2.13) on a layer output without a gradient: give it an exact zero one (x * 0 adds +0.0 to every gradient).
        loss = loss + hidden.float().sum() * 0.0
    return LossOutput(loss, float(dec_loss.detach()), float(enc_loss.detach()), float(accuracy), B * L)
