"""souplm: model soups for language and multimodal models."""

__version__ = "0.1.0"
