"""A checkpoint exactly as transformers' save_pretrained writes it, with no hand edits: its generation_config.json
names no eos_token_id, and on a small vocabulary its image token ids (transformers' defaults) lie outside it."""

from __future__ import annotations

import json

import pytest
import torch

from dgemma.io import checkpoint
from dgemma.cli import main
from dgemma.generate import left_pad

from .conftest import TINY_TEXT, TINY_VISION

transformers = pytest.importorskip("transformers")

CANVAS, STEPS = 8, 4
PROMPT = [5, 9, 17, 33, 65, 129, 200, 3]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """save_pretrained of a DiffusionGemmaForBlockDiffusion built from a config, vision tower included."""
    cfg = transformers.DiffusionGemmaConfig(text_config=dict(TINY_TEXT, initializer_range=0.3), canvas_length=CANVAS,
                                            vision_config=TINY_VISION, initializer_range=0.3)
    torch.manual_seed(3)
    model = transformers.DiffusionGemmaForBlockDiffusion(cfg).eval()
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    model.save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    assert "eos_token_id" not in json.loads((path / "generation_config.json").read_text())
    assert raw["boi_token_id"] >= TINY_TEXT["vocab_size"]  # transformers' default, outside this vocabulary
    return path, model


def _generate(capsys, path, *extra):
    rc = main(["generate", "--model", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
               str(2 * CANVAS), "--max-denoising-steps", str(STEPS), "--seed", "5", "--device", "cpu", "--json",
               *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _reference(model, seed: int) -> list[int]:
    tokens, valid = left_pad([PROMPT], 0)
    torch.manual_seed(seed)
    out = model.generate(tokens, attention_mask=valid.long(), max_new_tokens=2 * CANVAS, max_denoising_steps=STEPS)
    return out.sequences[0, tokens.shape[1]:].tolist()[: 2 * CANVAS]


def test_loads_and_says_which_eos_applies(saved, capsys):
    path, _ = saved
    rc, out, err = _generate(capsys, path)
    assert rc == 0
    ids = json.loads(out)["outputs"][0]["token_ids"]
    assert 0 < len(ids) <= 2 * CANVAS and 1 not in ids[:-1]  # stops at config.json's eos, id 1
    lines = err.splitlines()
    assert any("no eos_token_id" in line and "eos_token_id [1]" in line and "--no-eos" in line for line in lines)
    ckpt = checkpoint.load(path, quiet=True)
    assert "boi_token_id must be a token id in [0, 256)" in ckpt.no_images_reason


def test_no_eos_gives_transformers_tokens(saved, capsys):
    path, model = saved
    want = _reference(model, 5)
    rc, out, _ = _generate(capsys, path, "--no-eos")
    assert rc == 0
    assert json.loads(out)["outputs"][0]["token_ids"] == want


def test_an_image_is_refused_with_the_reason(saved, capsys, tmp_path):
    from PIL import Image

    path, _ = saved
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    rc, _, err = _generate(capsys, path, "--image", str(tmp_path / "red.png"))
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert "cannot take images" in last and "boi_token_id must be a token id in [0, 256)" in last


def test_no_eos_refuses_output_that_must_end_in_eos(saved, capsys):
    path, _ = saved
    rc, _, err = _generate(capsys, path, "--no-eos", "--regex", "a+")
    assert rc == 2 and "--no-eos cannot go with --regex" in err
