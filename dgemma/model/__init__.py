from .model import DiffusionGemma, Layer

__all__ = ["DiffusionGemma", "Layer"]
