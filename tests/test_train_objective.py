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


def test_collate_marks_fixed_positions_in_the_response():
    examples = [Example([2, 5, 6], [7, 8, 9], fixed=[0, 2]), Example([2], [7] * 5)]
    batch = collate(examples, canvas_length=4, eos_id=1, pad_id=0)
    assert batch.fixed[0].nonzero().flatten().tolist() == [3, 5]  # prompt length 3 + response positions 0 and 2
    assert not batch.fixed[1].any()
    assert collate([Example([2], [7, 8])], canvas_length=4, eos_id=1, pad_id=0).fixed is None
    with pytest.raises(ValueError, match="fixed positions"):
        collate([Example([2], [7, 8], fixed=[2])], canvas_length=4, eos_id=1, pad_id=0)  # 2 is the EOS, not response


def _spy_decoder_passes(monkeypatch):
    """Record every decoder pass's (noisy canvas, logits, signal): the real pass runs, the spy only keeps copies."""
    from dgemma.train import objective

    calls, real = [], objective.decoder_pass

    def spy(model, enc_kv, canvas, starts, signal):
        logits = real(model, enc_kv, canvas, starts, signal)
        calls.append((canvas.clone(), logits.detach().clone(), None if signal is None else signal.detach().clone()))
        return logits

    monkeypatch.setattr(objective, "decoder_pass", spy)
    return calls


def test_fixed_positions_stay_clean_and_leave_the_loss(monkeypatch):
    """A fixed position (a pinned given) is never corrupted, and the decoder loss and accuracy are the means over
    the other positions only."""
    model = _model(16, canvas_length=8)
    C, V = model.canvas_length, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = [Example([2] + torch.randint(3, V, (4,), generator=g).tolist(),
                        torch.randint(3, V, (7,), generator=g).tolist(), fixed=fixed)
                for fixed in ([0, 1, 2, 5], [3], [0, 1, 2, 3, 4, 5, 6], None)]
    batch = collate(examples, C, eos_id=1, pad_id=0)
    calls = _spy_decoder_passes(monkeypatch)
    cfg = LossConfig(w_enc=0.0, eps=0.45)  # t in [0.45, 0.55]: about half of the free positions are noised
    out = block_diffusion_loss(model, batch, cfg, torch.Generator().manual_seed(1))
    clean = batch.tokens[:, 5:5 + C]  # every prompt has length 5 and one canvas
    fixed = batch.fixed[:, 5:5 + C]
    (first, _, _), (second, logits, _) = calls
    assert torch.equal(first, second)
    assert torch.equal(second[fixed], clean[fixed])
    assert (second[~fixed] != clean[~fixed]).float().mean() > 0.25
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), clean.reshape(-1), reduction="none").view(-1, C)
    assert abs(out.dec_loss - ce[~fixed].mean().item()) < 1e-5
    assert abs(out.dec_loss - ce.mean().item()) > 1e-3  # the fixed positions would have changed it
    assert abs(out.dec_accuracy - (logits.argmax(-1) == clean)[~fixed].float().mean().item()) < 1e-6


@pytest.mark.parametrize("sampled_canvas", [0.0, 1.0])
def test_fixed_positions_loss_splits_over_processes(sampled_canvas):
    """With fixed positions spread unevenly over the rows, the mean of the per-process losses (what DDP's gradient
    averaging takes) is still the one-process loss, and so are the gradients; also when the later passes read the
    first pass's samples (drawn for the whole batch, so each process samples its rows as one process would)."""
    model = _model(16, canvas_length=8)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = [Example([2] + torch.randint(3, V, (4,), generator=g).tolist(),
                        torch.randint(3, V, (7,), generator=g).tolist(), fixed=fixed)
                for fixed in ([0, 1, 2, 3, 4, 5], [1], None, [2, 4])]
    batch = collate(examples, model.canvas_length, eos_id=1, pad_id=0)
    cfg = LossConfig(w_enc=0.0, sampled_canvas=sampled_canvas)

    def run(shard):
        model.zero_grad()
        out = block_diffusion_loss(model, batch, cfg, torch.Generator().manual_seed(2), shard=shard)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, grads = run((0, 1))
    halves = [run((rank, 2)) for rank in range(2)]
    assert abs(sum(h.dec_loss for h, _ in halves) / 2 - whole.dec_loss) < 1e-5
    assert abs(sum(h.dec_accuracy for h, _ in halves) / 2 - whole.dec_accuracy) < 1e-6
    for i, grad in enumerate(grads):  # float sums in another order: tolerance relative to the gradient's scale
        torch.testing.assert_close((halves[0][1][i] + halves[1][1][i]) / 2, grad,
                                   atol=1e-4 * float(grad.abs().max()), rtol=1e-4)


def test_sampled_canvas_puts_the_first_passes_guesses_among_the_noise(monkeypatch):
    """sampled_canvas=1: the passes after the first read a canvas where some of the corrupted positions (a share
    drawn per row) hold the first pass's sample; clean and fixed positions never change. The first pass here is
    made to guess token 7 everywhere, so every sampled position must read 7."""
    from dgemma.train import objective
    from dgemma.train.corruption import sample_noise_level, uniform_corrupt

    model = _model(16, canvas_length=16)
    V, C = model.config.vocab_size, model.canvas_length
    g = torch.Generator().manual_seed(0)
    examples = [Example([2, 10, 11, 12, 13], torch.randint(8, V, (15,), generator=g).tolist(),
                        fixed=[0, 3, 9] if i % 2 else None) for i in range(8)]
    batch = collate(examples, C, eos_id=1, pad_id=0)
    clean, fixed = batch.tokens[:, 5:5 + C], batch.fixed[:, 5:5 + C]
    calls, real = [], objective.decoder_pass

    def guess_seven(model, enc_kv, canvas, starts, signal):
        logits = real(model, enc_kv, canvas, starts, signal)
        if signal is None:  # the first pass
            logits = logits.clone()
            logits[..., 7] += 100.0
        calls.append((canvas.clone(), logits.detach().clone(), signal))
        return logits

    monkeypatch.setattr(objective, "decoder_pass", guess_seven)
    shares = []
    for seed in range(4):
        calls.clear()
        block_diffusion_loss(model, batch, LossConfig(w_enc=0.0, eps=0.45, sampled_canvas=1.0, self_cond_prob=1.0),
                             torch.Generator().manual_seed(seed))
        (first, first_logits, _), (second, _, signal) = calls
        changed = second != first
        assert (second[changed] == 7).all()
        # the corruption, replayed from the same draws (noise level, scored canvas, then corrupt: the documented order)
        replay = torch.Generator().manual_seed(seed)
        t = sample_noise_level(len(examples), 0.45, replay)
        torch.rand(len(examples), generator=replay)
        noisy, replaced = uniform_corrupt(clean, t, V, ~fixed, generator=replay)
        assert torch.equal(noisy, first)
        assert not (changed & ~replaced).any()  # only corrupted positions take a guess
        torch.testing.assert_close(signal, model.soft_embed(first_logits))  # the gradient pass's signal: pass 1's
        corrupted = replaced.sum(1)
        shares += (changed.sum(1) / corrupted.clamp(min=1))[corrupted > 4].tolist()
    assert min(shares) < 0.3 and max(shares) > 0.7  # the share of guesses is drawn per row
    calls.clear()
    block_diffusion_loss(model, batch, LossConfig(w_enc=0.0, eps=0.45), torch.Generator().manual_seed(0))
    assert torch.equal(calls[0][0], calls[1][0])  # the default: both passes read the same canvas
    with pytest.raises(ValueError, match="sampled_canvas"):
        LossConfig(sampled_canvas=1.5)


def test_recycled_self_conditioning_feeds_each_pass_the_last_ones_belief(monkeypatch):
    """self_cond_passes=3: 1-3 no-gradient passes (drawn per batch), each reading the previous pass's soft
    embedding, then the gradient pass reading the last one's (zeroed on rows without self-conditioning)."""
    model = _model(16, canvas_length=8)
    examples = [Example([2, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25, 26]) for _ in range(4)]
    batch = collate(examples, model.canvas_length, eos_id=1, pad_id=0)
    calls = _spy_decoder_passes(monkeypatch)
    counts = set()
    for seed in range(12):
        calls.clear()
        block_diffusion_loss(model, batch, LossConfig(w_enc=0.0, self_cond_passes=3, self_cond_prob=1.0),
                             torch.Generator().manual_seed(seed))
        counts.add(len(calls))
        assert calls[0][2] is None
        for (_, logits, _), (_, _, signal) in zip(calls, calls[1:]):
            torch.testing.assert_close(signal, model.soft_embed(logits))
    assert counts == {2, 3, 4}
    calls.clear()
    block_diffusion_loss(model, batch, LossConfig(w_enc=0.0), torch.Generator().manual_seed(0))
    assert len(calls) == 2  # the default: one pass without signal, then the gradient pass
    with pytest.raises(ValueError, match="self_cond_passes"):
        LossConfig(self_cond_passes=0)
