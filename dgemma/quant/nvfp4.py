"""NVIDIA ModelOpt NVFP4 checkpoints (`quant_method: "modelopt"`, `quant_algo: "NVFP4"`), read and run as stored.

Each quantized linear map `W` (out, in) is stored as four tensors:

    weight          U8 (out, in / 2)     two E2M1 codes per byte, the even column in the low nibble
    weight_scale    F8_E4M3 (out, in / 16)   one scale per group of 16 weights along `in`
    weight_scale_2  F32 scalar           one scale for the whole matrix
    input_scale     F32 scalar           the activations' global scale, for a W4A4 kernel

and `W = e2m1 * (weight_scale * weight_scale_2)`, the bracket rounded to fp32 first, as ModelOpt's own
NVFP4QTensor.dequantize computes it (tests check it bit for bit against that code).

NVIDIA's DiffusionGemma release quantizes only the MoE experts, stored one expert at a time
(`layers.N.experts.E.{gate,up,down}_proj.*`); the rest (attention, dense MLP, router, self-conditioning, vision,
lm_head) is excluded and stays bf16. dgemma keeps each layer's experts fused and packed in memory (0.5625 bytes a
weight) and dequantizes a layer's experts to the compute dtype when the layer runs. Activations are not quantized:
the input scales are kept, but the compute is the dequantized weights' (neither H100/H200 nor a CPU has FP4 matmuls).
Other linear maps that a ModelOpt NVFP4 checkpoint does not exclude are read the same way (NVFP4Linear).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..model.moe import Experts
from .layout import (
    Layout,
    QuantError,
    candidates,
    expert_slots,
    fnmatch_any,
    selected,
    string_list,
)

FP8 = torch.float8_e4m3fn
GROUP = 16
QUANT_METHOD = "modelopt"
QUANT_ALGO = "NVFP4"
# code -> value; bit 3 is the sign. Code 8 (negative zero) decodes to +0, as ModelOpt's table does (bit-equal output)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_TABLES: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    if device not in _TABLES:
        _TABLES[device] = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return _TABLES[device]


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """U8 (..., C / 2) -> fp32 (..., C): the low nibble is the even column, the high nibble the odd one."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # (..., C / 2, 2)
    return _table(packed.device)[codes.long()].flatten(-2)  # (..., C)


def _dequantize(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, half = packed.shape[-2:]
    block = scale.float() * scale_2  # (..., R, C / 16), rounded to fp32 before it meets the codes (as ModelOpt)
    values = unpack_e2m1(packed).view(*packed.shape[:-2], rows, block.shape[-1], GROUP)  # (..., R, C / 16, 16)
    return (values * block[..., None]).view(*packed.shape[:-2], rows, 2 * half).to(dtype)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed U8 (..., R, C / 2), scale F8 (..., R, C / 16), scale_2 fp32 broadcastable to (..., R, 1) -> (..., R, C).

    A stack of matrices (the experts) is done one matrix at a time: the decode's temporaries (int64 codes, fp32
    values) are ~12 bytes a weight, which for a released layer's 128 experts at once would be ~9 GB."""
    if packed.dim() == 2:
        return _dequantize(packed, scale, scale_2, dtype)
    scale_2 = scale_2.expand(*packed.shape[:-2], *scale_2.shape[-2:])
    out = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=dtype, device=packed.device)
    for i in range(packed.shape[0]):
        out[i] = dequantize(packed[i], scale[i], scale_2[i], dtype)
    return out


_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between the E2M1 magnitudes 0, 0.5, ..., 4, 6


def quantize_matrix(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One matrix (R, C) -> packed U8 (R, C / 2), F8 group scales (R, C / 16), fp32 global scale: the global scale
    maps the largest weight to 6 x 448 (E2M1's and E4M3's largest), each group's scale its largest weight to 6,
    and each weight goes to the nearest E2M1 value. For random-weight benchmarks (`dgemma bench --quantize
    nvfp4`); a released checkpoint is read as stored."""
    rows, cols = w.shape
    groups = w.float().view(rows, cols // GROUP, GROUP)
    scale_2 = (groups.abs().amax() / (6.0 * 448.0)).clamp_min(torch.finfo(torch.float32).tiny)
    scale = (groups.abs().amax(-1) / 6.0 / scale_2).to(FP8)  # (R, C / 16)
    block = (scale.float() * scale_2)[..., None]  # as _dequantize rounds it
    x = groups / torch.where(block > 0, block, 1.0)
    mids = torch.tensor(_MIDPOINTS, device=w.device)
    codes = (torch.bucketize(x.abs(), mids) + 8 * (x < 0)).to(torch.uint8).view(rows, cols)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale, scale_2


def _empty(shape, dtype, device="meta") -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class NVFP4Linear(nn.Module):
    """A bias-free linear map stored as NVFP4 (packed codes, FP8 group scales, fp32 global scale)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        out, inp = linear.out_features, linear.in_features
        self.in_features, self.out_features = inp, out
        self.weight = _empty((out, inp // 2), torch.uint8)
        self.weight_scale = _empty((out, inp // GROUP), FP8)
        self.weight_scale_2 = _empty((), torch.float32)
        self.input_scale = _empty((), torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.weight_scale, self.weight_scale_2, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nvfp4 groups of {GROUP}"


class NVFP4Experts(Experts):
    """The MoE experts fused as dgemma computes them, each matrix NVFP4: gate_up_proj U8 (E, 2I, H / 2) with
    `_weight_scale` (E, 2I, H / 16) and per-expert `_weight_scale_2` / `_input_scale` (E, 2) (gate, up); down_proj
    U8 (E, H, I / 2) with (E, H, I / 16) and (E,). The routing and matmuls are Experts'; only `weights()` differs."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        e, two_i, h = experts.gate_up_proj.shape
        i = two_i // 2
        self.num_experts = e
        self.gate_up_proj = _empty((e, two_i, h // 2), torch.uint8)
        self.gate_up_proj_weight_scale = _empty((e, two_i, h // GROUP), FP8)
        self.gate_up_proj_weight_scale_2 = _empty((e, 2), torch.float32)
        self.gate_up_proj_input_scale = _empty((e, 2), torch.float32)
        self.down_proj = _empty((e, h, i // 2), torch.uint8)
        self.down_proj_weight_scale = _empty((e, h, i // GROUP), FP8)
        self.down_proj_weight_scale_2 = _empty((e,), torch.float32)
        self.down_proj_input_scale = _empty((e,), torch.float32)

    @classmethod
    @torch.no_grad()
    def quantize(cls, experts: Experts) -> NVFP4Experts:
        """Dense experts -> NVFP4, one matrix at a time (gate, up and down each with its own global scale), on
        the experts' device; input scales 1."""
        new = cls(experts)
        inter = experts.gate_up_proj.shape[1] // 2
        for name, t in new.named_parameters(recurse=False):
            setattr(new, name, nn.Parameter(torch.ones_like(t, device=experts.gate_up_proj.device),
                                            requires_grad=False))
        for e in range(new.num_experts):
            for half in range(2):
                rows = slice(half * inter, (half + 1) * inter)
                packed, scale, scale_2 = quantize_matrix(experts.gate_up_proj[e, rows])
                new.gate_up_proj[e, rows], new.gate_up_proj_weight_scale[e, rows] = packed, scale
                new.gate_up_proj_weight_scale_2[e, half] = scale_2
            packed, scale, scale_2 = quantize_matrix(experts.down_proj[e])
            new.down_proj[e], new.down_proj_weight_scale[e], new.down_proj_weight_scale_2[e] = packed, scale, scale_2
        return new

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inter = self.gate_up_proj.shape[1] // 2
        gate_up_2 = self.gate_up_proj_weight_scale_2.repeat_interleave(inter, dim=1)[..., None]  # (E, 2I, 1)
        return (dequantize(self.gate_up_proj, self.gate_up_proj_weight_scale, gate_up_2, dtype),
                dequantize(self.down_proj, self.down_proj_weight_scale, self.down_proj_weight_scale_2[:, None, None],
                           dtype))


SUFFIXES = {"weight": "", "weight_scale": "_weight_scale", "weight_scale_2": "_weight_scale_2",
            "input_scale": "_input_scale"}
SCALARS = {"weight_scale_2", "input_scale"}


def read_config(qc: dict, where: str) -> list[str]:
    """A ModelOpt quantization_config (config.json's, or hf_quant_config.json's "quantization") -> the exclude
    patterns. Anything but NVFP4 weights in groups of 16 is refused, naming the field."""
    algo = qc.get("quant_algo")
    if algo != QUANT_ALGO:
        raise QuantError(f"{where}: quantization_config.quant_algo {algo!r:.40} is not supported; dgemma reads "
                         f"ModelOpt checkpoints in {QUANT_ALGO!r}")
    sizes = [qc["group_size"]] if "group_size" in qc else []
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise QuantError(f"{where}: quantization_config.config_groups must be an object")
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict) or weights.get("num_bits") != 4 or weights.get("type") != "float":
            raise QuantError(f"{where}: quantization_config.config_groups.{name}.weights must be 4-bit float (NVFP4)")
        sizes.append(weights.get("group_size"))
    if any(s != GROUP for s in sizes):
        raise QuantError(f"{where}: quantization_config.group_size must be {GROUP} for NVFP4, got {sizes!r:.40}")
    exclude = qc.get("exclude_modules") if "exclude_modules" in qc else qc.get("ignore")
    return string_list(exclude, "exclude_modules" if "exclude_modules" in qc else "ignore", where)


def prepare(model: nn.Module, qc: dict, where: str, stored_dtype) -> Layout:
    """Swap every linear map and expert block the exclude list does not name for its NVFP4 form (on the meta
    model), and say how the checkpoint's tensors load into them."""
    excluded = fnmatch_any(read_config(qc, where))
    layout = Layout(config=qc)
    for prefix, parent, attr, module in candidates(model):
        if not selected(prefix, module, lambda n: not excluded(n), where, stored_dtype):
            continue
        if isinstance(module, Experts):
            new = NVFP4Experts(module)
            layout.slots.update(expert_slots(prefix.removesuffix("experts"), module, SUFFIXES, SCALARS))
        else:
            new = NVFP4Linear(module)
        cols = module.gate_up_proj.shape[-1] if isinstance(module, Experts) else module.in_features
        inter = module.down_proj.shape[-1] if isinstance(module, Experts) else cols
        if cols % GROUP or inter % GROUP:
            raise QuantError(f"{where}: {prefix} has {cols} input features, not a multiple of the NVFP4 group {GROUP}")
        setattr(parent, attr, new)
        for name, p in new.named_parameters():
            layout.exact[f"{prefix}.{name}"] = p.dtype
    if qc.get("kv_cache_quant_algo") or qc.get("kv_cache_scheme"):
        layout.notes.append("the checkpoint's KV-cache scales are not used; dgemma keeps the KV cache in the "
                            "compute dtype")
    return layout
