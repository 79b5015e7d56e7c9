"""compressed-tensors FP8 checkpoints (`quant_method: "compressed-tensors"`, format `float-quantized`), as
llm-compressor's FP8_DYNAMIC scheme writes them (the community FP8-dynamic DiffusionGemma releases).

Each quantized linear map `W` (out, in) is stored as

    weight        F8_E4M3 (out, in)
    weight_scale  (out, 1), in the dtype the model was quantized in (bf16 for the releases)

and `W = fp8 * weight_scale`, computed in the scale's dtype as compressed-tensors' own `dequantize` does (tests check
it bit for bit against that code). The releases quantize the attention and dense-MLP projections and each expert on
its own (`layers.N.experts.E.{gate,up,down}_proj.*`); the `ignore` list (lm_head, embeddings, routers,
self-conditioning, vision) stays as stored.

dgemma keeps the FP8 values (1 byte a weight) and dequantizes a matrix, or a layer's fused experts, when it runs.
The scheme's dynamic per-token FP8 activations are not applied: the compute takes the dequantized weights in the
compute dtype. Any other compressed-tensors scheme is refused with the field that differs.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from ..model.moe import Experts
from .fp8 import widen_e4m3
from .layout import (
    DECODER,
    Layout,
    QuantError,
    candidates,
    ct_match,
    expert_slots,
    selected,
    string_list,
)

FP8 = torch.float8_e4m3fn
QUANT_METHOD = "compressed-tensors"
FORMAT = "float-quantized"
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 (..., R, C) times scale (..., R, 1), rounded once to the scale's dtype (the FP8 value times a bf16/fp16
    scale is exact in fp32, so this is the scale-dtype product compressed-tensors takes), then cast to `dtype`.
    A stack of matrices (the experts) is done one matrix at a time, to keep the fp32 temporaries to one matrix."""
    if q.dim() > 2:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        for i in range(q.shape[0]):
            out[i] = dequantize(q[i], scale[i], dtype)
        return out
    s = scale.float()
    if q.device.type == "cpu" and bool(s.abs().max() < 2.0**7):
        x, s = widen_e4m3(q), s * 2.0**120  # exact: E4M3 -> fp32 * 2^-120 in a few integer ops (fp8.py)
    else:
        x = q.float()
    return (x * s).to(scale.dtype).to(dtype)


def _empty(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


class ChannelFP8Linear(nn.Module):
    """A bias-free linear map stored as FP8 values with one scale per output channel."""

    def __init__(self, linear: nn.Linear, scale_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = _empty((self.out_features, self.in_features), FP8)
        self.weight_scale = _empty((self.out_features, 1), scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 per output channel"


class ChannelFP8Experts(Experts):
    """The fused experts with FP8 values and per-output-channel scales: gate_up_proj (E, 2I, H) with
    `gate_up_proj_weight_scale` (E, 2I, 1), down_proj (E, H, I) with (E, H, 1)."""

    def __init__(self, experts: Experts, scale_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.num_experts = experts.num_experts
        e, two_i, h = experts.gate_up_proj.shape
        self.gate_up_proj = _empty((e, two_i, h), FP8)
        self.gate_up_proj_weight_scale = _empty((e, two_i, 1), scale_dtype)
        self.down_proj = _empty((e, h, two_i // 2), FP8)
        self.down_proj_weight_scale = _empty((e, h, 1), scale_dtype)

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize(self.gate_up_proj, self.gate_up_proj_weight_scale, dtype),
                dequantize(self.down_proj, self.down_proj_weight_scale, dtype))


SUFFIXES = {"weight": "", "weight_scale": "_weight_scale"}

# the FP8_DYNAMIC scheme, field by field (None: the field may be absent or null); anything else is refused
_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
            "group_size": None, "block_structure": None, "actorder": None}
_ACTIVATIONS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
                "group_size": None, "block_structure": None}


_DEFAULTS = {"symmetric": True, "dynamic": False}  # compressed-tensors' QuantizationArgs defaults


def _check_args(args: dict, want: dict, key: str, where: str) -> None:
    if not isinstance(args, dict):
        raise QuantError(f"{where}: quantization_config.{key} must be an object")
    for field, value in want.items():
        got = args.get(field, _DEFAULTS.get(field))
        if got != value:
            raise QuantError(f"{where}: quantization_config.{key}.{field} is {got!r:.40}; dgemma reads compressed-"
                             f"tensors FP8 with {field} {value!r} (the FP8_DYNAMIC scheme) and no other")


def read_config(qc: dict, where: str) -> tuple[list[str], list[str]]:
    """A compressed-tensors quantization_config -> (targets, ignore), refusing every scheme but FP8_DYNAMIC's."""
    if (qc.get("format") or FORMAT) != FORMAT:
        raise QuantError(f"{where}: quantization_config.format {qc.get('format')!r:.40} is not supported; dgemma "
                         f"reads compressed-tensors {FORMAT!r} FP8")
    if (qc.get("quantization_status") or "compressed") != "compressed":
        raise QuantError(f"{where}: quantization_config.quantization_status {qc.get('quantization_status')!r:.40} "
                         f"is not supported; dgemma reads compressed (stored-quantized) checkpoints")
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise QuantError(f"{where}: quantization_config.{key} is not supported by dgemma")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantError(f"{where}: quantization_config.config_groups must be a non-empty object")
    targets: list[str] = []
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise QuantError(f"{where}: quantization_config.config_groups.{name} must be an object")
        key = f"config_groups.{name}"
        if (group.get("format") or FORMAT) != FORMAT:
            raise QuantError(f"{where}: quantization_config.{key}.format {group.get('format')!r:.40} is not "
                             f"supported; dgemma reads {FORMAT!r}")
        _check_args(group.get("weights"), _WEIGHTS, f"{key}.weights", where)
        if group.get("input_activations") is not None:
            _check_args(group["input_activations"], _ACTIVATIONS, f"{key}.input_activations", where)
        if group.get("output_activations") is not None:
            raise QuantError(f"{where}: quantization_config.{key}.output_activations is not supported by dgemma")
        targets += string_list(group.get("targets"), f"{key}.targets", where)
    ignore = string_list(qc.get("ignore"), "ignore", where)
    for pattern in targets + ignore:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise QuantError(f"{where}: quantization_config pattern {pattern!r:.60} is not a regex ({e})") from None
    return targets, ignore


def prepare(model: nn.Module, qc: dict, where: str, stored_dtype) -> Layout:
    """Swap every linear map and expert block the config's targets pick (and its ignore list spares) for its FP8
    form on the meta model. `stored_dtype(hf name)` gives a tensor's dtype in the files (or None): the scales load
    in the dtype they were written in, which is also the dtype the dequantized product is rounded to."""
    targets, ignore = read_config(qc, where)
    is_target, is_ignored = ct_match(targets), ct_match(ignore)
    layout = Layout(config=qc)
    picked = [(prefix, parent, attr, module) for prefix, parent, attr, module in candidates(model)
              if selected(prefix, module, lambda n: is_target(n) and not is_ignored(n), where, stored_dtype)]
    if not picked:
        return layout
    prefix, _, _, module = picked[0]
    first = DECODER + (f"{prefix}.0.gate_proj" if isinstance(module, Experts) else prefix) + ".weight_scale"
    scale_dtype = stored_dtype(first)
    if scale_dtype is None:
        raise QuantError(f"{where}: quantization_config quantizes {first.removesuffix('.weight_scale')}, but the "
                         f"checkpoint has no tensor {first}")
    if scale_dtype not in SCALE_DTYPES:
        raise QuantError(f"{where}: tensor {first} is {scale_dtype}; FP8 scales must be bf16, fp16 or fp32")
    for prefix, parent, attr, module in picked:
        if isinstance(module, Experts):
            new = ChannelFP8Experts(module, scale_dtype)
            layout.slots.update(expert_slots(prefix.removesuffix("experts"), module, SUFFIXES, set()))
        else:
            new = ChannelFP8Linear(module, scale_dtype)
        setattr(parent, attr, new)
        for name, p in new.named_parameters():
            layout.exact[f"{prefix}.{name}"] = p.dtype
    if qc.get("kv_cache_scheme"):
        layout.notes.append("the checkpoint's KV-cache scheme is not applied; dgemma keeps the KV cache in the "
                            "compute dtype")
    return layout
