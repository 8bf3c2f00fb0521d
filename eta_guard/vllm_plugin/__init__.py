"""vLLM plugin: serves ArmoRM (``LlamaForRewardModelWithGating``) as a pooling model.

Installed with the ``vllm-plugin`` extra; vLLM finds it through the ``vllm.general_plugins``
entry point (``eta_guard_armorm = "eta_guard.vllm_plugin:register"``) in every engine process.
``vllm serve RLHFlow/ArmoRM-Llama3-8B-v0.1 --runner pooling`` then answers ``/classify`` with
ArmoRM's preference score (the value :class:`eta_guard.evaluators.reward.RewardPostEvaluator`
computes locally), which :class:`eta_guard.backends.RemoteRewardModel` reads with
``use_activation=false``. See docs/scaling.md.
"""

from __future__ import annotations

#: The architecture name in ArmoRM's ``config.json``.
ARCHITECTURE = "LlamaForRewardModelWithGating"
#: Lazy ``module:class`` reference, so registering imports neither torch nor the model code.
MODEL_CLASS = "eta_guard.vllm_plugin.armorm:ArmoRMForVLLM"


def register() -> None:
    """Register ArmoRM with vLLM's model registry (the entry point vLLM calls)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
