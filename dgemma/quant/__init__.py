"""Weight-only quantization as transforms on a built model, and the formats they save in.

The names below load on first use, so registering `dgemma quantize`'s parser (quant_cli) imports no torch."""

__all__ = ["QuantError", "dequantize_blocks", "is_quantized", "quantize_blocks", "quantize_model"]


def __getattr__(name: str):
    if name in __all__:
        from . import fp8

        return getattr(fp8, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
