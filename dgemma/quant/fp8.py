"""Weight-only FP8 (E4M3) with one scale per block of weights, as a transform on a built model.

    config = quantize_model(model)            # the model's projections and experts now hold FP8 weights
    config = quantize_model(model, block=64)  # one scale per 64 x 64 block

The stored layout is the one transformers' fine-grained FP8 format reads (`quant_method: "fp8"` in config.json):
each quantized matrix `W` is saved as its FP8 values under the usual name plus an fp32 `<name>_scale_inv` with one
entry per block, and `W = fp8 * scale_inv` blockwise. The experts keep their fused 3-D layout (`gate_up_proj`,
`down_proj`, with 3-D scales). Embeddings (the tied head), the routers and norms stay in the model's dtype.

Compute stays in the model's dtype: each forward dequantizes the weights it uses (on a 2-core CPU this is fp32),
so FP8 halves the weights' memory against bf16 and quarters it against fp32 at the cost of that dequantization.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..model.moe import Experts
from ..errors import DgemmaError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BLOCK_SIZES = (128, 64, 32, 16)  # the automatic choice: the largest that divides every quantized matrix
QUANT_METHOD = "fp8"
NOT_CONVERTED = ["lm_head", "model.encoder.vision_tower", "model.encoder.embed_vision", "router.proj"]


class QuantError(DgemmaError, ValueError):
    """A model or checkpoint that cannot be quantized (or read) as asked; the message is one line."""


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    *lead, rows, cols = shape
    return (*lead, rows // block[0], cols // block[1])


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., R, C) -> FP8 values (..., R, C) and fp32 scales (..., R / br, C / bc), `w ~= fp8 * scale` blockwise.

    Each block's largest magnitude maps to the largest FP8 value, so nothing saturates."""
    *lead, rows, cols = w.shape
    br, bc = block
    if rows % br or cols % bc:
        raise QuantError(f"a {rows} x {cols} matrix does not split into {br} x {bc} blocks")
    x = w.detach().float().reshape(*lead, rows // br, br, cols // bc, bc)
    amax = x.abs().amax(dim=(-3, -1))  # (..., R / br, C / bc)
    if not torch.isfinite(amax).all():
        raise QuantError("the weights hold inf or NaN")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero block keeps scale 1
    q = (x / scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(w.shape), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 values (..., R, C) and scales (..., R / br, C / bc) -> (..., R, C) in `dtype`. The product is taken in fp32
    and rounded once, as transformers does when it dequantizes the same file (and bit for bit the same)."""
    *lead, rows, cols = q.shape
    sr, sc = scale.shape[-2:]
    s = scale.float()
    if q.device.type == "cpu" and s.abs().max() < 2.0**7:
        x, s = widen_e4m3(q), s * 2.0**120  # exact: a power of two, and no overflow below 2^7
    else:
        x = q.float()
    s = s.repeat_interleave(rows // sr, dim=-2)  # (..., R, C / bc): one scale per row of each block
    return x.view(*lead, rows, sc, cols // sc).mul_(s[..., None]).view(q.shape).to(dtype)


_SIGN_EXP_MANT = 0x87F0 - 0x10000  # as int16: the sign bit and the bits E4M3's exponent and mantissa land on


def widen_e4m3(q: torch.Tensor) -> torch.Tensor:
    """E4M3 -> fp32 times 2^-120, exactly, in a few vectorised integer ops (torch's own CPU conversion is a scalar
    loop, about 10x slower). Shifting the byte left by 4 into a bf16 puts E4M3's 4 exponent and 3 mantissa bits
    at the bottom of bf16's; the exponent bias differs by 127 - 7 = 120, and E4M3's subnormals land on bf16's
    subnormals with the same factor. The sign is sign-extended from int8 and kept by the mask. (E4M3 has no inf;
    its NaN, which a quantized weight never holds, would come out finite.)"""
    bits = q.view(torch.int8).to(torch.int16).mul_(16).bitwise_and_(_SIGN_EXP_MANT)
    return bits.view(torch.bfloat16).float()


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _quantized_pair(w: torch.Tensor, block: tuple[int, int]) -> tuple[nn.Parameter, nn.Parameter]:
    if w.is_meta:  # building the model to load a quantized checkpoint into
        return (_frozen(torch.empty(w.shape, dtype=FP8, device="meta")),
                _frozen(torch.empty(scale_shape(w.shape, block), dtype=torch.float32, device="meta")))
    q, s = quantize_blocks(w, block)
    return _frozen(q), _frozen(s)


class FP8Linear(nn.Module):
    """A bias-free linear layer whose weight is stored as FP8 blocks; dequantized to the input's dtype per call."""

    def __init__(self, linear: nn.Linear, block: tuple[int, int]):
        super().__init__()
        if linear.bias is not None:
            raise QuantError("FP8Linear is for the model's bias-free projections")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.weight_scale_inv = _quantized_pair(linear.weight, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_blocks(self.weight, self.weight_scale_inv, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 blocks {self.block}"

    @property
    def block(self) -> tuple[int, int]:
        return (self.out_features // self.weight_scale_inv.shape[0], self.in_features // self.weight_scale_inv.shape[1])


class FP8Experts(Experts):
    """The MoE experts with FP8 weights in the fused layout: gate_up_proj (E, 2I, H) and down_proj (E, H, I), each
    with a 3-D `*_scale_inv`. The routing and the matmuls are Experts'; only `weights()` differs."""

    def __init__(self, experts: Experts, block: tuple[int, int]):
        nn.Module.__init__(self)
        self.num_experts = experts.num_experts
        self.gate_up_proj, self.gate_up_proj_scale_inv = _quantized_pair(experts.gate_up_proj, block)
        self.down_proj, self.down_proj_scale_inv = _quantized_pair(experts.down_proj, block)

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize_blocks(self.gate_up_proj, self.gate_up_proj_scale_inv, dtype),
                dequantize_blocks(self.down_proj, self.down_proj_scale_inv, dtype))


def quantized_projections(model: nn.Module, experts: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every projection the transform quantizes, in model order."""
    out = []
    for layer in model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if getattr(attn, name) is not None:
                out.append((attn, name, getattr(attn, name)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            out.append((layer.mlp, name, getattr(layer.mlp, name)))
        if experts:
            out.append((layer, "experts", layer.experts))
    for name in ("gate_proj", "up_proj", "down_proj"):
        out.append((model.self_conditioning, name, getattr(model.self_conditioning, name)))
    return out


def weight_shapes(module: nn.Module) -> list[tuple[int, int]]:
    if isinstance(module, Experts):
        return [tuple(module.gate_up_proj.shape[-2:]), tuple(module.down_proj.shape[-2:])]
    return [tuple(module.weight.shape)]


def replace_targets(targets: list[tuple[nn.Module, str, nn.Module]], convert, progress: bool) -> None:
    """Set each target's attribute to convert(module), in model order, with a progress bar when asked (the one
    loop behind every weight format's transform)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(targets), desc="quantizing", unit="matrix", dynamic_ncols=True, mininterval=1.0)
    for parent, name, module in targets:
        setattr(parent, name, convert(module))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()


def pick_block(model: nn.Module, experts: bool = True) -> int:
    """The largest of BLOCK_SIZES that divides both sides of every matrix the transform would quantize."""
    shapes = [s for _, _, m in quantized_projections(model, experts) for s in weight_shapes(m)]
    for b in BLOCK_SIZES:
        if all(r % b == 0 and c % b == 0 for r, c in shapes):
            return b
    raise QuantError(f"no block size in {BLOCK_SIZES} divides every quantized matrix (shapes {sorted(set(shapes))})")


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization_config", None) is not None


def quantize_model(model: nn.Module, block: int | tuple[int, int] | None = None, experts: bool = True,
                   progress: bool = False) -> dict:
    """Replace the model's projections (and, with `experts`, the MoE experts) by FP8 versions, in place.

    Returns the `quantization_config` for config.json, which is also kept as `model.quantization_config`. A model on
    the meta device gets empty FP8 tensors of the right shapes, to load a quantized checkpoint into."""
    if is_quantized(model):
        raise QuantError("the model is already quantized")
    if block is None:
        block = pick_block(model, experts)
    block = (block, block) if isinstance(block, int) else tuple(block)
    if len(block) != 2 or min(block) < 1:
        raise QuantError(f"block size must be one or two positive integers, got {block}")
    targets = quantized_projections(model, experts)
    for _, _, module in targets:  # check every shape before changing anything
        for rows, cols in weight_shapes(module):
            if rows % block[0] or cols % block[1]:
                raise QuantError(f"a {rows} x {cols} weight does not split into {block[0]} x {block[1]} blocks; "
                                 f"pick a block size that divides it (or leave it out to choose one)")
    replace_targets(targets, lambda m: FP8Experts(m, block) if isinstance(m, Experts) else FP8Linear(m, block),
                    progress)
    config = {"quant_method": QUANT_METHOD, "activation_scheme": "dynamic", "weight_block_size": list(block),
              "modules_to_not_convert": NOT_CONVERTED + ([] if experts else ["experts"])}
    model.quantization_config = config
    return config


def read_config(qc: object, where: str) -> tuple[tuple[int, int], bool]:
    """A checkpoint's `quantization_config` -> (block, experts quantized?). Anything dgemma cannot run is an error."""
    if not isinstance(qc, dict):
        raise QuantError(f"{where}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise QuantError(f"{where}: quantization method {method!r} is not supported; dgemma reads block-wise FP8 "
                         f"weights (quant_method \"fp8\") and group-wise int4 (\"dgemma-int4\"), as "
                         f"`dgemma quantize` writes them")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise QuantError(f"{where}: FP8 activation scheme {qc.get('activation_scheme')!r} is not supported "
                         f"(dgemma quantizes weights only)")
    if qc.get("fmt", "e4m3") != "e4m3" or qc.get("scale_fmt") not in (None, "float32", "fp32"):
        raise QuantError(f"{where}: only E4M3 weights with fp32 scales are supported")
    block = qc.get("weight_block_size") or [128, 128]
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise QuantError(f"{where}: weight_block_size must be two positive integers, got {block!r:.80}")
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list):
        raise QuantError(f"{where}: modules_to_not_convert must be a list, got {skip!r:.80}")
    experts = not any(s == "experts" or str(s).endswith(".experts") for s in skip)
    return (block[0], block[1]), experts
