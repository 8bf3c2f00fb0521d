"""LlamaIndex LLM for eta-guard: ``from llama_index.llms.eta import ETAMultiModalLLM``."""

from llama_index.llms.eta.base import ETAMultiModalLLM

__all__ = ["ETAMultiModalLLM"]
