"""The training run's settings (TrainConfig) and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config.checks import ConfigError
from .objective import LossConfig


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1.5e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.99)
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 100
    seed: int = 0
    enc_on_prompt: bool = False  # encoder loss on the prompt too (NeMo) or the response only (Megatron)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "log_every", "eval_every", "save_every"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ConfigError(f"warmup-steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a number > 0, got {self.lr}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in (0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ConfigError("weight_decay must be >= 0 and grad_clip > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be in [0, 1), got {self.betas}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine from 1 down to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
