"""CUDA: the graph-replayed step against the eager one, and both against the reference on the same device; Sudoku
training against the CPU.

Skipped without a CUDA device (CI has none); run on a GPU machine with `python -m pytest -q -m gpu`.
"""

from __future__ import annotations

import pytest
import torch

from dgemma.io import checkpoint
from dgemma.generate import generate

from .conftest import TINY_TEXT, make_reference_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
transformers = pytest.importorskip("transformers")

TEXT = dict(TINY_TEXT, num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, global_head_dim=64, num_experts=8, top_k_experts=2, moe_intermediate_size=64,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
PROMPTS = [[5, 17, 99, 3, 42, 7], [11, 12, 13]]


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    return make_reference_checkpoint(tmp_path_factory.mktemp("cuda") / "ckpt", text=TEXT, canvas_length=16,
                                     std=0.1, seed=3)


def _ours(path, dtype, graphs, prompts=PROMPTS, **gen_kw):
    ck = checkpoint.load(path, device="cuda", dtype=dtype, quiet=True)
    gen = ck.generation.replace(max_new_tokens=48, **gen_kw)
    torch.manual_seed(7)
    return generate(ck.model, prompts, gen, cuda_graphs=graphs).token_ids


@pytest.mark.parametrize("gen_kw", [dict(), dict(max_denoising_steps=6, confidence_threshold=1e-30)])
def test_graph_replay_gives_the_eager_tokens(ckpt_path, gen_kw):
    graphed = _ours(ckpt_path, torch.bfloat16, True, **gen_kw)
    assert graphed == _ours(ckpt_path, torch.bfloat16, False, **gen_kw)
    assert graphed == _ours(ckpt_path, torch.bfloat16, None, **gen_kw)  # graphs are the default in bf16


def test_graphs_refuse_fp32(ckpt_path):
    with pytest.raises(ValueError, match="bf16"):
        _ours(ckpt_path, torch.float32, True)


@torch.no_grad()
def test_fp32_logits_match_reference_on_cuda(ckpt_path):
    """fp32 on CUDA (TF32 off, torch's default): encoder and decoder logits agree with the reference's on the
    same device. (Token-for-token equality, which the CPU parity tests show, is not claimed on CUDA.)"""
    from transformers.cache_utils import DynamicCache

    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt_path).to("cuda").eval()
    ck = checkpoint.load(ckpt_path, device="cuda", dtype=torch.float32, quiet=True)
    tokens = torch.tensor([PROMPTS[0]], device="cuda")
    canvas = torch.randint(0, TEXT["vocab_size"], (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    past = DynamicCache(config=ref.config.get_text_config(decoder=True))
    enc_ref = ref.model.encoder(input_ids=tokens, past_key_values=past).last_hidden_state
    cache = ck.model.new_cache(1, 64)
    enc = ck.model.encode(tokens, cache)
    assert (enc - enc_ref).abs().max() < 1e-4
    theirs = ref(past_key_values=past, decoder_input_ids=canvas).logits
    assert (ck.model.denoise(canvas, cache) - theirs).abs().max() < 1e-4


@torch.no_grad()
def test_bf16_decoder_logits_as_close_as_the_reference_bf16(ckpt_path):
    """bf16 is bit-exact with nothing. Measured against the reference in fp32, dgemma's bf16 decoder logits are
    as close as the reference's own bf16 logits are (relative L2 error)."""
    from transformers.cache_utils import DynamicCache

    tokens = torch.tensor([PROMPTS[0]], device="cuda")
    canvas = torch.randint(0, TEXT["vocab_size"], (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def reference(dtype):
        ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt_path, dtype=dtype).to("cuda").eval()
        past = DynamicCache(config=ref.config.get_text_config(decoder=True))
        ref.model.encoder(input_ids=tokens, past_key_values=past)
        return ref(past_key_values=past, decoder_input_ids=canvas).logits.float()

    ck = checkpoint.load(ckpt_path, device="cuda", dtype=torch.bfloat16, quiet=True)
    cache = ck.model.new_cache(1, 64)
    ck.model.encode(tokens, cache)
    ours = ck.model.denoise(canvas, cache)
    exact, theirs = reference(torch.float32), reference(torch.bfloat16)
    err_ours = float((ours - exact).norm() / exact.norm())
    err_ref = float((theirs - exact).norm() / exact.norm())
    print(f"relative error vs fp32 reference: dgemma bf16 {err_ours:.2e}, transformers bf16 {err_ref:.2e}")
    assert err_ours <= 1.5 * err_ref + 1e-3


@pytest.fixture(scope="module")
def fp8_path(ckpt_path, tmp_path_factory):
    from dgemma.cli import main

    out = tmp_path_factory.mktemp("cuda-fp8") / "fp8"
    assert main(["quantize", "--model", str(ckpt_path), "--out", str(out), "--quiet"]) == 0
    return out


def test_fp8_graph_replay_gives_the_eager_tokens(fp8_path):
    graphed = _ours(fp8_path, torch.bfloat16, True)
    assert graphed == _ours(fp8_path, torch.bfloat16, False)


@torch.no_grad()
def test_fp8_logits_on_cuda_match_the_cpu(fp8_path):
    """The CUDA dequantization (torch's conversion) and the CPU one (bit operations) give the same fp32 weights, so
    fp32 logits agree to fp32 matmul rounding."""
    V = TEXT["vocab_size"]
    tokens = torch.tensor([PROMPTS[0]])
    canvas = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(0))
    got = {}
    for device in ("cpu", "cuda"):
        ck = checkpoint.load(fp8_path, device=device, dtype=torch.float32, quiet=True)
        cache = ck.model.new_cache(1, 64)
        ck.model.encode(tokens.to(device), cache)
        got[device] = ck.model.denoise(canvas.to(device), cache).cpu()
    assert (got["cpu"] - got["cuda"]).abs().max() < 1e-4


def _sudoku_training_losses(out, device):
    """Two steps of `dgemma sudoku train` on `device` (a 2-layer model, every objective option on), and the loss it
    logged."""
    import json

    from dgemma.tasks.sudoku_cli import main

    assert main(["train", "--out", str(out), "--device", device, "--steps", "2", "--batch-size", "8",
                 "--hidden-size", "48", "--layers", "2", "--lr", "0.002", "--warmup-steps", "1", "--eval-every", "2",
                 "--eval-puzzles", "2", "--eval-givens", "44", "--pin-givens", "0.5", "--self-cond-passes", "3",
                 "--sampled-canvas", "0.5", "--seed", "3", "--threads", "1"]) == 0
    assert (out / "model" / "model.safetensors").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval_solve_rate_44" in lines[-1]
    return [line["loss"] for line in lines if "loss" in line]


def test_sudoku_training_on_cuda_follows_the_cpu(tmp_path):
    """`dgemma sudoku train --device cuda` trains in fp32 from the same initial weights and the same draws (made on
    the CPU generator) as on the CPU, so its logged loss is the CPU run's up to float rounding; its eval runs and its
    model is written."""
    cpu = _sudoku_training_losses(tmp_path / "cpu", "cpu")
    cuda = _sudoku_training_losses(tmp_path / "cuda", "cuda")
    assert len(cuda) == len(cpu) >= 1 and cuda == pytest.approx(cpu, rel=1e-3)
