"""The vision tower's config (config.json's vision_config)."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import ConfigError, as_object, int_in, is_num, require

VISION_LIMITS = {
    "hidden_size": 2**14, "intermediate_size": 2**16, "num_hidden_layers": 256, "num_attention_heads": 256,
    "num_key_value_heads": 256, "head_dim": 1024, "patch_size": 64, "pooling_kernel_size": 16,
    "position_embedding_size": 2**16,
}


@dataclass
class VisionConfig:
    """The Gemma 4 vision tower (config.json's vision_config); defaults are transformers' Gemma4VisionConfig's."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    def __post_init__(self) -> None:
        for name, limit in VISION_LIMITS.items():
            int_in(f"vision_config.{name}", getattr(self, name), 1, limit)
        require(self.num_attention_heads % self.num_key_value_heads == 0,
                 "vision_config.num_attention_heads must be a multiple of num_key_value_heads")
        require(self.head_dim % 4 == 0, "vision_config.head_dim must be a multiple of 4 (2-D RoPE)")
        require(is_num(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1,
                 f"vision_config.rms_norm_eps must be a number in (0, 1), got {self.rms_norm_eps!r}")
        require(is_num(self.rope_theta) and self.rope_theta > 0,
                 f"vision_config rope_theta must be a number > 0, got {self.rope_theta!r}")
        for name in ("use_clipped_linears", "standardize"):
            require(isinstance(getattr(self, name), bool), f"vision_config.{name} must be true or false")

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> VisionConfig:
        require(isinstance(d, dict), f"{where}: vision_config must be an object")
        require(d.get("model_type", "gemma4_vision") == "gemma4_vision",
                 f"{where}: vision_config.model_type {d.get('model_type')!r:.40} is not supported (gemma4_vision)")
        require(d.get("hidden_activation", "gelu_pytorch_tanh") == "gelu_pytorch_tanh",
                 f"{where}: vision_config.hidden_activation must be gelu_pytorch_tanh")
        require(not d.get("attention_bias"), f"{where}: vision_config.attention_bias=true is not supported")
        try:
            rope = as_object(d.get("rope_parameters"), "vision_config.rope_parameters")
            require(rope.get("rope_type", "axial") == "axial",
                     f"vision_config.rope_parameters.rope_type {rope.get('rope_type')!r:.40} is not supported (axial)")
            require("output_proj_dims" not in d, "vision_config.output_proj_dims is not supported")
            kwargs = {k: d[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "head_dim", "rms_norm_eps", "patch_size",
                                        "pooling_kernel_size", "position_embedding_size", "use_clipped_linears",
                                        "standardize") if d.get(k) is not None}
            return cls(rope_theta=rope.get("rope_theta", 100.0), **kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
