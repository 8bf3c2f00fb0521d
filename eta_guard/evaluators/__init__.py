"""ETA's evaluators: CLIP before generation, a reward model after, extra gates and judges (guard
models, a patch-level CLIP scan), and the rule combining them.

Imports are lazy so that ``import eta_guard.evaluators`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "CLIPPreEvaluator": "eta_guard.evaluators.clip",
    "CLIPEncoder": "eta_guard.evaluators.clip",
    "TransformersCLIPEncoder": "eta_guard.evaluators.clip_transformers",
    "OpenCLIPEncoder": "eta_guard.evaluators.clip_open_clip",
    "RewardPostEvaluator": "eta_guard.evaluators.reward",
    "ETAEvaluator": "eta_guard.evaluators.eta_evaluator",
    "GateEvaluator": "eta_guard.evaluators.base",
    "JudgeEvaluator": "eta_guard.evaluators.base",
    "GuardRequest": "eta_guard.evaluators.base",
    "GuardScore": "eta_guard.evaluators.base",
    "LlamaGuardEvaluator": "eta_guard.evaluators.llama_guard",
    "PatchCLIPGate": "eta_guard.evaluators.patch_clip",
    "ShieldGemma2Gate": "eta_guard.evaluators.shieldgemma2",
    "LlamaGuardTextEvaluator": "eta_guard.evaluators.text_guards",
    "Qwen3GuardEvaluator": "eta_guard.evaluators.text_guards",
    "EvaluatorSpec": "eta_guard.evaluators.specs",
    "SpecError": "eta_guard.evaluators.specs",
    "build_guards": "eta_guard.evaluators.specs",
    "parse_spec": "eta_guard.evaluators.specs",
}

__all__ = [
    "CLIPEncoder",
    "CLIPPreEvaluator",
    "ETAEvaluator",
    "EvaluatorSpec",
    "GateEvaluator",
    "GuardRequest",
    "GuardScore",
    "JudgeEvaluator",
    "LlamaGuardEvaluator",
    "LlamaGuardTextEvaluator",
    "OpenCLIPEncoder",
    "PatchCLIPGate",
    "Qwen3GuardEvaluator",
    "RewardPostEvaluator",
    "ShieldGemma2Gate",
    "SpecError",
    "TransformersCLIPEncoder",
    "build_guards",
    "parse_spec",
]

if TYPE_CHECKING:
    from eta_guard.evaluators.base import GateEvaluator, GuardRequest, GuardScore, JudgeEvaluator
    from eta_guard.evaluators.clip import CLIPEncoder, CLIPPreEvaluator
    from eta_guard.evaluators.clip_open_clip import OpenCLIPEncoder
    from eta_guard.evaluators.clip_transformers import TransformersCLIPEncoder
    from eta_guard.evaluators.eta_evaluator import ETAEvaluator
    from eta_guard.evaluators.llama_guard import LlamaGuardEvaluator
    from eta_guard.evaluators.patch_clip import PatchCLIPGate
    from eta_guard.evaluators.reward import RewardPostEvaluator
    from eta_guard.evaluators.shieldgemma2 import ShieldGemma2Gate
    from eta_guard.evaluators.specs import EvaluatorSpec, SpecError, build_guards, parse_spec
    from eta_guard.evaluators.text_guards import LlamaGuardTextEvaluator, Qwen3GuardEvaluator


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eta_guard.evaluators' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
