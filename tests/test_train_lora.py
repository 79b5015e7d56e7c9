"""LoRA: a transform on a built model that trains only the adapters and merges back into plain weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgemma.presets import preset_config, random_model
from dgemma.train.lora import DEFAULT_TARGETS, LoRALinear, apply_lora, has_lora, lora_modules, merge_lora, save_adapter


def _model():
    return random_model(preset_config("tiny", vocab_size=64, canvas_length=8), std=0.05, seed=0)


def _logits(model, prompt, canvas):
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + canvas.shape[1])
    model.encode(prompt, cache)
    return model.denoise(canvas, cache)


def test_apply_lora_wraps_linears_and_freezes_the_rest():
    model = apply_lora(_model(), rank=4)
    wrapped = lora_modules(model)
    assert wrapped and all(name.rsplit(".", 1)[-1] in DEFAULT_TARGETS for name in wrapped)
    # every attention and MLP projection of every layer, and the self-conditioning MLP
    assert len(wrapped) == (4 + 3) + (3 + 3) + 3  # sliding layer (q, k, v, o), full layer (K = V), MLPs
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    with pytest.raises(ValueError):
        apply_lora(_model(), rank=0)


def test_lora_starts_as_identity_and_merge_is_exact():
    g = torch.Generator().manual_seed(0)
    prompt, canvas = torch.randint(0, 64, (2, 5), generator=g), torch.randint(0, 64, (2, 8), generator=g)
    base = _model()
    with torch.no_grad():
        want = _logits(base, prompt, canvas)
        model = apply_lora(_model(), rank=4, alpha=8)
        torch.testing.assert_close(_logits(model, prompt, canvas), want)  # B = 0
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05, generator=g)
        adapted = _logits(model, prompt, canvas)
        assert (adapted - want).abs().max() > 1e-3
        merge_lora(model)
        assert not has_lora(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(_logits(model, prompt, canvas), adapted, atol=1e-4, rtol=1e-4)
        assert set(model.state_dict()) == set(base.state_dict())


def test_training_step_changes_only_adapters(tmp_path):
    from dgemma.presets import default_generation
    from dgemma.train.batch import Example
    from dgemma.train.data import ShuffledExamples
    from dgemma.train.trainer import TrainConfig, Trainer

    model = apply_lora(_model(), rank=2).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = preset_config("tiny", vocab_size=64, canvas_length=8)
    examples = [Example([2, 5, 6, 7], [10, 11, 12, 13, 14]) for _ in range(2)]
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0, eval_every=100, save_every=100)
    trainer = Trainer(model, config, default_generation(config), cfg, ShuffledExamples(examples), tmp_path, quiet=True)
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))
    trainer.train()
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            assert not torch.equal(p, before[n]), n
        elif not n.endswith("lora_A"):
            assert torch.equal(p, before[n]), n
    # export merges into a copy, keeps training state, and writes the adapter
    out = trainer.export()
    assert has_lora(model)
    assert (out / "model.safetensors").is_file() and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_save_adapter_names(tmp_path):
    import json

    from safetensors.torch import load_file

    model = apply_lora(_model(), rank=3, targets=("q_proj", "v_proj"))
    save_adapter(model, tmp_path, base_model="base")
    names = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight" in names
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["peft_type"] == "LORA"
    with pytest.raises(ValueError):
        apply_lora(nn.Sequential(nn.ReLU()), rank=2)
