"""Model and generation configs: small dataclasses that read the released HF files and validate."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DgemmaError

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(DgemmaError, ValueError):
    """A config file or value that dgemma cannot use. The message names the file and the field."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_in(name: str, value, lo: int, hi: int) -> None:
    _require(_is_int(value) and lo <= value <= hi, f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _object(value, name: str) -> dict:
    """A JSON object, or {} for a missing (null) one."""
    if value is None:
        return {}
    _require(isinstance(value, dict), f"{name} must be an object, got {type(value).__name__}")
    return value


def _number(value, name: str) -> float:
    _require(_is_num(value), f"{name} must be a finite number, got {value!r}")
    return float(value)


# Upper bounds on sizes read from config.json: about ten times the released model's, yet small enough that a hostile
# value fails here, not in a multi-terabyte allocation or a loop of 10^9 layers.
TEXT_LIMITS = {
    "vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**20, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096, "global_head_dim": 4096,
    "num_global_key_value_heads": 1024, "sliding_window": 2**24, "num_experts": 4096, "top_k_experts": 4096,
    "moe_intermediate_size": 2**20, "max_position_embeddings": 2**24,
}
MAX_CANVAS_LENGTH = 8192
IMAGE_TOKEN_DEFAULTS = {"boi_token_id": 255_999, "eoi_token_id": 258_882, "image_token_id": 258_880}
# generation_config.json is bounded like a request's fields (engine/request.py SamplingParams).
MAX_DENOISING_STEPS = 1024
MAX_FILE_TEMPERATURE = 100.0
# A request's temperature (at most 2) scales a file's t_min/t_max, so the dataclass holds up to twice the file bound.
MAX_TEMPERATURE = 2 * MAX_FILE_TEMPERATURE
MAX_NEW_TOKENS = 2**24  # the largest max_position_embeddings
MAX_JSON_BYTES = 64 * 2**20  # configs and shard indexes are kilobytes
# The keys transformers' DiffusionGemmaGenerationConfig accepts (it raises on any other), and its one sampler.
GENERATION_KEYS = frozenset({
    "max_new_tokens", "max_length", "return_dict_in_generate", "max_denoising_steps", "sampler_config", "t_min",
    "t_max", "stability_threshold", "confidence_threshold", "cache_implementation", "cache_config",
    "disable_compile", "bos_token_id", "pad_token_id", "eos_token_id", "_commit_hash", "_from_model_config",
    "transformers_version",
})
SAMPLER = "EntropyBoundSamplerConfig"


# Per-layer attributes the model reads: each attention layer's head size and KV heads (RoPE also reads head_dim).
PER_LAYER_FIELDS = ("head_dim", "num_key_value_heads")


def resolve_per_layer_config(d: dict, layer_types: list, head_dim, kv) -> dict[str, tuple]:
    """-> {layer type: (head_dim, num_key_value_heads)} as transformers resolves text_config `d`.

    1. Without a `per_layer_config` key, transformers builds one: every full-attention layer gets `global_head_dim`
       (default 512) and, when `num_global_key_value_heads` is set, that many KV heads.
    2. With one (as save_pretrained writes it), `global_head_dim` and `num_global_key_value_heads` are ignored.
       It is sparse: keys are layer indices ("0", "05" or 5), each value holds only the fields that differ from
       the base config, and `{}` (or null) means every layer uses the base `head_dim` and `num_key_value_heads`.
    3. All layers of one type must resolve alike (transformers' RoPE needs one head size per type, or it fails).
    """
    if "per_layer_config" not in d:
        global_kv = d.get("num_global_key_value_heads")
        full = {"head_dim": d.get("global_head_dim", 512)}
        if global_kv is not None:
            full["num_key_value_heads"] = global_kv
        overrides = {i: full for i, t in enumerate(layer_types) if t == FULL}
    else:
        overrides = {}
        for key, value in _object(d["per_layer_config"], "text_config.per_layer_config").items():
            name = f"text_config.per_layer_config[{key!r}]"
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: keys must be layer indices") from None
            _require(0 <= index < len(layer_types), f"{name}: layer index out of range [0, {len(layer_types)})")
            layer = dict(_object(value, name))
            skip = layer.pop("skip", [])
            _require(isinstance(skip, list) and not skip, f"{name}.skip: skipping sublayers is not supported")
            # transformers drops an override equal to the base value; any other field this model reads from the
            # base config alone, so an override of it cannot be applied as written
            unused = sorted(k for k, v in layer.items() if k not in PER_LAYER_FIELDS and not (k in d and d[k] == v))
            _require(not unused, f"{name} overrides {', '.join(map(str, unused))}: only "
                                 f"{' and '.join(PER_LAYER_FIELDS)} can differ per layer")
            overrides[index] = layer
    resolved: dict[str, tuple] = {}
    for i, layer_type in enumerate(layer_types):
        if not isinstance(layer_type, str):
            continue  # TextConfig refuses it
        layer = overrides.get(i, {})
        dims = (layer.get("head_dim", head_dim), layer.get("num_key_value_heads", kv))
        _require(resolved.setdefault(layer_type, dims) == dims,
                 f"text_config.per_layer_config: {layer_type} layers differ in (head_dim, num_key_value_heads), "
                 f"{resolved.get(layer_type)} vs {dims} at layer {i}; one value per layer type is supported")
    resolved.setdefault(FULL, (head_dim, kv))
    return resolved


@dataclass
class TextConfig:
    """The shared Gemma-4 text stack (encoder and decoder use the same weights)."""

    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int = 2
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    layer_types: list[str] = field(default_factory=list)
    sliding_rope_theta: float = 10_000.0
    full_rope_theta: float = 1_000_000.0
    full_partial_rotary_factor: float = 0.25
    final_logit_softcapping: float | None = 30.0
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    max_position_embeddings: int = 262_144
    pad_token_id: int = 0
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    bos_token_id: int = 2
    initializer_range: float = 0.02
    # use_bidirectional_attention "vision": the encoder lets an image's soft tokens see each other (the release)
    bidirectional_vision: bool = False

    def __post_init__(self) -> None:
        # sizes first: layer_types is built from num_hidden_layers
        for name, limit in TEXT_LIMITS.items():
            _int_in(f"text_config.{name}", getattr(self, name), 1, limit)
        if not self.layer_types:
            # Released pattern: five sliding layers, then one full layer.
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        if _is_int(self.eos_token_id):
            self.eos_token_id = [self.eos_token_id]
        _require(isinstance(self.layer_types, list) and all(isinstance(t, str) for t in self.layer_types),
                 f"text_config.layer_types must be a list of strings, got {self.layer_types!r:.80}")
        _require(len(self.layer_types) == self.num_hidden_layers,
                 f"text_config.layer_types has {len(self.layer_types)} entries, expected num_hidden_layers="
                 f"{self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        _require(not bad, f"text_config.layer_types has unknown types {bad}")
        _require(self.layer_types[-1] == FULL, "text_config.layer_types: the last layer must be full_attention")
        _require(self.top_k_experts <= self.num_experts,
                 f"text_config.top_k_experts={self.top_k_experts} exceeds num_experts={self.num_experts}")
        for heads_name in ("num_key_value_heads", "num_global_key_value_heads"):
            heads = getattr(self, heads_name)
            _require(self.num_attention_heads % heads == 0,
                     f"text_config.num_attention_heads={self.num_attention_heads} is not a multiple of "
                     f"{heads_name}={heads}")
        _require(self.head_dim % 2 == 0 and self.global_head_dim % 2 == 0, "text_config: head dims must be even")
        _require(_is_num(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1,
                 f"text_config.rms_norm_eps must be a number in (0, 1), got {self.rms_norm_eps!r}")
        for name in ("sliding_rope_theta", "full_rope_theta"):
            _require(_is_num(getattr(self, name)) and getattr(self, name) > 0,
                     f"text_config {name.split('_')[0]}_attention rope_theta must be a number > 0, "
                     f"got {getattr(self, name)!r}")
        _require(_is_num(self.full_partial_rotary_factor) and 0.0 < self.full_partial_rotary_factor <= 1.0,
                 f"full_attention partial_rotary_factor must be in (0, 1], got {self.full_partial_rotary_factor!r}")
        _require(self.final_logit_softcapping is None
                 or (_is_num(self.final_logit_softcapping) and self.final_logit_softcapping > 0),
                 f"text_config.final_logit_softcapping must be null or a number > 0, "
                 f"got {self.final_logit_softcapping!r}")
        _require(_is_num(self.initializer_range) and self.initializer_range >= 0,
                 f"text_config.initializer_range must be a number >= 0, got {self.initializer_range!r}")
        _require(self.hidden_activation == "gelu_pytorch_tanh",
                 f"text_config.hidden_activation={self.hidden_activation!r} is not supported (gelu_pytorch_tanh)")
        top = self.vocab_size - 1
        _int_in("text_config.pad_token_id", self.pad_token_id, 0, top)
        _int_in("text_config.bos_token_id", self.bos_token_id, 0, top)
        _require(isinstance(self.eos_token_id, list) and self.eos_token_id
                 and all(_is_int(t) and 0 <= t <= top for t in self.eos_token_id),
                 f"text_config.eos_token_id must be a token id or a non-empty list of them in [0, {top}], "
                 f"got {self.eos_token_id!r:.80}")

    def is_sliding(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == SLIDING

    def layer_head_dim(self, layer_idx: int) -> int:
        return self.head_dim if self.is_sliding(layer_idx) else self.global_head_dim

    def layer_kv_heads(self, layer_idx: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer_idx) else self.num_global_key_value_heads

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count of the text stack (embedding counted once; it is tied to the head)."""
        h, n = self.hidden_size, 0
        for i in range(self.num_hidden_layers):
            hd, kv = self.layer_head_dim(i), self.layer_kv_heads(i)
            attn = h * self.num_attention_heads * hd * 2 + h * kv * hd * (2 if self.is_sliding(i) else 1)
            mlp = 3 * h * self.intermediate_size
            experts = self.top_k_experts if active else self.num_experts
            moe = experts * 3 * h * self.moe_intermediate_size + h * self.num_experts
            n += attn + mlp + moe
        return n + self.vocab_size * h + 3 * h * self.intermediate_size

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> TextConfig:
        _require(isinstance(d, dict), f"{where}: text_config must be an object")
        if d.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{where}: use_bidirectional_attention='all' (bidirectional encoder) is not supported")
        layer_types = d.get("layer_types") or []
        _require(isinstance(layer_types, list), f"{where}: text_config.layer_types must be a list")
        n_layers = d.get("num_hidden_layers", 30)
        if not layer_types and _is_int(n_layers) and 0 < n_layers <= TEXT_LIMITS["num_hidden_layers"]:
            layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
        head_dim = d.get("head_dim", 256)
        kv = d.get("num_key_value_heads", 4)
        try:
            per_layer = resolve_per_layer_config(d, layer_types, head_dim, kv)
            rope = _object(d.get("rope_parameters"), "text_config.rope_parameters")
            sliding_rope = _object(rope.get(SLIDING), f"text_config.rope_parameters.{SLIDING}")
            full_rope = _object(rope.get(FULL), f"text_config.rope_parameters.{FULL}")
            factor = _number(full_rope.get("factor", 1.0), f"text_config.rope_parameters.{FULL}.factor")
            sliding_theta = _number(sliding_rope.get("rope_theta", 10_000.0),
                                    f"text_config.rope_parameters.{SLIDING}.rope_theta")
            full_theta = _number(full_rope.get("rope_theta", 1_000_000.0),
                                 f"text_config.rope_parameters.{FULL}.rope_theta")
            partial = _number(full_rope.get("partial_rotary_factor", 0.25),
                              f"text_config.rope_parameters.{FULL}.partial_rotary_factor")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        (head_dim, kv), (global_head_dim, global_kv) = per_layer.get(SLIDING, (head_dim, kv)), per_layer[FULL]
        _require(sliding_rope.get("rope_type", "default") == "default",
                 f"{where}: sliding_attention rope_type {sliding_rope.get('rope_type')!r} is not supported")
        _require(full_rope.get("rope_type", "proportional") == "proportional",
                 f"{where}: full_attention rope_type {full_rope.get('rope_type')!r} is not supported")
        _require(factor == 1.0, f"{where}: rope 'factor' other than 1.0 is not supported")
        _require(not d.get("attention_bias", False), f"{where}: attention_bias=true is not supported")
        try:
            return cls(
                vocab_size=d.get("vocab_size", 262_144),
                hidden_size=d.get("hidden_size", 2304),
                intermediate_size=d.get("intermediate_size", 9216),
                num_hidden_layers=n_layers,
                num_attention_heads=d.get("num_attention_heads", 8),
                num_key_value_heads=kv,
                head_dim=head_dim,
                global_head_dim=global_head_dim,
                num_global_key_value_heads=global_kv,
                hidden_activation=d.get("hidden_activation", "gelu_pytorch_tanh"),
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                sliding_window=d.get("sliding_window", 512),
                layer_types=list(layer_types),
                sliding_rope_theta=sliding_theta,
                full_rope_theta=full_theta,
                full_partial_rotary_factor=partial,
                final_logit_softcapping=d.get("final_logit_softcapping", 30.0),
                num_experts=d.get("num_experts") or 0,
                top_k_experts=d.get("top_k_experts") or 0,
                moe_intermediate_size=d.get("moe_intermediate_size") or 0,
                max_position_embeddings=d.get("max_position_embeddings", 131_072),
                pad_token_id=d.get("pad_token_id", 0) if d.get("pad_token_id") is not None else 0,
                eos_token_id=d.get("eos_token_id", 1) if d.get("eos_token_id") is not None else [1],
                bos_token_id=d.get("bos_token_id", 2) if d.get("bos_token_id") is not None else 2,
                initializer_range=d.get("initializer_range", 0.02),
                bidirectional_vision=d.get("use_bidirectional_attention") == "vision",
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:  # a value of the wrong JSON type
            raise ConfigError(f"{where}: bad text_config value ({e})") from None

    def to_hf(self) -> dict:
        full_layers = [i for i, t in enumerate(self.layer_types) if t == FULL]
        return {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "per_layer_config": {
                str(i): {"head_dim": self.global_head_dim, "num_key_value_heads": self.num_global_key_value_heads}
                for i in full_layers
            },
            "hidden_activation": self.hidden_activation,
            "rms_norm_eps": self.rms_norm_eps,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.sliding_rope_theta},
                FULL: {"rope_type": "proportional", "rope_theta": self.full_rope_theta,
                       "partial_rotary_factor": self.full_partial_rotary_factor},
            },
            "final_logit_softcapping": self.final_logit_softcapping,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "bos_token_id": self.bos_token_id,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_bidirectional_attention": "vision" if self.bidirectional_vision else None,
            "initializer_range": self.initializer_range,
        }


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
            _int_in(f"vision_config.{name}", getattr(self, name), 1, limit)
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 "vision_config.num_attention_heads must be a multiple of num_key_value_heads")
        _require(self.head_dim % 4 == 0, "vision_config.head_dim must be a multiple of 4 (2-D RoPE)")
        _require(_is_num(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1,
                 f"vision_config.rms_norm_eps must be a number in (0, 1), got {self.rms_norm_eps!r}")
        _require(_is_num(self.rope_theta) and self.rope_theta > 0,
                 f"vision_config rope_theta must be a number > 0, got {self.rope_theta!r}")
        for name in ("use_clipped_linears", "standardize"):
            _require(isinstance(getattr(self, name), bool), f"vision_config.{name} must be true or false")

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> VisionConfig:
        _require(isinstance(d, dict), f"{where}: vision_config must be an object")
        _require(d.get("model_type", "gemma4_vision") == "gemma4_vision",
                 f"{where}: vision_config.model_type {d.get('model_type')!r:.40} is not supported (gemma4_vision)")
        _require(d.get("hidden_activation", "gelu_pytorch_tanh") == "gelu_pytorch_tanh",
                 f"{where}: vision_config.hidden_activation must be gelu_pytorch_tanh")
        _require(not d.get("attention_bias"), f"{where}: vision_config.attention_bias=true is not supported")
        try:
            rope = _object(d.get("rope_parameters"), "vision_config.rope_parameters")
            _require(rope.get("rope_type", "axial") == "axial",
                     f"vision_config.rope_parameters.rope_type {rope.get('rope_type')!r:.40} is not supported (axial)")
            _require("output_proj_dims" not in d, "vision_config.output_proj_dims is not supported")
            kwargs = {k: d[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "head_dim", "rms_norm_eps", "patch_size",
                                        "pooling_kernel_size", "position_embedding_size", "use_clipped_linears",
                                        "standardize") if d.get(k) is not None}
            return cls(rope_theta=rope.get("rope_theta", 100.0), **kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


@dataclass
class ModelConfig:
    """The whole checkpoint config: the text stack plus the canvas length."""

    text: TextConfig
    canvas_length: int = 256
    extra: dict = field(default_factory=dict)  # top-level fields kept verbatim so a save round-trips
    vision: VisionConfig | None = None  # None: no vision tower (text only)

    def __post_init__(self) -> None:
        _int_in("canvas_length", self.canvas_length, 1, MAX_CANVAS_LENGTH)

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json", vision: bool = True) -> ModelConfig:
        """vision=False: the vision_config is not read (a text-only load runs whatever tower the file describes)."""
        _require(isinstance(d, dict), f"{where}: expected a JSON object")
        model_type = d.get("model_type")
        _require(model_type == "diffusion_gemma",
                 f"{where}: model_type is {model_type!r}, expected 'diffusion_gemma'")
        _require("text_config" in d, f"{where}: missing text_config")
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
        _require(_is_int(value) and 0 <= value < self.text.vocab_size,
                 f"config.json: {name} must be a token id in [0, {self.text.vocab_size}), got {value!r:.40}")
        return value

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
        d.update({"model_type": "diffusion_gemma", "canvas_length": self.canvas_length, "text_config": self.text.to_hf()})
        return d


@dataclass
class GenerationConfig:
    """Sampler and loop settings; defaults are the released ones, overridden by generation_config.json."""

    max_new_tokens: int | None = None  # None: until EOS or the context limit
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if _is_int(self.eos_token_id):
            self.eos_token_id = [self.eos_token_id]
        if self.max_new_tokens is not None:
            _int_in("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        _int_in("max_denoising_steps", self.max_denoising_steps, 1, MAX_DENOISING_STEPS)
        _require(_is_num(self.entropy_bound) and self.entropy_bound > 0,
                 f"entropy_bound must be a number > 0, got {self.entropy_bound!r}")
        for name in ("t_min", "t_max"):
            value = getattr(self, name)
            _require(_is_num(value) and 0 <= value <= MAX_TEMPERATURE,
                     f"{name} must be a number in [0, {MAX_TEMPERATURE:g}], got {value!r}")
        _require(self.t_max > self.t_min, f"t_max must be greater than t_min, got t_max={self.t_max} t_min={self.t_min}")
        _int_in("stability_threshold", self.stability_threshold, 0, MAX_DENOISING_STEPS)
        _require(_is_num(self.confidence_threshold) and self.confidence_threshold > 0,
                 f"confidence_threshold must be a number > 0, got {self.confidence_threshold!r}")
        _require(isinstance(self.eos_token_id, list) and self.eos_token_id
                 and all(_is_int(t) and t >= 0 for t in self.eos_token_id),
                 f"eos_token_id must be a token id or a non-empty list of them, got {self.eos_token_id!r:.80}")
        _require(_is_int(self.pad_token_id) and self.pad_token_id >= 0,
                 f"pad_token_id must be a token id, got {self.pad_token_id!r:.80}")

    def temperature(self, steps_remaining: int) -> float:
        """Linear schedule: t_max at the first step, falling toward t_min; `steps_remaining` runs N..1."""
        return self.t_min + (self.t_max - self.t_min) * (steps_remaining / self.max_denoising_steps)

    def replace(self, **overrides) -> GenerationConfig:
        d = asdict(self)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationConfig(**d)

    @classmethod
    def from_hf(cls, d: dict, text: TextConfig | None = None, where: str = "generation_config.json") -> GenerationConfig:
        """The file's settings over the released defaults. A missing eos_token_id or pad_token_id falls back to
        `text`'s (checkpoint loading goes through `load`, which refuses a file without eos_token_id).

        1. Keys transformers' DiffusionGemmaGenerationConfig does not know are refused, as transformers refuses
           them ("Unexpected kwargs"), and so is a sampler other than the entropy-bound one.
        2. max_new_tokens and max_length are checked but not applied: the release's file caps output at 256 tokens,
           which `serve` ignores as vLLM does; generate and chat ignore it too, so all three run until EOS or the
           context limit unless asked for a cap.
        """
        _require(isinstance(d, dict), f"{where}: expected a JSON object")
        unknown = sorted(str(k) for k in d if k not in GENERATION_KEYS)
        _require(not unknown, f"{where}: unknown keys {', '.join(unknown)} (transformers' DiffusionGemma generation "
                              f"config refuses them too)")
        kwargs: dict = {}
        for key in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold"):
            if d.get(key) is not None:
                kwargs[key] = d[key]
        sampler = d.get("sampler_config")
        if sampler is not None:
            _require(isinstance(sampler, dict), f"{where}: sampler_config must be an object")
            name = sampler.get("_cls_name", SAMPLER)
            _require(name == SAMPLER, f"{where}: sampler_config._cls_name {name!r:.80} is not implemented "
                                      f"(dgemma implements {SAMPLER})")
            extra = sorted(str(k) for k in sampler if k not in ("_cls_name", "entropy_bound"))
            _require(not extra, f"{where}: sampler_config has unknown keys {', '.join(extra)}")
            if sampler.get("entropy_bound") is not None:
                kwargs["entropy_bound"] = sampler["entropy_bound"]
        eos = d.get("eos_token_id", text.eos_token_id if text else None)
        if eos is not None:
            kwargs["eos_token_id"] = eos
        pad = d.get("pad_token_id", text.pad_token_id if text else None)
        if pad is not None:
            kwargs["pad_token_id"] = pad
        for key in ("max_new_tokens", "max_length"):
            if d.get(key) is not None:
                _int_in(f"{where}: {key}", d[key], 1, MAX_NEW_TOKENS)
        try:
            for name in ("t_min", "t_max"):  # a file is bounded like a request; a request's temperature scales it
                if name in kwargs:
                    _require(_is_num(kwargs[name]) and 0 <= kwargs[name] <= MAX_FILE_TEMPERATURE,
                             f"{name} must be a number in [0, {MAX_FILE_TEMPERATURE:g}], got {kwargs[name]!r}")
            gen = cls(**kwargs)
            if text is not None:
                top = text.vocab_size - 1
                _require(all(t <= top for t in gen.eos_token_id),
                         f"eos_token_id {gen.eos_token_id} is outside the vocabulary [0, {top}]")
                _require(gen.pad_token_id <= top, f"pad_token_id {gen.pad_token_id} is outside the vocabulary [0, {top}]")
            return gen
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path, text: TextConfig) -> GenerationConfig:
        """A checkpoint's generation_config.json. Without eos_token_id transformers never stops at EOS (it does not
        fall back to config.json's); rather than differ from it silently, such a file is refused."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: file not found; without it transformers never stops this model at EOS. "
                              f"Write one with \"eos_token_id\": {text.eos_token_id} (config.json's)")
        d = read_json(path)
        gen = cls.from_hf(d, text, str(path))  # bad values first: they are reported whatever else is missing
        if d.get("eos_token_id") is None:
            raise ConfigError(f"{path}: no eos_token_id, so transformers would never stop this model at EOS; add "
                              f"\"eos_token_id\": {text.eos_token_id} (config.json's) to stop there")
        return gen

    def to_hf(self) -> dict:
        return {
            "max_denoising_steps": self.max_denoising_steps,
            "sampler_config": {"entropy_bound": float(self.entropy_bound), "_cls_name": SAMPLER},
            "t_min": float(self.t_min),
            "t_max": float(self.t_max),
            "stability_threshold": self.stability_threshold,
            "confidence_threshold": float(self.confidence_threshold),
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "return_dict_in_generate": True,
        }


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a config file "
                          f"(at most {MAX_JSON_BYTES // 2**20} MiB)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a config file (JSON nested too deeply)") from None
