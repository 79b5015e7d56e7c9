"""Sampler and loop settings (generation_config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checks import ConfigError, int_in, is_int, is_num, read_json, require
from .text import TextConfig

# generation_config.json is bounded like a request's fields (engine/request.py SamplingParams).
MAX_DENOISING_STEPS = 1024
MAX_FILE_TEMPERATURE = 100.0
# A request's temperature (at most 2) scales a file's t_min/t_max, so the dataclass holds up to twice the file bound.
MAX_TEMPERATURE = 2 * MAX_FILE_TEMPERATURE
MAX_NEW_TOKENS = 2**24  # the largest max_position_embeddings
# The keys transformers' DiffusionGemmaGenerationConfig accepts (it raises on any other), and its one sampler.
GENERATION_KEYS = frozenset({
    "max_new_tokens", "max_length", "return_dict_in_generate", "max_denoising_steps", "sampler_config", "t_min",
    "t_max", "stability_threshold", "confidence_threshold", "cache_implementation", "cache_config",
    "disable_compile", "bos_token_id", "pad_token_id", "eos_token_id", "_commit_hash", "_from_model_config",
    "transformers_version",
})
SAMPLER = "EntropyBoundSamplerConfig"
# The Gemma 4 vocabulary, and the EOS ids the release's generation_config.json names in it: <eos>, <turn|> (end of
# a chat turn) and <|tool_response> (a tool call waits for its answer).
GEMMA4_VOCAB_SIZE = 262_144
GEMMA4_EOS = [1, 106, 50]


def first_eos(ids, eos) -> int | None:
    """Where an output ends: the index of the first token of `ids` in `eos` (None: no EOS). What follows it is
    padding, never output."""
    return next((i for i, t in enumerate(ids) if t in eos), None)


def fallback_eos(text: TextConfig) -> tuple[list[int], str]:
    """The EOS ids for a checkpoint whose generation_config.json names none, and where they come from: the
    release's on the Gemma 4 vocabulary (its config.json's eos alone would run past the end of a chat turn), else
    config.json's text_config.eos_token_id."""
    if text.vocab_size == GEMMA4_VOCAB_SIZE:
        return sorted(set(GEMMA4_EOS) | set(text.eos_token_id)), "the Gemma 4 release's EOS ids"
    return list(text.eos_token_id), "config.json's eos_token_id"


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
    eos_token_id: list[int] = field(default_factory=lambda: [1])  # []: never stop at EOS (`generate --no-eos`)
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if is_int(self.eos_token_id):
            self.eos_token_id = [self.eos_token_id]
        if self.max_new_tokens is not None:
            int_in("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        int_in("max_denoising_steps", self.max_denoising_steps, 1, MAX_DENOISING_STEPS)
        require(is_num(self.entropy_bound) and self.entropy_bound > 0,
                 f"entropy_bound must be a number > 0, got {self.entropy_bound!r}")
        for name in ("t_min", "t_max"):
            value = getattr(self, name)
            require(is_num(value) and 0 <= value <= MAX_TEMPERATURE,
                     f"{name} must be a number in [0, {MAX_TEMPERATURE:g}], got {value!r}")
        require(self.t_max > self.t_min, f"t_max must be greater than t_min, got t_max={self.t_max} t_min={self.t_min}")
        int_in("stability_threshold", self.stability_threshold, 0, MAX_DENOISING_STEPS)
        require(is_num(self.confidence_threshold) and self.confidence_threshold > 0,
                 f"confidence_threshold must be a number > 0, got {self.confidence_threshold!r}")
        require(isinstance(self.eos_token_id, list) and all(is_int(t) and t >= 0 for t in self.eos_token_id),
                 f"eos_token_id must be a token id or a list of them, got {self.eos_token_id!r:.80}")
        require(is_int(self.pad_token_id) and self.pad_token_id >= 0,
                 f"pad_token_id must be a token id, got {self.pad_token_id!r:.80}")

    def temperature(self, steps_remaining: int) -> float:
        """Linear schedule: t_max at the first step, falling toward t_min; `steps_remaining` runs N..1."""
        return self.t_min + (self.t_max - self.t_min) * (steps_remaining / self.max_denoising_steps)

    def replace(self, **overrides) -> GenerationConfig:
        d = asdict(self)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationConfig(**d)

    @classmethod
    def from_hf(cls, d: dict, text: TextConfig | None = None,
                where: str = "generation_config.json") -> GenerationConfig:
        """The file's settings over the released defaults. A missing eos_token_id or pad_token_id falls back to
        `text`'s (checkpoint loading goes through `load`, which says which EOS rule applies).

        1. Keys transformers' DiffusionGemmaGenerationConfig does not know are refused, as transformers refuses
           them ("Unexpected kwargs"), and so is a sampler other than the entropy-bound one.
        2. max_new_tokens and max_length are checked but not applied: the release's file caps output at 256 tokens,
           which `serve` ignores as vLLM does; generate and chat ignore it too, so all three run until EOS or the
           context limit unless asked for a cap.
        """
        require(isinstance(d, dict), f"{where}: expected a JSON object")
        unknown = sorted(str(k) for k in d if k not in GENERATION_KEYS)
        require(not unknown, f"{where}: unknown keys {', '.join(unknown)} (transformers' DiffusionGemma generation "
                              f"config refuses them too)")
        kwargs: dict = {}
        for key in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold"):
            if d.get(key) is not None:
                kwargs[key] = d[key]
        sampler = d.get("sampler_config")
        if sampler is not None:
            require(isinstance(sampler, dict), f"{where}: sampler_config must be an object")
            name = sampler.get("_cls_name", SAMPLER)
            require(name == SAMPLER, f"{where}: sampler_config._cls_name {name!r:.80} is not implemented "
                                      f"(dgemma implements {SAMPLER})")
            extra = sorted(str(k) for k in sampler if k not in ("_cls_name", "entropy_bound"))
            require(not extra, f"{where}: sampler_config has unknown keys {', '.join(extra)}")
            if sampler.get("entropy_bound") is not None:
                kwargs["entropy_bound"] = sampler["entropy_bound"]
        require(d.get("eos_token_id") != [], f"{where}: eos_token_id is an empty list; name at least one token")
        eos = d.get("eos_token_id", text.eos_token_id if text else None)
        if eos is not None:
            kwargs["eos_token_id"] = eos
        pad = d.get("pad_token_id", text.pad_token_id if text else None)
        if pad is not None:
            kwargs["pad_token_id"] = pad
        for key in ("max_new_tokens", "max_length"):
            if d.get(key) is not None:
                int_in(f"{where}: {key}", d[key], 1, MAX_NEW_TOKENS)
        try:
            for name in ("t_min", "t_max"):  # a file is bounded like a request; a request's temperature scales it
                if name in kwargs:
                    require(is_num(kwargs[name]) and 0 <= kwargs[name] <= MAX_FILE_TEMPERATURE,
                             f"{name} must be a number in [0, {MAX_FILE_TEMPERATURE:g}], got {kwargs[name]!r}")
            gen = cls(**kwargs)
            if text is not None:
                top = text.vocab_size - 1
                require(all(t <= top for t in gen.eos_token_id),
                         f"eos_token_id {gen.eos_token_id} is outside the vocabulary [0, {top}]")
                require(gen.pad_token_id <= top,
                        f"pad_token_id {gen.pad_token_id} is outside the vocabulary [0, {top}]")
            return gen
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path, text: TextConfig) -> tuple[GenerationConfig, str | None]:
        """A checkpoint's generation_config.json, and a one-line notice when the file names no EOS.

        save_pretrained of a model built from a config writes a file without eos_token_id (or none at all), and
        transformers then never stops at EOS. dgemma stops at `fallback_eos(text)` instead, and says so; `generate
        --no-eos` gives transformers' tokens, and an eos_token_id written into the file sets the rule."""
        path = Path(path)
        d = read_json(path) if path.is_file() else {}
        gen = cls.from_hf(d, text, str(path))
        if d.get("eos_token_id") is not None:
            return gen, None
        eos, source = fallback_eos(text)
        where = f"{path.name} has no eos_token_id" if path.is_file() else f"no {path.name}"
        notice = (f"{where}: stopping at {source} {eos}, where transformers would not stop (generate --no-eos "
                  f"matches it; an eos_token_id in {path.name} sets the rule)")
        return gen.replace(eos_token_id=eos), notice

    def to_hf(self) -> dict:
        return {
            "max_denoising_steps": self.max_denoising_steps,
            "sampler_config": {"entropy_bound": float(self.entropy_bound), "_cls_name": SAMPLER},
            "t_min": float(self.t_min),
            "t_max": float(self.t_max),
            "stability_threshold": self.stability_threshold,
            "confidence_threshold": float(self.confidence_threshold),
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id) or None,
            "pad_token_id": self.pad_token_id,
            "return_dict_in_generate": True,
        }
