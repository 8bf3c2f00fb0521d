"""LlamaIndex embedding for eta-guard: ``from llama_index.embeddings.eta import ETAClipEmbedding``."""

from llama_index.embeddings.eta.base import ETAClipEmbedding

__all__ = ["ETAClipEmbedding"]
