"""LoRA as a transform on a built model: wrap chosen nn.Linear modules, train only the adapters, merge to export.

    model = apply_lora(model, rank=8, alpha=16)   # every other parameter is frozen
    ... train ...
    merge_lora(model)                             # plain nn.Linear again, W += (alpha / r) * B @ A

The expert weights are 3-D parameters, not nn.Linear, so LoRA leaves the MoE experts alone (NeMo's recipe also
freezes the router; it is `proj`, which is not a default target).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T. B starts at zero, so the wrapped model computes what it did."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_B @ self.lora_A * self.scaling).to(self.base.weight.dtype)
        return self.base


def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if name in targets and isinstance(child, nn.Linear):
                found.append((parent, name, child))
    return found


def apply_lora(model: nn.Module, rank: int = 8, alpha: float | None = None,
               targets: tuple[str, ...] = DEFAULT_TARGETS) -> nn.Module:
    """Freeze `model` and wrap every nn.Linear whose attribute name is in `targets`. In place; returns `model`."""
    if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(2 * rank if alpha is None else alpha)
    for p in model.parameters():
        p.requires_grad_(False)
    found = _targets(model, tuple(targets))
    if not found:
        raise ValueError(f"no nn.Linear named any of {list(targets)} in the model")
    for parent, name, linear in found:
        setattr(parent, name, LoRALinear(linear, rank, alpha))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it. In place; returns `model` (all parameters frozen
    state is left as it was: the base weights keep requires_grad=False)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """PEFT-style adapter: adapter_model.safetensors with transformers' tensor names, and adapter_config.json."""
    from safetensors.torch import save_file

    from ..io.checkpoint import DECODER

    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, targets = {}, set()
    for name, m in modules.items():
        prefix = f"base_model.model.{DECODER}{name}"
        tensors[f"{prefix}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
        targets.add(name.rsplit(".", 1)[-1])
    any_module = next(iter(modules.values()))
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": any_module.rank, "lora_alpha": any_module.scaling * any_module.rank, "lora_dropout": 0.0,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
    }, indent=2))
    return out_dir
