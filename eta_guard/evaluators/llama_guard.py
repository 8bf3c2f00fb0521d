"""Llama Guard vision models (3 Vision / Mllama, 4) as an ETA gate or judge, through transformers.

The checkpoint's own chat template builds the prompt (its task text, its MLCommons category list,
its ``User``/``Agent`` roles); ``mode="prompt"`` classifies the user's last turn (a gate),
``mode="response"`` the answer given the conversation (a judge). The score is P(unsafe): the
probability of the ``unsafe`` token at the first generated position that is not whitespace
(Llama Guard 3's template ends at ``<|end_header_id|>``, and the model first writes ``\\n\\n``);
the categories are parsed from the greedy answer (:mod:`eta_guard.evaluators.guard_answers`).

Message text is untrusted: every special token string of the guard's tokenizer in it (``<|eot_id|>``,
``<|image|>``...) is broken with a zero-width space before rendering, so it cannot close a turn,
forge an image slot or end the conversation block.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from eta_guard._device import module_device
from eta_guard.errors import EvaluatorError, InvalidInputError
from eta_guard.evaluators.base import GuardRequest, GuardScore
from eta_guard.evaluators.guard_answers import llama_guard_categories
from eta_guard.evaluators.guard_loading import load_guard
from eta_guard.evaluators.guard_markers import break_markers, control_strings, single_token
from eta_guard.evaluators.guard_turns import GuardMode, llama_guard_turns

if TYPE_CHECKING:
    from PIL import Image


class LlamaGuardEvaluator:
    """Llama Guard 3 Vision / 4 scoring P(unsafe) of a prompt or a response (unsafe iff >= threshold).

    Args:
        model: An image-text-to-text Llama Guard model (``MllamaForConditionalGeneration``,
            ``Llama4ForConditionalGeneration``).
        processor: Its processor, whose chat template is the guard's.
        mode: ``"prompt"`` (gate: the user's turn) or ``"response"`` (judge: the answer).
        threshold: P(unsafe) at or above which the request is flagged.
        name: Shown in verdicts.
        categories: Replace the template's category list (``{"S1": "My category."}``).
        excluded_categories: Codes left out of the template's list (``["S6"]``).
        max_new_tokens: Greedy tokens generated to read the verdict line and the categories.
        images_per_prompt: Images the checkpoint takes in one prompt (Llama Guard 3 Vision: 1;
            with more, each image is checked with the text and the largest score counts).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        mode: GuardMode = "prompt",
        threshold: float = 0.5,
        name: str = "llama_guard",
        categories: dict[str, str] | None = None,
        excluded_categories: Sequence[str] = (),
        max_new_tokens: int = 20,
        images_per_prompt: int | None = None,
    ) -> None:
        if mode not in ("prompt", "response"):
            raise InvalidInputError(f"mode={mode!r}: use 'prompt' (gate) or 'response' (judge)")
        if not 0.0 <= threshold <= 1.0:
            raise InvalidInputError(f"threshold={threshold!r} must be a probability in [0, 1]")
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens={max_new_tokens!r} must be >= 1")
        self.model, self.processor = model, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.mode, self.threshold, self.name = mode, threshold, name
        self.categories = dict(categories) if categories else None
        self.excluded_categories = list(excluded_categories)
        self.max_new_tokens = max_new_tokens
        if images_per_prompt is None:
            images_per_prompt = 1 if model.config.model_type == "mllama" else 16
        self.images_per_prompt = images_per_prompt
        self.unsafe_id = single_token(self.tokenizer, "unsafe")
        self._markers = control_strings(self.tokenizer)
        self._lock = threading.Lock()

    #: Requests this gate reads: with images, and text-only ones (``text_only_policy="guard"``).
    applies_to = frozenset({"images", "text_only"})

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        mode: GuardMode = "prompt",
        device: Any = None,
        dtype: Any = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        allow_new_weights: bool = False,
        **kwargs: Any,
    ) -> LlamaGuardEvaluator:
        """Load a Llama Guard vision checkpoint (``kwargs`` go to ``__init__``)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        return load_guard(
            cls,
            name_or_path,
            AutoModelForImageTextToText,
            AutoProcessor,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
            model_kwargs=model_kwargs,
            processor_kwargs=processor_kwargs,
            allow_new_weights=allow_new_weights,
            default_name=f"llama_guard:{name_or_path}",
            mode=mode,
            **kwargs,
        )

    # ------------------------------------------------------------------ prompt
    def guard_messages(self, request: GuardRequest, num_images: int) -> list[dict[str, Any]]:
        """The conversation the guard classifies (:func:`llama_guard_turns`), markers broken."""
        parts = [{"type": "image"} for _ in range(num_images)]
        return llama_guard_turns(request, self.mode, clean=self._safe, image_parts=parts)

    def render(self, request: GuardRequest, num_images: int) -> str:
        """The prompt string the guard receives (its chat template, not tokenized)."""
        kwargs: dict[str, Any] = {"excluded_category_keys": self.excluded_categories}
        if self.categories is not None:
            kwargs["categories"] = self.categories
        return self.processor.apply_chat_template(
            self.guard_messages(request, num_images), tokenize=False, **kwargs
        )

    def _safe(self, text: str) -> str:
        return break_markers(text, self._markers)

    # ------------------------------------------------------------------ scores
    def check(self, requests: list[GuardRequest]) -> list[GuardScore]:
        """P(unsafe) and categories per request (images beyond ``images_per_prompt``: max)."""
        out = []
        for request in requests:
            groups = _chunks(request.images, self.images_per_prompt) or [[]]
            scores = [self._score(request, images) for images in groups]
            best = max(scores, key=lambda s: s.score)
            cats = tuple(dict.fromkeys(c for s in scores for c in s.categories))
            out.append(GuardScore(best.score, cats))
        return out

    @torch.inference_mode()
    def _score(self, request: GuardRequest, images: list[Image.Image]) -> GuardScore:
        prompt = self.render(request, len(images))
        with self._lock:
            inputs = self.processor(
                text=prompt, images=images or None, add_special_tokens=False, return_tensors="pt"
            ).to(module_device(self.model))
            # floating inputs in the weights' dtype (Llama 4's processor returns bfloat16 pixels)
            inputs = inputs.to(self.model.dtype)
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        new = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        step = next((i for i, t in enumerate(new) if self.tokenizer.decode([t]).strip()), None)
        if step is None:
            raise EvaluatorError(
                f"{self.name} wrote no verdict in {self.max_new_tokens} tokens (only whitespace)"
            )
        probs = torch.softmax(out.logits[step][0].float(), dim=-1)
        answer = self.tokenizer.decode(new, skip_special_tokens=True)
        return GuardScore(float(probs[self.unsafe_id]), llama_guard_categories(answer))


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
