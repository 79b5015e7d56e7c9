"""Images in the prompt: the Gemma 4 image processor's preprocessing, and the prompt side (decoding: image_files.py).

Preprocessing, per image, as transformers' Gemma 4 image processor does it (numbers reused in the code):
  1. Decode, and convert to RGB (transparency composited onto white): image_files.py, in a decode slot.
  2. Resize with the aspect ratio kept (PIL bicubic) to the largest size whose sides are multiples of
     patch_size * pooling_kernel_size and that has at most max_soft_tokens * pooling_kernel_size^2 patches.
  3. Scale pixels to [0, 1].
  4. Cut into patch_size x patch_size patches in raster order, each flattened as (row, column, channel), with its
     (x, y) patch position. The image becomes (patches / pooling_kernel_size^2) soft tokens.

The prompt side: each image placeholder token (`<|image|>`, which the chat template writes for an image part)
becomes boi, then one image token per soft token, then eoi, as the reference processor expands it. The encoder's
input embeddings take the image's features at those image tokens, and (with use_bidirectional_attention
"vision") each image's soft tokens attend to each other as well as causally.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .image_files import DECODE_SLOTS, TRIM_PIXELS, EncodedImage, ImageError, return_freed_memory

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the values transformers' processor accepts


@dataclass
class ImageProcessorConfig:
    """processor_config.json's image_processor (or preprocessor_config.json); defaults are transformers'."""

    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    resample: int = 3  # PIL bicubic
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ImageError(f"image processor max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, "
                             f"got {self.max_soft_tokens!r:.40}")
        for name in ("patch_size", "pooling_kernel_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64):
                raise ImageError(f"image processor {name} must be an integer in [1, 64], got {value!r:.40}")
        if self.resample not in (0, 1, 2, 3, 4, 5):
            raise ImageError(f"image processor resample must be a PIL filter number 0-5, got {self.resample!r:.40}")
        if isinstance(self.rescale_factor, bool) or not isinstance(self.rescale_factor, (int, float)) \
                or not 0 < self.rescale_factor <= 1:
            raise ImageError(f"image processor rescale_factor must be a number in (0, 1], got "
                             f"{self.rescale_factor!r:.40}")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    @classmethod
    def load(cls, directory: str | Path) -> ImageProcessorConfig:
        """Read the checkpoint's processor config; the reference's defaults when it has none."""
        directory = Path(directory)
        for name in ("processor_config.json", "preprocessor_config.json"):
            path = directory / name
            if not path.is_file():
                continue
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise ImageError(f"{path}: not valid JSON ({e})") from None
            if isinstance(d, dict) and isinstance(d.get("image_processor"), dict):
                d = d["image_processor"]
            if not isinstance(d, dict):
                raise ImageError(f"{path}: expected a JSON object")
            # options this processor does not implement must hold the values it assumes
            for key, assumed in (("do_resize", True), ("do_rescale", True), ("do_convert_rgb", True),
                                 ("do_normalize", False)):
                if d.get(key, assumed) != assumed:
                    raise ImageError(f"{path}: {key}={d[key]!r:.20} is not supported (dgemma assumes {assumed})")
            kwargs = {k: d[k] for k in ("patch_size", "max_soft_tokens", "pooling_kernel_size", "resample",
                                        "rescale_factor") if d.get(k) is not None}
            try:
                return cls(**kwargs)
            except ImageError as e:
                raise ImageError(f"{path}: {e}") from None
        return cls()


@dataclass
class ImagePatches:
    """One preprocessed image: pixels (P, p*p*3) float32 in [0, 1], positions (P, 2) long (x, y)."""

    pixels: torch.Tensor
    positions: torch.Tensor
    num_soft_tokens: int


def resized_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """2. The target (height, width): the image scaled to the patch budget, each side rounded down to a multiple of
    patch_size * pooling_kernel_size; a side that rounds to zero gets one multiple and the other side follows the
    aspect ratio (in whole multiples, capped at the budget's longest side)."""
    unit = cfg.patch_size * cfg.pooling_kernel_size
    budget = cfg.max_patches * cfg.patch_size**2  # pixels
    scale = math.sqrt(budget / (height * width))
    h = math.floor(height * scale / unit) * unit
    w = math.floor(width * scale / unit) * unit
    longest = (cfg.max_patches // cfg.pooling_kernel_size**2) * unit
    if h == 0 and w == 0:
        raise ImageError(f"cannot resize a {width}x{height} image to the patch grid")
    if h == 0:
        h, w = unit, min(math.floor(width / height) * unit, longest)
    elif w == 0:
        h, w = min(math.floor(height / width) * unit, longest), unit
    if h * w > budget:
        raise ImageError(f"a {width}x{height} image does not fit in {cfg.max_patches} patches")
    return h, w


def preprocess(image, cfg: ImageProcessorConfig) -> ImagePatches:
    """An RGB PIL image, or an EncodedImage (decoded here, in one of DECODE_SLOTS) -> its patches and positions
    (steps 1-4)."""
    h, w = resized_size(image.height, image.width, cfg)
    if isinstance(image, EncodedImage):
        encoded = image
        with DECODE_SLOTS:
            full = encoded.decode()  # 1.
            image = full.resize((w, h), resample=cfg.resample) if (h, w) != (full.height, full.width) else full  # 2.
            if image is not full:
                full.close()
            del full
        if encoded.pixels >= TRIM_PIXELS:
            return_freed_memory()
    elif (h, w) != (image.height, image.width):  # 2.
        image = image.resize((w, h), resample=cfg.resample)
    pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * cfg.rescale_factor).astype(np.float32)  # 3.
    p = cfg.patch_size
    rows, cols = h // p, w // p
    # 4. (H, W, 3) -> (rows, p, cols, p, 3) -> (rows, cols, p, p, 3) -> (rows * cols, p * p * 3)
    patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
    y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    positions = np.stack([x.reshape(-1), y.reshape(-1)], axis=-1)
    return ImagePatches(torch.from_numpy(np.ascontiguousarray(patches)), torch.from_numpy(positions).long(),
                        rows * cols // cfg.pooling_kernel_size**2)


@dataclass(frozen=True)
class ImageTokens:
    """The token ids of an image in the prompt (config.json's boi_token_id, image_token_id, eoi_token_id)."""

    boi: int
    image: int
    eoi: int


def expand_image_tokens(ids: list[int], images: list[ImagePatches], tokens: ImageTokens) -> list[int]:
    """Replace the i-th image token of `ids` by boi, image x (soft tokens of image i), eoi. The prompt must hold
    exactly one image token per image (the chat template writes one per image part)."""
    found = sum(1 for t in ids if t == tokens.image)
    if found != len(images):
        raise ImageError(f"the prompt has {found} image placeholders for {len(images)} images")
    out: list[int] = []
    it = iter(images)
    for t in ids:
        if t == tokens.image:
            out += [tokens.boi] + [tokens.image] * next(it).num_soft_tokens + [tokens.eoi]
        else:
            out.append(t)
    return out


def image_groups(tokens: torch.Tensor, image_token: int) -> torch.Tensor:
    """(R, T) ids -> (R, T) long: for each run of consecutive image tokens, its index within the row; -1 elsewhere
    (the runs whose soft tokens attend to each other)."""
    is_image = tokens == image_token
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)


def prompt_embeddings(model, vision, tokens: torch.Tensor, images: list[ImagePatches],
                      image_token: int) -> torch.Tensor:
    """The encoder's input embeddings for (R, T) `tokens` whose image tokens take `images`' features, in order
    (row by row, left to right), as the reference scatters them. -> (R, T, H)."""
    embeds = model.embed(tokens)
    mask = tokens == image_token
    features = vision.features([(im.pixels, im.positions) for im in images])
    if int(mask.sum()) != features.shape[0]:
        raise ImageError(f"the prompt has {int(mask.sum())} image tokens for {features.shape[0]} image features")
    embeds[mask] = features.to(embeds.dtype)
    return embeds


@dataclass
class PromptImages:
    """The images of a batch of prompts whose image tokens are already expanded: per row, its images in order."""

    vision: object  # model.vision.Vision
    tokens: ImageTokens
    rows: list[list[ImagePatches]]

    def encode(self, model, tokens: torch.Tensor, cache, rows: list[int] | None = None) -> torch.Tensor:
        """model.encode of a prompt batch (R, T) with these images: the tower runs once, here, and its features
        go into the cache with the prompt (the denoising steps never see the tower)."""
        images = [im for row in self.rows for im in row]
        if not images:
            return model.encode(tokens, cache, rows)
        embeds = prompt_embeddings(model, self.vision, tokens, images, self.tokens.image)
        return model.encode(tokens, cache, rows, embeds=embeds, image_groups=image_groups(tokens, self.tokens.image))


@dataclass
class ImageSupport:
    """What a loaded checkpoint needs to take images: its tower, its processor config and its image token ids."""

    vision: object  # model.vision.Vision
    processor: ImageProcessorConfig
    tokens: ImageTokens

    @classmethod
    def of(cls, ckpt) -> ImageSupport:
        """ImageError when the checkpoint cannot take images (no tower, or loaded without it)."""
        if ckpt.no_images_reason is not None:
            raise ImageError(f"this model cannot take images: {ckpt.no_images_reason}")
        c = ckpt.config
        return cls(ckpt.vision, ImageProcessorConfig.load(ckpt.path),
                   ImageTokens(c.token_id("boi_token_id"), c.token_id("image_token_id"), c.token_id("eoi_token_id")))

    def prepare(self, ids: list[int], images: list) -> tuple[list[int], list[ImagePatches]]:
        """A prompt with one image token per image (RGB PIL images, in order) -> the expanded prompt and the
        images' patches."""
        patches = [self.patches(im) for im in images]
        return expand_image_tokens(ids, patches, self.tokens), patches

    def patches(self, image) -> ImagePatches:
        """One RGB PIL image, preprocessed; ImageError if this tower has too few position embeddings for it."""
        out = preprocess(image, self.processor)
        size = self.vision.config.position_embedding_size
        if int(out.positions.max()) >= size:
            raise ImageError(f"the image is {int(out.positions.max()) + 1} patches wide or high after resizing, past "
                             f"this vision tower's {size} position embeddings")
        return out

    def prompt_images(self, rows: list[list[ImagePatches]]) -> PromptImages:
        return PromptImages(self.vision, self.tokens, rows)
