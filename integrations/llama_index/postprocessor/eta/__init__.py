"""LlamaIndex node postprocessor for eta-guard:
``from llama_index.postprocessor.eta import ETAImageSafetyPostprocessor``."""

from llama_index.postprocessor.eta.base import ETAImageSafetyPostprocessor

__all__ = ["ETAImageSafetyPostprocessor"]
