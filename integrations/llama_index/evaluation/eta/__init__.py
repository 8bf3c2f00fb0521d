"""LlamaIndex evaluator for eta-guard: ``from llama_index.evaluation.eta import ETASafetyEvaluator``."""

from llama_index.evaluation.eta.base import ETAEvaluationResult, ETASafetyEvaluator

__all__ = ["ETAEvaluationResult", "ETASafetyEvaluator"]
