"""The whole checkpoint config: text stack, canvas length, optional vision tower."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .checks import ConfigError, int_in, is_int, read_json, require
from .text import TextConfig
from .vision import VisionConfig

MAX_CANVAS_LENGTH = 8192
IMAGE_TOKEN_DEFAULTS = {"boi_token_id": 255_999, "eoi_token_id": 258_882, "image_token_id": 258_880}


@dataclass
class ModelConfig:
    """The whole checkpoint config: the text stack plus the canvas length."""

    text: TextConfig
    canvas_length: int = 256
    extra: dict = field(default_factory=dict)  # top-level fields kept verbatim so a save round-trips
    vision: VisionConfig | None = None  # None: no vision tower (text only)

    def __post_init__(self) -> None:
        int_in("canvas_length", self.canvas_length, 1, MAX_CANVAS_LENGTH)

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json", vision: bool = True) -> ModelConfig:
        """vision=False: the vision_config is not read (a text-only load runs whatever tower the file describes)."""
        require(isinstance(d, dict), f"{where}: expected a JSON object")
        model_type = d.get("model_type")
        require(model_type == "diffusion_gemma",
                 f"{where}: model_type is {model_type!r}, expected 'diffusion_gemma'")
        require("text_config" in d, f"{where}: missing text_config")
        text = TextConfig.from_hf(d["text_config"], where)
        extra = {k: v for k, v in d.items() if k not in ("text_config", "canvas_length", "vision_config")}
        tower = None
        if vision and d.get("vision_config") is not None:
            tower = VisionConfig.from_hf(d["vision_config"], where)
        try:
            return cls(text=text, canvas_length=d.get("canvas_length", 256), extra=extra, vision=tower)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        return cls.from_hf(read_json(path), str(path))

    def token_id(self, name: str) -> int:
        """boi_token_id, eoi_token_id or image_token_id: config.json's value, else transformers' default."""
        value = self.extra.get(name, IMAGE_TOKEN_DEFAULTS[name])
        require(is_int(value) and 0 <= value < self.text.vocab_size,
                 f"config.json: {name} must be a token id in [0, {self.text.vocab_size}), got {value!r:.40}")
        return value

    def image_tokens_problem(self) -> str | None:
        """Why this config's image token ids cannot be used (one lies outside the vocabulary), or None."""
        for name in IMAGE_TOKEN_DEFAULTS:
            try:
                self.token_id(name)
            except ConfigError as e:
                return str(e)
        return None

    def to_hf(self) -> dict:
        d = {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "boi_token_id": 255_999,
            "eoi_token_id": 258_882,
            "image_token_id": 258_880,
            "initializer_range": self.text.initializer_range,
            "tie_word_embeddings": True,
            "dtype": "float32",
        }
        d.update({k: v for k, v in self.extra.items() if k not in ("vision_config",)})
        d.update({"model_type": "diffusion_gemma", "canvas_length": self.canvas_length,
                  "text_config": self.text.to_hf()})
        return d
