"""Training objective: corruption statistics, the training masks, and the training passes against inference."""

from __future__ import annotations

import pytest
import torch

from dgemma.presets import preset_config, random_model
from dgemma.train.batch import Example, collate
from dgemma.train.corruption import sample_noise_level, uniform_corrupt
from dgemma.train.masks import (block_diffusion_decoder_mask, encoder_training_mask, reference_decoder_mask,
                                reference_encoder_mask)
from dgemma.train.objective import LossConfig, block_diffusion_loss, decoder_pass, encoder_pass


def test_noise_level_range_and_mean():
    t = sample_noise_level(20_000, eps=0.05, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20_000,) and t.min() >= 0.05 and t.max() <= 0.95
    assert abs(t.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError):
        sample_noise_level(4, eps=0.6)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_uniform_corruption_rate_matches_t(t):
    V, B, C = 16, 64, 512
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, C), generator=g)
    valid = torch.ones(B, C, dtype=torch.bool)
    valid[:, -100:] = False
    noisy, replaced = uniform_corrupt(tokens, torch.full((B,), t), V, valid, g)
    n = valid.sum().item()
    assert abs(replaced[valid].float().mean().item() - t) < 0.01
    # a replacement is uniform over the vocabulary, so it keeps the token with probability 1/V
    changed = (noisy != tokens)[valid].float().mean().item()
    assert abs(changed - t * (1 - 1 / V)) < 0.01
    assert torch.equal(noisy[~valid], tokens[~valid]) and not replaced[~valid].any()
    # replacements are uniform over the vocabulary
    counts = torch.bincount(noisy[replaced], minlength=V).float()
    assert (counts / counts.sum() - 1 / V).abs().max() < 0.01
    assert n > 0


def test_per_example_noise_level():
    tokens = torch.zeros(3, 4000, dtype=torch.long)
    _, replaced = uniform_corrupt(tokens, torch.tensor([0.0, 0.3, 1.0]), 8, generator=torch.Generator().manual_seed(0))
    rates = replaced.float().mean(dim=1)
    assert rates[0] == 0 and abs(rates[1] - 0.3) < 0.03 and rates[2] == 1


@pytest.mark.parametrize("window", [None, 1, 3, 6, 100])
def test_decoder_mask_matches_cell_by_cell_reference(window):
    starts, L, C = [2, 7, 11, 13], 21, 4
    fast = block_diffusion_decoder_mask(torch.tensor(starts), L, C, window)
    assert torch.equal(fast, reference_decoder_mask(starts, L, C, window))


@pytest.mark.parametrize("window", [None, 1, 4, 50])
def test_encoder_mask_matches_cell_by_cell_reference(window):
    assert torch.equal(encoder_training_mask(17, window), reference_encoder_mask(17, window))


def _model(window: int, canvas_length: int = 6, std: float = 0.1, **overrides):
    config = preset_config("tiny", sliding_window=window, canvas_length=canvas_length, vocab_size=64, **overrides)
    return random_model(config, std=std, seed=3)


@torch.no_grad()
@pytest.mark.parametrize("window", [4, 64])
def test_training_passes_match_inference(window):
    """The encoder pass equals model.encode, and the decoder pass over canvas b (right-padded batch, per-row
    positions, the training mask) equals model.denoise after encoding the context before b, with and without a
    self-conditioning signal. Window 4 < context exercises the sliding rule."""
    model = _model(window)
    C, V = model.canvas_length, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(3, V, (5,), generator=g).tolist(), torch.randint(3, V, (13,), generator=g).tolist()),
                Example(torch.randint(3, V, (9,), generator=g).tolist(), torch.randint(3, V, (4,), generator=g).tolist())]
    batch = collate(examples, C, eos_id=1, pad_id=0)
    assert batch.num_canvases.tolist() == [3, 1]
    hidden, enc_kv = encoder_pass(model, batch.tokens)
    for b_first in range(3):
        starts = batch.prompt_lengths + torch.tensor([b_first, 0]) * C
        noisy = torch.randint(0, V, (2, C), generator=g)
        signal = torch.randn(2, C, model.config.hidden_size, generator=g)
        for sig in (None, signal):
            got = decoder_pass(model, enc_kv, noisy, starts, sig)
            for i in range(2):
                s = int(starts[i])
                cache = model.new_cache(1, s + C)
                enc = model.encode(batch.tokens[i:i + 1, :s], cache)
                torch.testing.assert_close(enc, hidden[i:i + 1, :s], atol=1e-5, rtol=1e-5)
                want = model.denoise(noisy[i:i + 1], cache, signal=None if sig is None else sig[i:i + 1])
                torch.testing.assert_close(got[i:i + 1], want, atol=1e-4, rtol=1e-4)


def test_collate_pads_canvases_with_eos_then_pad():
    batch = collate([Example([2, 5, 6], [7, 8, 9]), Example([2], [7] * 8)], canvas_length=4, eos_id=1, pad_id=0)
    assert batch.tokens.tolist() == [[2, 5, 6, 7, 8, 9, 1, 0, 0, 0, 0, 0, 0],
                                     [2, 7, 7, 7, 7, 7, 7, 7, 7, 1, 0, 0, 0]]
    assert batch.num_canvases.tolist() == [1, 3] and batch.prompt_lengths.tolist() == [3, 1]
    # encoder targets: the response and its EOS
    assert batch.enc_targets[0].nonzero().flatten().tolist() == [3, 4, 5, 6]


def test_loss_is_reproducible_and_has_both_parts():
    model = _model(8).train()
    examples = [Example([2, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26]) for _ in range(3)]
    batch = collate(examples, model.canvas_length, 1, 0)
    a = block_diffusion_loss(model, batch, LossConfig(), torch.Generator().manual_seed(5))
    b = block_diffusion_loss(model, batch, LossConfig(), torch.Generator().manual_seed(5))
    assert a.loss.item() == b.loss.item() and a.dec_loss > 0 and a.enc_loss > 0
    assert abs(a.loss.item() - (a.dec_loss + a.enc_loss)) < 1e-5
    only_dec = block_diffusion_loss(model, batch, LossConfig(w_enc=0.0), torch.Generator().manual_seed(5))
    assert only_dec.enc_loss == 0 and abs(only_dec.dec_loss - a.dec_loss) < 1e-5  # the truncated encoder agrees
    rew = block_diffusion_loss(model, batch, LossConfig(reweighted=True), torch.Generator().manual_seed(5))
    assert rew.dec_loss > a.dec_loss  # 1/(1-t) > 1


def test_loss_falls_on_tiny_overfit_set():
    from dgemma.train.trainer import TrainConfig, Trainer
    from dgemma.train.data import ShuffledExamples

    torch.manual_seed(0)
    model = _model(16, canvas_length=8, std=0.02).train()
    g = torch.Generator().manual_seed(0)
    examples = [Example([2] + torch.randint(3, 64, (4,), generator=g).tolist(),
                        torch.randint(3, 64, (10,), generator=g).tolist()) for _ in range(4)]
    cfg = TrainConfig(steps=60, batch_size=4, lr=3e-3, warmup_steps=5, log_every=10, eval_every=1000,
                      save_every=1000)
    from dgemma.presets import default_generation

    config = preset_config("tiny", sliding_window=16, canvas_length=8, vocab_size=64)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, config, default_generation(config), cfg, ShuffledExamples(examples), out,
                          quiet=True)
        trainer.train()
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses
