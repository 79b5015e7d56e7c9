"""What a quantized checkpoint's tensors look like to the loader, whatever the format.

A format module (fp8, nvfp4, compressed) swaps the meta model's projections and experts for quantized modules and
returns a Layout. The loader then needs to know two things the plain model does not say:

- **how each quantized tensor is stored**: `exact` parameters must be stored in exactly their dtype and load as they
  are (packed FP4 codes, FP8 values, FP8 group scales, the scales' own dtype);
- **where a per-expert tensor goes**: the released quantized checkpoints store each expert's gate/up/down projection
  on its own (`layers.N.experts.E.gate_proj.weight`), while dgemma keeps the experts fused (`gate_up_proj` (E, 2I, H),
  `down_proj` (E, H, I)). `slots` maps each per-expert name to (fused parameter, index), and the loader copies the
  tensor straight into that slice of the fused parameter, so nothing but the fused tensors is ever held.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.moe import Experts
from .fp8 import (
    QuantError,  # one error class for every format (io/checkpoint.py turns it into a CheckpointError)
)

DECODER = "model.decoder."  # the transformers module prefixes that matching patterns (exclude lists) are written for
ENCODER = "model.encoder.language_model."  # the encoder's layers are the decoder's (tied): a pattern may name either


@dataclass
class Layout:
    config: dict  # the quantization_config the checkpoint declared (kept on the model as model.quantization_config)
    exact: dict[str, torch.dtype] = field(default_factory=dict)  # parameter -> the dtype it must be stored in
    slots: dict[str, tuple[str, tuple]] = field(default_factory=dict)  # per-expert tensor -> (fused param, index)
    notes: list[str] = field(default_factory=list)  # what the loader prints (unless quiet) about this checkpoint


# the per-expert projections and where they sit in the fused tensors: gate is rows [0, I) of gate_up, up is [I, 2I)
_EXPERT_PROJECTIONS = (("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1), ("down_proj", "down_proj", None))


def expert_slots(prefix: str, experts: Experts, suffixes: dict[str, str], scalars: set[str]) -> dict[str, tuple]:
    """Slots for one layer's experts. `suffixes` maps a per-expert tensor suffix (`weight`, `weight_scale`) to the
    fused parameter's suffix (`""`, `_weight_scale`); a suffix in `scalars` is one number per projection, stored
    in the fused parameter as (E, 2) for gate/up and (E,) for down."""
    inter = experts.gate_up_proj.shape[1] // 2
    out = {}
    for e in range(experts.num_experts):
        for proj, fused, half in _EXPERT_PROJECTIONS:
            for hf_suffix, ours in suffixes.items():
                if half is None:
                    index: tuple = (e,)
                elif hf_suffix in scalars:
                    index = (e, half)
                else:
                    index = (e, slice(half * inter, (half + 1) * inter))
                out[f"{prefix}experts.{e}.{proj}.{hf_suffix}"] = (f"{prefix}experts.{fused}{ours}", index)
    return out


def candidates(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(our prefix, parent, attribute, module) for every linear map a checkpoint format may have quantized: the
    attention and MLP projections, the router, the self-conditioning MLP, and each layer's experts (as one entry)."""
    out = []
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if getattr(attn, name) is not None:
                out.append((f"layers.{i}.self_attn.{name}", attn, name, getattr(attn, name)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            out.append((f"layers.{i}.mlp.{name}", layer.mlp, name, getattr(layer.mlp, name)))
        out.append((f"layers.{i}.router.proj", layer.router, "proj", layer.router.proj))
        out.append((f"layers.{i}.experts", layer, "experts", layer.experts))
    for name in ("gate_proj", "up_proj", "down_proj"):
        out.append((f"self_conditioning.{name}", model.self_conditioning, name, getattr(model.self_conditioning, name)))
    return out


def expert_module_names(prefix: str, experts: Experts) -> list[str]:
    """The transformers module names of one layer's per-expert projections, as exclude/ignore lists name them."""
    return [f"{DECODER}{prefix}.{e}.{proj}" for e in range(experts.num_experts) for proj, _, _ in _EXPERT_PROJECTIONS]


def selected(prefix: str, module: nn.Module, chosen, where: str, stored_dtype) -> bool:
    """Whether a candidate is quantized, given `chosen(transformers module name) -> bool`. A layer's experts are one
    fused tensor in dgemma, so a checkpoint must quantize all of a layer's experts or none of them. Experts stored
    fused (`experts.gate_up_proj`) are plain weights whatever the config's targets say: the quantizers match
    per-expert `Linear`s, and tools that meet transformers' fused 3-D experts leave them as they are."""
    def both(name: str) -> bool:  # a module shared by encoder and decoder is quantized unless either name is spared
        return chosen(name) and (not name.startswith(DECODER) or chosen(ENCODER + name[len(DECODER):]))

    if not isinstance(module, Experts):
        return both(DECODER + prefix)
    if stored_dtype(f"{DECODER}{prefix}.gate_up_proj") is not None:
        return False
    names = expert_module_names(prefix, module)
    picks = {both(n) for n in names}
    if len(picks) > 1:
        raise QuantError(f"{where}: quantization_config quantizes some of {DECODER}{prefix}'s experts but not others; "
                         f"dgemma needs all of a layer's experts in one format")
    return picks.pop()


def fnmatch_any(patterns: list[str]):
    """ModelOpt's exclude_modules: shell-style wildcards matched against the whole module name."""
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def ct_match(targets: list[str]):
    """compressed-tensors' matching: `re:<regex>` is re.match against the module name, anything else is the exact
    module name or a class name (every map dgemma can quantize is a `Linear`)."""
    regexes = [re.compile(t[3:]) for t in targets if t.startswith("re:")]
    plain = {t for t in targets if not t.startswith("re:")}
    return lambda name: "Linear" in plain or name in plain or any(r.match(name) for r in regexes)


def string_list(value, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QuantError(f"{where}: quantization_config.{key} must be a list of strings, got {value!r:.80}")
    return value
