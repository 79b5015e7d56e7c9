"""Weight-only 4-bit integers with one scale and zero per group of weights, as a transform on a built model.

    config = quantize_model(model)                 # projections and experts now run on packed int4 weights
    config = quantize_model(model, group_size=32)  # one scale and zero per 32 weights along the input dimension

The matmuls are torch's own int4 kernels (the "tinygemm" kernels: `_weight_int4pack_mm_for_cpu` on a CPU,
`_weight_int4pack_mm` on CUDA), which read the packed weights directly; see DESIGN.md beside this file for why these
and not torchao. A weight is `(q - 8) * scale + zero` for its 4-bit code q in 0..15, scale and zero per group.

The stored layout (config.json `quant_method: "dgemma-int4"`) is plain and the same for every device: each quantized
matrix `W` (N, K) is saved as uint8 (N, K/2) under the usual name, two codes per byte with the even column in the low
nibble, plus bf16 `<name>_scale` and `<name>_zero` (N, K/group). (The kernels' packed layouts differ between CUDA
and CPU builds, so they are made when the weights arrive on their device, and unmade when saving.) The experts keep
their stacked 3-D layout: `gate_up_proj` (E, 2I, H/2), `down_proj` (E, H, I/2), with 3-D scales and zeros.
Embeddings (the tied head, which self-conditioning also reads), the routers and norms stay in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.layers import gelu_tanh
from ..model.moe import Experts
from .fp8 import QuantError, is_quantized, quantized_projections, replace_targets, weight_shapes

QUANT_METHOD = "dgemma-int4"
GROUP_SIZES = (128, 64, 32)  # the automatic choice: the largest that divides every quantized matrix's input side
KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what the kernels accept
ROW_MULTIPLE = 16  # the CPU packer needs output sides divisible by 16 (CUDA by 8)
SCALE_DTYPE = torch.bfloat16  # scales and zeros as stored and as the kernels read them
KERNEL_DTYPE = torch.bfloat16  # the activations' dtype in the int4 matmuls (see int4_mm)
NOT_CONVERTED = ["lm_head", "embed_tokens", "router", "model.encoder.vision_tower", "model.encoder.embed_vision"]
_SAVED_AS_IS = ("_scale", "_zero")  # suffixes of the stored scales and zeros (after ".weight" or "_proj")


# -- the arithmetic ----------------------------------------------------------------------------------------------

def quantize_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (..., N, K) -> codes uint8 (..., N, K) in 0..15, scale and zero bf16 (..., N, K / group_size), with
    `w ~= (code - 8) * scale + zero` per group (asymmetric: each group's min and max are both representable up to
    the bf16 rounding of scale and zero). The codes are computed from the rounded scale and zero."""
    *lead, n, k = w.shape
    if k % group_size:
        raise QuantError(f"a {n} x {k} matrix does not split into groups of {group_size} along its input side")
    x = w.detach().float().reshape(*lead, n, k // group_size, group_size)
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)  # (..., N, K / g)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise QuantError("the weights hold inf or NaN")
    scale = ((hi - lo) / 15).to(SCALE_DTYPE)
    zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)  # the value of code 8
    s, z = scale.float()[..., None], zero.float()[..., None]
    safe = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: every code gives `zero`
    codes = torch.round((x - z) / safe + 8).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(w.shape), scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference arithmetic, for tests and for the size report's checks; the model never calls it."""
    *lead, n, k = codes.shape
    g = k // scale.shape[-1]
    x = codes.float().reshape(*lead, n, k // g, g) - 8
    return (x * scale.float()[..., None] + zero.float()[..., None]).reshape(codes.shape).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) codes 0..15 -> (..., K/2) uint8, the even column in the low nibble (the stored layout)."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) uint8 -> (..., K) codes 0..15 (uint8)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


# -- the kernels -------------------------------------------------------------------------------------------------

def _inner_k_tiles(k: int) -> int:
    for t in (8, 4, 2):
        if k % (t * 16) == 0:
            return t
    raise QuantError(f"an input side of {k} is not a multiple of 32, which the int4 kernels need")


def kernel_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) 0..15 on their device -> the packed weight that device's int4 matmul reads."""
    k = codes.shape[-1]
    if codes.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(),
                                                                   _inner_k_tiles(k))
    if codes.device.type == "cuda":
        c = codes.to(torch.uint8)
        high_first = ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()  # the CUDA packer reads the even column high
        return torch.ops.aten._convert_weight_to_int4pack(high_first, _inner_k_tiles(k))
    raise QuantError(f"int4 weights run on a CPU or a CUDA GPU, not on {codes.device.type}")


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale, zero (N, K/g) -> (K/g, N, 2) in `dtype`, the layout the kernels read."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).to(dtype).contiguous()


def check_device(packed: torch.Tensor, x: torch.Tensor) -> None:
    """The packed layouts differ between devices (CPU: uint8, CUDA: int32 tiles), so an int4 model moved with .to()
    after packing cannot run; say so rather than let the kernel fail on a layout it does not know."""
    packed_for = "cuda" if packed.dtype == torch.int32 else "cpu"
    if x.device.type != packed_for or packed.device != x.device:
        raise QuantError(f"int4 weights packed for {packed_for} got input on {x.device}; int4 models do not move "
                         f"between devices: load (or quantize) them on the device they run on")


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ W.T -> (M, N) in x's dtype, W the packed int4 weight; the kernel dequantizes inside its tiles.

    The kernels take bf16 activations: CUDA's takes nothing else, and the CPU one is vectorised for bf16 only (on
    fp32 or fp16 inputs it runs a scalar loop, 60-90x slower: 0.2-0.3 GFLOP/s against 21-66 on one AVX512 core).
    So x is rounded to bf16 (8 significant bits; the products are summed in fp32 and the result rounded to bf16),
    which adds about 2^-9 of relative error beside the 4-bit weights' few percent."""
    xb = x.to(KERNEL_DTYPE).contiguous()  # CUDA's kernel needs a row-major A (a bf16 input is not copied by .to)
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, sz)
    else:
        y = torch.ops.aten._weight_int4pack_mm(xb, packed, group_size, sz)
    return y.to(x.dtype)


def kernel_unpack(packed: torch.Tensor, n: int, k: int, group_size: int,
                  dtype: torch.dtype = KERNEL_DTYPE) -> torch.Tensor:
    """The codes (N, K) uint8 back from a kernel-packed weight, read through the kernel itself: with scale 1 and
    zero 0 the weight is `code - 8`, and the identity times it gives those integers exactly (a sum of one nonzero
    term). Used when saving, so the stored layout never depends on how this machine's kernel packs."""
    sz = torch.zeros(k // group_size, n, 2, dtype=dtype, device=packed.device)
    sz[..., 0] = 1
    rows = []
    for start in range(0, k, 1024):  # (rows, N) at a time: a slice of the identity
        stop = min(start + 1024, k)
        eye = torch.zeros(stop - start, k, dtype=dtype, device=packed.device)
        eye[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=packed.device)
        rows.append(int4_mm(eye, packed, group_size, sz))  # (rows, N) = W[:, start:stop].T
    return (torch.cat(rows).t() + 8).round().to(torch.uint8)


# -- the modules -------------------------------------------------------------------------------------------------

class _Packed:
    """One int4 matrix (or a stack of them) as its device's kernel wants it: packed codes and (K/g, N, 2) scales."""

    @staticmethod
    def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """codes (..., N, K), scale/zero (..., N, K/g) on the target device -> (packed, sz), stacked like codes."""
        if codes.ndim == 2:
            return kernel_pack(codes), scales_and_zeros(scale, zero, KERNEL_DTYPE)
        pairs = [_Packed.from_codes(c, s, z) for c, s, z in zip(codes, scale, zero)]
        return torch.stack([p for p, _ in pairs]), torch.stack([s for _, s in pairs])


def _check_shapes(name: str, n: int, k: int, group_size: int) -> None:
    if n % ROW_MULTIPLE or k % group_size or k % 32:
        raise QuantError(f"{name}: a {n} x {k} weight does not fit the int4 kernels with group size {group_size} "
                         f"(output side a multiple of {ROW_MULTIPLE}, input side a multiple of the group size "
                         f"and of 32)")


class Int4Linear(nn.Module):
    """A bias-free linear layer whose weight is int4 codes in the kernel's packed layout, with a scale and a zero
    per group of `group_size` input weights. Saved and loaded in the plain layout (module docstring)."""

    def __init__(self, out_features: int, in_features: int, group_size: int):
        super().__init__()
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        # filled by quantize() or by loading a state dict; not in the state dict as they are (device-specific)
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("scale_zero", None, persistent=False)

    @classmethod
    def quantize(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        if linear.bias is not None:
            raise QuantError("Int4Linear is for the model's bias-free projections")
        new = cls(linear.out_features, linear.in_features, group_size)
        w = linear.weight
        if not w.is_meta:
            codes, scale, zero = quantize_groups(w, group_size)
            new.packed, new.scale_zero = _Packed.from_codes(codes, scale, zero)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        check_device(self.packed, x)
        y = int4_mm(x.reshape(-1, self.in_features), self.packed, self.group_size, self.scale_zero)  # (M, N)
        return y.view(*lead, self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        n, k, g = self.out_features, self.in_features, self.group_size
        if self.packed is None or self.packed.is_meta:  # shapes only (checkpoint.load's expected tensors)
            destination[prefix + "weight"] = torch.empty(n, k // 2, dtype=torch.uint8, device="meta")
            destination[prefix + "weight_scale"] = torch.empty(n, k // g, dtype=SCALE_DTYPE, device="meta")
            destination[prefix + "weight_zero"] = torch.empty(n, k // g, dtype=SCALE_DTYPE, device="meta")
            return
        codes = kernel_unpack(self.packed, n, k, g)
        destination[prefix + "weight"] = pack_nibbles(codes)
        destination[prefix + "weight_scale"] = self.scale_zero[..., 0].t().to(SCALE_DTYPE)
        destination[prefix + "weight_zero"] = self.scale_zero[..., 1].t().to(SCALE_DTYPE)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = [prefix + s for s in ("weight", "weight_scale", "weight_zero")]
        if not all(n in state_dict for n in names):
            missing_keys.extend(n for n in names if n not in state_dict)
            return
        packed, scale, zero = (state_dict[n] for n in names)
        n, k, g = self.out_features, self.in_features, self.group_size
        if (tuple(packed.shape) != (n, k // 2) or packed.dtype != torch.uint8
                or tuple(scale.shape) != (n, k // g) or tuple(zero.shape) != (n, k // g)):
            error_msgs.append(f"{prefix}weight: int4 tensors of the wrong shape or dtype")
            return
        self.packed, self.scale_zero = _Packed.from_codes(unpack_nibbles(packed), scale, zero)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"


class Int4Experts(Experts):
    """The MoE experts with int4 weights, one packed matrix per expert stacked along dim 0: gate_up (E, 2I, H) and
    down (E, H, I) as codes, each expert's tokens through the int4 kernel. The routing is Experts'."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, group_size: int):
        nn.Module.__init__(self)
        self.num_experts, self.hidden, self.intermediate, self.group_size = num_experts, hidden, intermediate, group_size
        for name in ("gate_up_packed", "gate_up_sz", "down_packed", "down_sz"):
            self.register_buffer(name, None, persistent=False)

    @classmethod
    def quantize(cls, experts: Experts, group_size: int) -> Int4Experts:
        e, two_i, h = experts.gate_up_proj.shape
        new = cls(e, h, two_i // 2, group_size)
        if not experts.gate_up_proj.is_meta:
            for which, w in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
                packed = sz = None
                for i, w_e in enumerate(w):  # one expert at a time: the fp32 temporaries stay one expert's size
                    p, s = _Packed.from_codes(*quantize_groups(w_e, group_size))
                    if packed is None:  # written in place: no list of pieces beside a stacked copy
                        packed = p.new_empty((e, *p.shape))
                        sz = s.new_empty((e, *s.shape))
                    packed[i], sz[i] = p, s
                setattr(new, which + "_packed", packed)
                setattr(new, which + "_sz", sz)
        return new

    def _shapes(self) -> dict[str, tuple[int, int]]:
        return {"gate_up": (2 * self.intermediate, self.hidden), "down": (self.hidden, self.intermediate)}

    def weights(self, dtype: torch.dtype):
        raise QuantError("int4 experts compute on packed weights; they have no dense weights to return")

    def expert_mlps(self, x_sorted: torch.Tensor, flat_expert: torch.Tensor) -> torch.Tensor:
        """One int4 matmul per projection per expert that has tokens. The group ends are read on the host (one sync
        per layer): torch has no grouped int4 kernel."""
        check_device(self.gate_up_packed, x_sorted)
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        g, outputs, start = self.group_size, [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            gate, up = int4_mm(x_sorted[start:start + n], self.gate_up_packed[e], g, self.gate_up_sz[e]).chunk(2, -1)
            outputs.append(int4_mm(gelu_tanh(gate) * up, self.down_packed[e], g, self.down_sz[e]))
            start += n
        return torch.cat(outputs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        g, e = self.group_size, self.num_experts
        for which, (n, k) in self._shapes().items():
            name = prefix + which + "_proj"
            packed = getattr(self, which + "_packed")
            if packed is None or packed.is_meta:
                destination[name] = torch.empty(e, n, k // 2, dtype=torch.uint8, device="meta")
                destination[name + "_scale"] = torch.empty(e, n, k // g, dtype=SCALE_DTYPE, device="meta")
                destination[name + "_zero"] = torch.empty(e, n, k // g, dtype=SCALE_DTYPE, device="meta")
                continue
            sz = getattr(self, which + "_sz")  # (E, K/g, N, 2)
            destination[name] = torch.stack([pack_nibbles(kernel_unpack(p, n, k, g)) for p in packed])
            destination[name + "_scale"] = sz[..., 0].transpose(1, 2).to(SCALE_DTYPE)
            destination[name + "_zero"] = sz[..., 1].transpose(1, 2).to(SCALE_DTYPE)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        g, e = self.group_size, self.num_experts
        for which, (n, k) in self._shapes().items():
            names = [prefix + which + "_proj" + s for s in ("", "_scale", "_zero")]
            if not all(x in state_dict for x in names):
                missing_keys.extend(x for x in names if x not in state_dict)
                continue
            packed, scale, zero = (state_dict[x] for x in names)
            if (tuple(packed.shape) != (e, n, k // 2) or packed.dtype != torch.uint8
                    or tuple(scale.shape) != (e, n, k // g) or tuple(zero.shape) != (e, n, k // g)):
                error_msgs.append(f"{names[0]}: int4 tensors of the wrong shape or dtype")
                continue
            p, sz = _Packed.from_codes(unpack_nibbles(packed), scale, zero)
            setattr(self, which + "_packed", p)
            setattr(self, which + "_sz", sz)

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, int4 groups of {self.group_size}"


# -- the transform and its config --------------------------------------------------------------------------------

def pick_group_size(model: nn.Module, experts: bool = True) -> int:
    """The largest of GROUP_SIZES that divides the input side of every matrix the transform would quantize."""
    shapes = [s for _, _, m in quantized_projections(model, experts) for s in weight_shapes(m)]
    for g in GROUP_SIZES:
        if all(k % g == 0 for _, k in shapes):
            return g
    raise QuantError(f"no group size in {GROUP_SIZES} divides every quantized matrix's input side "
                     f"(shapes {sorted(set(shapes))})")


def quantize_model(model: nn.Module, group_size: int | None = None, experts: bool = True,
                   progress: bool = False) -> dict:
    """Replace the model's projections (and, with `experts`, the MoE experts) by int4 versions, in place.

    Returns the `quantization_config` for config.json, also kept as `model.quantization_config`. A model on the meta
    device gets empty int4 modules of the right shapes, to load an int4 checkpoint into."""
    if is_quantized(model):
        raise QuantError("the model is already quantized")
    if group_size is None:
        group_size = pick_group_size(model, experts)
    if group_size not in KERNEL_GROUP_SIZES:
        raise QuantError(f"group size must be one of {', '.join(map(str, KERNEL_GROUP_SIZES))} (what the int4 "
                         f"kernels take), got {group_size}")
    targets = quantized_projections(model, experts)
    for parent, name, module in targets:  # check every shape before changing anything
        for n, k in weight_shapes(module):
            _check_shapes(name, n, k, group_size)
    replace_targets(targets, lambda m: (Int4Experts.quantize(m, group_size) if isinstance(m, Experts)
                                        else Int4Linear.quantize(m, group_size)), progress)
    config = make_config(group_size, experts)
    model.quantization_config = config
    model.cuda_graph_capturable = not experts  # Int4Experts reads its per-expert token counts on the host
    return config


def make_config(group_size: int, experts: bool) -> dict:
    return {"quant_method": QUANT_METHOD, "bits": 4, "group_size": group_size, "zero_point": True,
            "scale_dtype": "bfloat16", "packing": "uint8, even column in the low nibble",
            "modules_to_not_convert": NOT_CONVERTED + ([] if experts else ["experts"])}


_KNOWN_KEYS = {"quant_method", "bits", "group_size", "zero_point", "scale_dtype", "packing", "modules_to_not_convert"}


def read_config(qc: dict, where: str) -> tuple[int, bool]:
    """A `quant_method: "dgemma-int4"` config -> (group size, experts quantized?). Anything else is an error."""
    if qc.get("quant_method") != QUANT_METHOD:
        raise QuantError(f"{where}: quant_method {qc.get('quant_method')!r:.40} is not {QUANT_METHOD!r}")
    unknown = sorted(set(qc) - _KNOWN_KEYS)
    if unknown:
        raise QuantError(f"{where}: unknown {QUANT_METHOD} quantization_config key {unknown[0]!r:.40}; this dgemma "
                         f"reads {', '.join(sorted(_KNOWN_KEYS))}")
    if qc.get("bits", 4) != 4 or qc.get("zero_point", True) is not True or qc.get("scale_dtype", "bfloat16") != "bfloat16":
        raise QuantError(f"{where}: only 4-bit codes with a bf16 scale and zero per group are supported")
    if qc.get("packing", make_config(32, True)["packing"]) != make_config(32, True)["packing"]:
        raise QuantError(f"{where}: unknown int4 packing {qc.get('packing')!r:.60}")
    g = qc.get("group_size")
    if not isinstance(g, int) or isinstance(g, bool) or g not in KERNEL_GROUP_SIZES:
        raise QuantError(f"{where}: group_size must be one of {', '.join(map(str, KERNEL_GROUP_SIZES))}, "
                         f"got {g!r:.40}")
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list):
        raise QuantError(f"{where}: modules_to_not_convert must be a list, got {skip!r:.80}")
    return g, "experts" not in skip


def stored_as_is(name: str) -> bool:
    """Whether a saved tensor keeps its dtype whatever dtype the rest of the checkpoint is written in."""
    return name.endswith(tuple(a + b for a in (".weight", "_proj") for b in _SAVED_AS_IS))
