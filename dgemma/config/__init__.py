"""Model and generation configs: small dataclasses that read the released HF files and validate.

text.py (text_config), vision.py (vision_config), model.py (the whole config.json), generation.py
(generation_config.json) and checks.py (ConfigError and the shared value checks)."""

from .checks import MAX_JSON_BYTES, ConfigError, read_json
from .generation import (GENERATION_KEYS, MAX_DENOISING_STEPS, MAX_FILE_TEMPERATURE, MAX_NEW_TOKENS, MAX_TEMPERATURE,
                         SAMPLER, GenerationConfig)
from .model import IMAGE_TOKEN_DEFAULTS, MAX_CANVAS_LENGTH, ModelConfig
from .text import FULL, PER_LAYER_FIELDS, SLIDING, TEXT_LIMITS, TextConfig, resolve_per_layer_config
from .vision import VISION_LIMITS, VisionConfig

__all__ = [
    "ConfigError", "FULL", "GENERATION_KEYS", "GenerationConfig", "IMAGE_TOKEN_DEFAULTS", "MAX_CANVAS_LENGTH",
    "MAX_DENOISING_STEPS", "MAX_FILE_TEMPERATURE", "MAX_JSON_BYTES", "MAX_NEW_TOKENS", "MAX_TEMPERATURE",
    "ModelConfig", "PER_LAYER_FIELDS", "SAMPLER", "SLIDING", "TEXT_LIMITS", "TextConfig", "VISION_LIMITS",
    "VisionConfig", "read_json", "resolve_per_layer_config",
]
