"""ShieldGemma 2 as an ETA gate: P(Yes) that an image violates each of its policies.

``ShieldGemma2ForImageClassification`` reads one image and one policy per prompt (its
processor's chat template wraps the policy text in its instruction) and returns the softmax over
its ``Yes`` / ``No`` tokens at the last position. The gate scores every image against every
selected policy in batched forwards (the processor builds the ``images x policies`` grid) and
takes the largest P(Yes); the policies at or above the threshold are the verdict's categories.
ShieldGemma 2 classifies the image alone: the user's question is not part of its prompt (pair it
with a guard that reads the text, e.g. Llama Guard, for SIUO-style harm).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from eta_guard._device import module_device
from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.base import GuardRequest, GuardScore
from eta_guard.evaluators.guard_loading import load_guard


class ShieldGemma2Gate:
    """Largest P(Yes) over images and policies (unsafe iff >= ``threshold``).

    Args:
        model: ``ShieldGemma2ForImageClassification``.
        processor: Its ``ShieldGemma2Processor`` (policies and chat template from the checkpoint).
        policies: Keys of the processor's policies (plus ``custom_policies``) to check; default
            all of them (``dangerous``, ``sexual``, ``violence`` for the published checkpoint).
        custom_policies: Extra ``{key: description}`` policies (the processor's option).
        threshold: P(Yes) at or above which an image is flagged.
        batch_size: Prompts (image x policy) per forward.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        policies: Sequence[str] | None = None,
        custom_policies: dict[str, str] | None = None,
        threshold: float = 0.5,
        batch_size: int = 8,
        name: str = "shieldgemma2",
    ) -> None:
        known = {**processor.policy_definitions, **(custom_policies or {})}
        chosen = list(known) if policies is None else list(policies)
        unknown = [p for p in chosen if p not in known]
        if unknown or not chosen:
            raise InvalidInputError(
                f"policies={chosen!r}: unknown {unknown!r}; the checkpoint has {sorted(known)!r} "
                "(add your own with custom_policies={key: description})"
            )
        if not 0.0 <= threshold <= 1.0:
            raise InvalidInputError(f"threshold={threshold!r} must be a probability in [0, 1]")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size={batch_size!r} must be >= 1")
        self.model, self.processor = model, processor
        self.policies, self.custom_policies = chosen, dict(custom_policies or {})
        self.threshold, self.batch_size, self.name = threshold, batch_size, name
        self._lock = threading.Lock()

    #: Requests this gate reads (see eta_guard.evaluators.base.GateEvaluator).
    applies_to = frozenset({"images"})

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: Any = None,
        dtype: Any = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        allow_new_weights: bool = False,
        **kwargs: Any,
    ) -> ShieldGemma2Gate:
        """Load a ShieldGemma 2 checkpoint (``kwargs`` go to ``__init__``)."""
        from transformers import AutoProcessor, ShieldGemma2ForImageClassification

        return load_guard(
            cls,
            name_or_path,
            ShieldGemma2ForImageClassification,
            AutoProcessor,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
            model_kwargs=model_kwargs,
            processor_kwargs=processor_kwargs,
            allow_new_weights=allow_new_weights,
            default_name=f"shieldgemma2:{name_or_path}",
            **kwargs,
        )

    def p_yes(self, images: list[Any]) -> torch.Tensor:
        """``Tensor[len(images), len(policies)]`` of P(Yes), float32 on the CPU."""
        per_forward = max(1, self.batch_size // len(self.policies))
        rows = []
        for start in range(0, len(images), per_forward):
            chunk = images[start : start + per_forward]
            with self._lock, torch.inference_mode():
                inputs = self.processor(
                    images=chunk,
                    policies=self.policies,
                    custom_policies=self.custom_policies,
                    return_tensors="pt",
                ).to(module_device(self.model))
                inputs = inputs.to(self.model.dtype)  # floating inputs in the weights' dtype
                out = self.model(**inputs)
            # the processor's order: img1_policy1 .. img1_policyN, img2_policy1 ..
            rows.append(out.probabilities[:, 0].float().cpu().view(len(chunk), -1))
        return torch.cat(rows)

    def check(self, requests: list[GuardRequest]) -> list[GuardScore]:
        """One score per request: the largest P(Yes) over its images and the policies."""
        flat = [image for request in requests for image in request.images]
        if any(not request.images for request in requests):
            raise InvalidInputError("ShieldGemma 2 classifies images: a request had none")
        probs = self.p_yes(flat)
        out, offset = [], 0
        for request in requests:
            block = probs[offset : offset + len(request.images)]
            offset += len(request.images)
            worst = block.max(dim=0).values  # per policy
            pairs = zip(self.policies, worst.tolist(), strict=True)
            cats = tuple(p for p, v in pairs if v >= self.threshold)
            out.append(GuardScore(float(worst.max()), cats))
        return out
