"""What an image costs: prefill with one 768x768 image, and the denoising pass with an image in the prompt.

A random `small`-preset text model with a random vision tower of the release's layer shape (hidden 1152, 16 heads of
72, MLP 4304, patch 16, pooling 3, 280 soft tokens per image, standardised; the release has 27 such layers, this
tower --vision-layers of them). Reports, as the median of --repeats runs:
  - preprocessing: PNG decode, fit to the patch budget (768x768 already fits: 48 x 48 patches) and patchify;
  - the tower: 2,520 patches -> 280 soft tokens in the text embedding space;
  - prefill of a chat-sized prompt with the image (tower + encoder) and of a text prompt of the same length;
  - one decoder pass (a denoising step's forward) over the cache of each prompt.

    python benchmarks/vision_prefill.py [--vision-layers 2] [--repeats 5] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch

from dgemma.config import VisionConfig
from dgemma.images import (
    ImageProcessorConfig,
    ImageTokens,
    PromptImages,
    decode_image,
    expand_image_tokens,
    preprocess,
)
from dgemma.model.vision import Vision
from dgemma.presets import init_weights, preset_config, random_model


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    cfg = preset_config("small")
    model = random_model(cfg, device=str(device), dtype=dtype)
    vcfg = VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.vision_layers,
                        num_attention_heads=16, num_key_value_heads=16, head_dim=72, standardize=True)
    vision = Vision(vcfg, cfg.text.hidden_size)
    init_weights(vision, std=0.02)
    vision = vision.to(device=device, dtype=dtype).eval()
    vision.vision_tower.reset_rope(device)
    processor = ImageProcessorConfig()  # the release's: patch 16, pooling 3, 280 soft tokens
    tokens = ImageTokens(boi=10, image=11, eoi=12)

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:768, 0:768]
    pixels = np.clip(np.stack([x / 3, y / 3, (x + y) / 6], -1) + rng.normal(0, 30, (768, 768, 3)), 0, 255)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
    png = buf.getvalue()

    def prep():
        return preprocess(decode_image(png), processor)

    patches = prep()
    # a chat-sized prompt: 40 text tokens, the image, 20 text tokens; and a text prompt of the same length
    raw = list(range(100, 140)) + [tokens.image] + list(range(200, 220))
    prompt = expand_image_tokens(raw, [patches], tokens)
    text_prompt = list(range(100, 100 + len(prompt)))
    ids, text_ids = (torch.tensor([p], device=device) for p in (prompt, text_prompt))
    images = PromptImages(vision, tokens, [[patches]])
    capacity = len(prompt) + cfg.canvas_length

    def prefill(with_image: bool):
        cache = model.new_cache(1, capacity)
        with torch.inference_mode():
            if with_image:
                images.encode(model, ids, cache)
            else:
                model.encode(text_ids, cache)
        return cache

    canvas = torch.randint(0, cfg.text.vocab_size, (1, cfg.canvas_length), device=device)
    caches = {True: prefill(True), False: prefill(False)}

    def denoise(with_image: bool):
        with torch.inference_mode():
            model.denoise(canvas, caches[with_image])

    r = args.repeats
    print(f"device {device} ({dtype}), {torch.get_num_threads()} threads; text: small preset "
          f"({cfg.text.num_hidden_layers} layers, hidden {cfg.text.hidden_size}, canvas {cfg.canvas_length}); "
          f"tower: {args.vision_layers} layers of hidden 1152 ({sum(p.numel() for p in vision.parameters()) / 1e6:.1f}M "
          f"parameters); image 768x768 -> {patches.pixels.shape[0]} patches -> {patches.num_soft_tokens} soft tokens; "
          f"prompt {len(prompt)} tokens")
    print(f"preprocess (PNG decode, resize, patchify)  {timed(prep, r, device):8.1f} ms")
    print(f"vision tower + embed_vision                {timed(lambda: vision.features([(patches.pixels, patches.positions)]), r, device):8.1f} ms")
    print(f"prefill with the image (tower + encoder)   {timed(lambda: prefill(True), r, device):8.1f} ms")
    print(f"prefill of a text prompt, same length      {timed(lambda: prefill(False), r, device):8.1f} ms")
    print(f"decoder pass, image in the prompt          {timed(lambda: denoise(True), r, device):8.1f} ms/step")
    print(f"decoder pass, text prompt of same length   {timed(lambda: denoise(False), r, device):8.1f} ms/step")


if __name__ == "__main__":
    main()
