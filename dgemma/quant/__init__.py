"""Weight-only quantization as transforms on a built model, and the formats they save in."""

from .fp8 import QuantError, dequantize_blocks, is_quantized, quantize_blocks, quantize_model

__all__ = ["QuantError", "dequantize_blocks", "is_quantized", "quantize_blocks", "quantize_model"]
