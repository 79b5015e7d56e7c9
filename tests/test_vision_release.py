"""Images through `dgemma generate --chat --image` against transformers on a release-style setup: the release's
image processing (patch 16, pooling 3, processor_config.json with max_soft_tokens 70), a chat template that writes
an image part as the release's does ('\\n\\n<|image|>\\n\\n'), bidirectional attention among an image's soft tokens,
odd image sizes and two seeds. The reference side builds its prompt as Gemma4Processor does: the template rendered by
transformers' tokenizer, each placeholder replaced by boi, one image token per soft token and eoi, then tokenized,
with mm_token_type_ids marking the image tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dgemma.text.chat_template import GEMMA4_CHAT_TEMPLATE

from .conftest import TINY_TEXT
from .test_vision import BOI, EOI, IMAGE, add_image_tokenizer, test_image

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.usefixtures("one_thread_module")

TOWER = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, standardize=True, use_clipped_linears=True)
PROCESSOR = dict(patch_size=16, pooling_kernel_size=3, max_soft_tokens=70)
RELEASE_IMAGE_PART = "{{- '\\n\\n<|image|>\\n\\n' -}}"
QUESTION = "What is in this picture?"
NEW, STEPS = 32, 5


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A random reference model saved with save_pretrained, a tokenizer with the image tokens and the release-style
    template, and the release's processor_config.json with max_soft_tokens 70."""
    path = tmp_path_factory.mktemp("release") / "ckpt"
    text = dict(TINY_TEXT, initializer_range=0.02, use_bidirectional_attention="vision")
    cfg = transformers.DiffusionGemmaConfig(text_config=text, vision_config=TOWER, canvas_length=16,
                                            boi_token_id=BOI, eoi_token_id=EOI, image_token_id=IMAGE)
    torch.manual_seed(11)
    model = transformers.DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():  # away from their identity values, so that they are tested
        model.model.encoder.vision_tower.std_bias.normal_(0, 0.5)
        model.model.encoder.vision_tower.std_scale.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    add_image_tokenizer(path)
    template = GEMMA4_CHAT_TEMPLATE.replace("{{- '<|image|>' -}}", RELEASE_IMAGE_PART)
    assert template != GEMMA4_CHAT_TEMPLATE
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(dict(tok_cfg, chat_template=template)))
    (path / "processor_config.json").write_text(json.dumps({
        "image_processor": {**PROCESSOR, "image_processor_type": "Gemma4ImageProcessor", "resample": 3,
                            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                            "do_normalize": False, "do_convert_rgb": True},
        "image_seq_length": 280, "processor_class": "Gemma4Processor"}))
    return path, model, template


def _reference(model, path: Path, template: str, image_file: Path, seed: int) -> list[int]:
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<bos>",
                                  eos_token="<eos>", pad_token="<pad>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    pixels = Gemma4ImageProcessorPil(**PROCESSOR)(images=[PIL.open(image_file)], return_tensors="pt")
    soft = int(pixels["num_soft_tokens_per_image"][0])
    assert text.count("<|image|>") == 1
    text = text.replace("<|image|>", "<|image>" + "<|image|>" * soft + "<image|>")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert int((ids == IMAGE).sum()) == soft and 10 < soft <= PROCESSOR["max_soft_tokens"]
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels["pixel_values"],
                         image_position_ids=pixels["image_position_ids"], mm_token_type_ids=(ids == IMAGE).long(),
                         max_new_tokens=NEW, max_denoising_steps=STEPS)
    return out.sequences[0, ids.shape[1]:].tolist()[:NEW]


def _dgemma(capsys, path: Path, image_file: Path | None, seed: int) -> list[int]:
    from dgemma.cli import main

    args = ["generate", "--model", str(path), "--chat", "--prompt", QUESTION, "--seed", str(seed),
            "--max-new-tokens", str(NEW), "--max-denoising-steps", str(STEPS), "--no-eos", "--json", "--device", "cpu"]
    assert main(args + (["--image", str(image_file)] if image_file else [])) == 0
    return json.loads(capsys.readouterr().out)["outputs"][0]["token_ids"]


@pytest.mark.parametrize("width, height", [(300, 420), (301, 173)])
def test_chat_with_an_image_gives_transformers_tokens(release, capsys, tmp_path, width, height):
    path, model, template = release
    image_file = tmp_path / f"{width}x{height}.png"
    test_image(width, height, width).save(image_file)
    outputs = {}
    for seed in (7, 8):
        want = _reference(model, path, template, image_file, seed)
        outputs[seed] = _dgemma(capsys, path, image_file, seed)
        assert outputs[seed] == want, (seed, sum(a == b for a, b in zip(outputs[seed], want)))
    # the image changes the answer, so the comparison above tests it
    assert _dgemma(capsys, path, None, 7) != outputs[7]


@pytest.mark.parametrize("seed", [7, 8])
def test_serving_engine_image_prefill_gives_generate_tokens(release, seed):
    """The serving engine's image prefill (chunked, into the paged cache) gives generate's tokens: one request with
    the exact sampler draws what generate's one row draws, so any difference is in the prompt's K/V."""
    from dgemma.engine import Engine, SamplingParams
    from dgemma.generate import generate
    from dgemma.images import ImageSupport
    from dgemma.io import checkpoint

    path, _, _ = release
    ckpt = checkpoint.load(path, quiet=True)
    support = ImageSupport.of(ckpt)
    ids, patches = support.prepare([2, IMAGE, 10, 11, 12, 13], [test_image(301, 173, 301)])
    assert len(ids) > 64  # the image's soft tokens cross the engine's 64-token prefill chunks
    gen = ckpt.generation.replace(max_new_tokens=NEW, max_denoising_steps=STEPS)
    want = generate(ckpt.model, [ids], gen, generator=torch.Generator().manual_seed(seed), sampler="exact",
                    images=support.prompt_images([patches])).token_ids[0]
    engine = Engine(ckpt.model, gen, max_num_seqs=2, max_model_len=512, sampler="exact").start()
    try:
        got = engine.generate(ids, SamplingParams(max_tokens=NEW, seed=seed, pin_prefix=False,
                                                  images=support.prompt_images([patches])), timeout=300)
    finally:
        engine.stop()
    assert got.token_ids == want
