"""The text stack's config (config.json's text_config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import ConfigError, as_number, as_object, int_in, is_int, is_num, require

SLIDING = "sliding_attention"
FULL = "full_attention"

# Upper bounds on sizes read from config.json: about ten times the released model's, yet small enough that a hostile
# value fails here, not in a multi-terabyte allocation or a loop of 10^9 layers.
TEXT_LIMITS = {
    "vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**20, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096, "global_head_dim": 4096,
    "num_global_key_value_heads": 1024, "sliding_window": 2**24, "num_experts": 4096, "top_k_experts": 4096,
    "moe_intermediate_size": 2**20, "max_position_embeddings": 2**24,
}

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
        for key, value in as_object(d["per_layer_config"], "text_config.per_layer_config").items():
            name = f"text_config.per_layer_config[{key!r}]"
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: keys must be layer indices") from None
            require(0 <= index < len(layer_types), f"{name}: layer index out of range [0, {len(layer_types)})")
            layer = dict(as_object(value, name))
            skip = layer.pop("skip", [])
            require(isinstance(skip, list) and not skip, f"{name}.skip: skipping sublayers is not supported")
            # transformers drops an override equal to the base value; any other field this model reads from the
            # base config alone, so an override of it cannot be applied as written
            unused = sorted(k for k, v in layer.items() if k not in PER_LAYER_FIELDS and not (k in d and d[k] == v))
            require(not unused, f"{name} overrides {', '.join(map(str, unused))}: only "
                                 f"{' and '.join(PER_LAYER_FIELDS)} can differ per layer")
            overrides[index] = layer
    resolved: dict[str, tuple] = {}
    for i, layer_type in enumerate(layer_types):
        if not isinstance(layer_type, str):
            continue  # TextConfig refuses it
        layer = overrides.get(i, {})
        dims = (layer.get("head_dim", head_dim), layer.get("num_key_value_heads", kv))
        require(resolved.setdefault(layer_type, dims) == dims,
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
            int_in(f"text_config.{name}", getattr(self, name), 1, limit)
        if not self.layer_types:
            # Released pattern: five sliding layers, then one full layer.
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        if is_int(self.eos_token_id):
            self.eos_token_id = [self.eos_token_id]
        require(isinstance(self.layer_types, list) and all(isinstance(t, str) for t in self.layer_types),
                 f"text_config.layer_types must be a list of strings, got {self.layer_types!r:.80}")
        require(len(self.layer_types) == self.num_hidden_layers,
                 f"text_config.layer_types has {len(self.layer_types)} entries, expected num_hidden_layers="
                 f"{self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        require(not bad, f"text_config.layer_types has unknown types {bad}")
        require(self.layer_types[-1] == FULL, "text_config.layer_types: the last layer must be full_attention")
        require(self.top_k_experts <= self.num_experts,
                 f"text_config.top_k_experts={self.top_k_experts} exceeds num_experts={self.num_experts}")
        for heads_name in ("num_key_value_heads", "num_global_key_value_heads"):
            heads = getattr(self, heads_name)
            require(self.num_attention_heads % heads == 0,
                     f"text_config.num_attention_heads={self.num_attention_heads} is not a multiple of "
                     f"{heads_name}={heads}")
        require(self.head_dim % 2 == 0 and self.global_head_dim % 2 == 0, "text_config: head dims must be even")
        require(is_num(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1,
                 f"text_config.rms_norm_eps must be a number in (0, 1), got {self.rms_norm_eps!r}")
        for name in ("sliding_rope_theta", "full_rope_theta"):
            require(is_num(getattr(self, name)) and getattr(self, name) > 0,
                     f"text_config {name.split('_')[0]}_attention rope_theta must be a number > 0, "
                     f"got {getattr(self, name)!r}")
        require(is_num(self.full_partial_rotary_factor) and 0.0 < self.full_partial_rotary_factor <= 1.0,
                 f"full_attention partial_rotary_factor must be in (0, 1], got {self.full_partial_rotary_factor!r}")
        require(self.final_logit_softcapping is None
                 or (is_num(self.final_logit_softcapping) and self.final_logit_softcapping > 0),
                 f"text_config.final_logit_softcapping must be null or a number > 0, "
                 f"got {self.final_logit_softcapping!r}")
        require(is_num(self.initializer_range) and self.initializer_range >= 0,
                 f"text_config.initializer_range must be a number >= 0, got {self.initializer_range!r}")
        require(self.hidden_activation == "gelu_pytorch_tanh",
                 f"text_config.hidden_activation={self.hidden_activation!r} is not supported (gelu_pytorch_tanh)")
        top = self.vocab_size - 1
        int_in("text_config.pad_token_id", self.pad_token_id, 0, top)
        int_in("text_config.bos_token_id", self.bos_token_id, 0, top)
        require(isinstance(self.eos_token_id, list) and self.eos_token_id
                 and all(is_int(t) and 0 <= t <= top for t in self.eos_token_id),
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
        require(isinstance(d, dict), f"{where}: text_config must be an object")
        if d.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{where}: use_bidirectional_attention='all' (bidirectional encoder) is not supported")
        layer_types = d.get("layer_types") or []
        require(isinstance(layer_types, list), f"{where}: text_config.layer_types must be a list")
        n_layers = d.get("num_hidden_layers", 30)
        if not layer_types and is_int(n_layers) and 0 < n_layers <= TEXT_LIMITS["num_hidden_layers"]:
            layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
        head_dim = d.get("head_dim", 256)
        kv = d.get("num_key_value_heads", 4)
        try:
            per_layer = resolve_per_layer_config(d, layer_types, head_dim, kv)
            rope = as_object(d.get("rope_parameters"), "text_config.rope_parameters")
            sliding_rope = as_object(rope.get(SLIDING), f"text_config.rope_parameters.{SLIDING}")
            full_rope = as_object(rope.get(FULL), f"text_config.rope_parameters.{FULL}")
            factor = as_number(full_rope.get("factor", 1.0), f"text_config.rope_parameters.{FULL}.factor")
            sliding_theta = as_number(sliding_rope.get("rope_theta", 10_000.0),
                                    f"text_config.rope_parameters.{SLIDING}.rope_theta")
            full_theta = as_number(full_rope.get("rope_theta", 1_000_000.0),
                                 f"text_config.rope_parameters.{FULL}.rope_theta")
            partial = as_number(full_rope.get("partial_rotary_factor", 0.25),
                              f"text_config.rope_parameters.{FULL}.partial_rotary_factor")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        (head_dim, kv), (global_head_dim, global_kv) = per_layer.get(SLIDING, (head_dim, kv)), per_layer[FULL]
        require(sliding_rope.get("rope_type", "default") == "default",
                 f"{where}: sliding_attention rope_type {sliding_rope.get('rope_type')!r} is not supported")
        require(full_rope.get("rope_type", "proportional") == "proportional",
                 f"{where}: full_attention rope_type {full_rope.get('rope_type')!r} is not supported")
        require(factor == 1.0, f"{where}: rope 'factor' other than 1.0 is not supported")
        require(not d.get("attention_bias", False), f"{where}: attention_bias=true is not supported")
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
