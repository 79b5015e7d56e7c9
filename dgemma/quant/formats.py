"""Which quantized format a checkpoint is in, from its `quantization_config`, and the Layout the loader follows.

    quant_method "fp8"                 dgemma's block FP8 (fp8.py), as `dgemma quantize` writes it
    quant_method "dgemma-int4"         dgemma's group-wise int4 (int4.py), as `dgemma quantize --format int4` writes it
    quant_method "modelopt"            NVIDIA ModelOpt NVFP4 (nvfp4.py); also read from hf_quant_config.json
    quant_method "compressed-tensors"  FP8 per-channel weights, the FP8_DYNAMIC scheme (compressed.py)
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from . import compressed, fp8, int4, nvfp4
from .layout import Layout, QuantError

FORMATS = (fp8.QUANT_METHOD, int4.QUANT_METHOD, nvfp4.QUANT_METHOD, compressed.QUANT_METHOD)
READ_ONLY = (nvfp4.QUANT_METHOD, compressed.QUANT_METHOD)  # loaded and run, never written by dgemma


def quantization_config(raw_config: dict, path: Path) -> dict | None:
    """config.json's quantization_config; failing that, a ModelOpt hf_quant_config.json beside it (older ModelOpt
    exports put the quantization only there)."""
    if "quantization_config" in raw_config:
        return raw_config["quantization_config"]
    side = path / "hf_quant_config.json"
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise QuantError(f"{side}: not valid JSON") from None
    quant = data.get("quantization") if isinstance(data, dict) else None
    if not isinstance(quant, dict):
        raise QuantError(f"{side}: has no \"quantization\" object")
    return {"quant_method": nvfp4.QUANT_METHOD, **quant}


def _fp8_layout(model: nn.Module, qc: dict, where: str) -> Layout:
    """dgemma's own format: its names are the model's, and io/checkpoint.py reads its FP8 weights and fp32 scales."""
    block, experts = fp8.read_config(qc, where)
    fp8.quantize_model(model, block, experts)
    return Layout(config=model.quantization_config)


def prepare(model: nn.Module, qc: object, where: str, stored_dtype) -> Layout:
    """Turn the meta model into the checkpoint's quantized form and return how its tensors load.
    `stored_dtype(hf tensor name)` -> the torch dtype the files hold it in, or None."""
    if not isinstance(qc, dict):
        raise QuantError(f"{where}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method == fp8.QUANT_METHOD:
        layout = _fp8_layout(model, qc, where)
    elif method == int4.QUANT_METHOD:
        int4.quantize_model(model, *int4.read_config(qc, where))
        layout = Layout(config=model.quantization_config)
    elif method == nvfp4.QUANT_METHOD:
        layout = nvfp4.prepare(model, qc, where, stored_dtype)
    elif method == compressed.QUANT_METHOD:
        layout = compressed.prepare(model, qc, where, stored_dtype)
    else:
        raise QuantError(f"{where}: quantization method {method!r:.40} is not supported (quantization_config."
                         f"quant_method); dgemma reads {', '.join(repr(f) for f in FORMATS)}")
    model.quantization_config = layout.config
    return layout

