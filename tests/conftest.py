"""Shared fixtures: tiny random checkpoints written by the reference implementation (transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                 sliding_window=8, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                 layer_types=["sliding_attention", "full_attention", "full_attention"])
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=16)


def make_reference_checkpoint(path: Path, text: dict | None = None, canvas_length: int = 16, seed: int = 0,
                              std: float = 0.02, vision: bool = True, generation: dict | None = None,
                              max_shard_size: str | None = None) -> Path:
    """Build a random DiffusionGemmaForBlockDiffusion with transformers and save it with save_pretrained."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(TINY_TEXT if text is None else text)
    text.setdefault("initializer_range", std)
    cfg = DiffusionGemmaConfig(text_config=text, canvas_length=canvas_length,
                               vision_config=TINY_VISION if vision else None, initializer_range=std)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    # save_pretrained writes no eos_token_id for a model built from a config (transformers then never stops at EOS,
    # and dgemma stops at config.json's with a notice); the release's file names its EOS, and so does this one
    # unless told otherwise
    gen_path = Path(path) / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen.update({"eos_token_id": 1, "pad_token_id": 0, **(generation or {})})
    gen_path.write_text(json.dumps({k: v for k, v in gen.items() if v is not None}))
    return Path(path)


def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest, and far more steadily on a shared 2-core machine, on one intra-op thread."""
    yield from _one_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """The same for a module's own module-scoped fixtures (a model, a running server): a module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_thread_module")`."""
    yield from _one_thread()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_reference_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
