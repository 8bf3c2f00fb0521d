"""Text guard models as ETA gates (text-only requests) and judges (answers), through transformers.

- :class:`LlamaGuardTextEvaluator`: Llama Guard 3 1B / 8B (``LlamaForCausalLM``). The prompt is
  the checkpoint's chat template (task text, its S1..S14 list, ``User`` / ``Agent`` roles); the
  8B template takes string contents, the 1B one OpenAI-style parts: the form is found once, at
  construction, by rendering a probe. Score: the softmax over the ``safe`` / ``unsafe`` logits at
  the first generated position that is not whitespace (the template ends at
  ``<|end_header_id|>``; the model writes ``\\n\\n`` first). Categories from the answer's second
  line (``unsafe\\nS1,S10``).
- :class:`Qwen3GuardEvaluator`: Qwen3Guard-Gen (``Qwen3ForCausalLM``). Its template asks for
  ``Safety: Safe|Unsafe|Controversial`` then ``Categories: ...`` (and, for answers, ``Refusal:``).
  ``Safety:`` is appended to the rendered prompt, so the next position holds the label: the score
  is the softmax over the three labels' first tokens there, P(Unsafe) (plus P(Controversial) with
  ``controversial="unsafe"``, the model card's *strict* mode, the default). Categories from the
  ``Categories:`` line of the greedy answer, only the model's own names kept.

As a gate a text guard has ``applies_to = {"text_only"}``: it classifies requests without images
under ``ETAConfig.text_only_policy="guard"`` (it cannot see an image, so it never gates one). As a
judge (``mode="response"``) it reads the answer with the conversation, for every request. System
text is left out (as Llama Guard's own template does); message text and the answer are untrusted:
the guard tokenizer's control strings in them are broken first
(:mod:`eta_guard.evaluators.guard_markers`).
"""

from __future__ import annotations

import re
import threading
from typing import Any, Literal

import torch

from eta_guard._device import module_device
from eta_guard.errors import EvaluatorError, InvalidInputError
from eta_guard.evaluators.base import GuardRequest, GuardScore
from eta_guard.evaluators.guard_answers import llama_guard_categories
from eta_guard.evaluators.guard_loading import load_guard
from eta_guard.evaluators.guard_markers import break_markers, control_strings, single_token
from eta_guard.evaluators.guard_turns import GuardMode, llama_guard_turns

#: Qwen3Guard-Gen's unsafe categories (prompt moderation; responses have all but ``Jailbreak``).
QWEN3GUARD_CATEGORIES: tuple[str, ...] = (
    "Violent",
    "Non-violent Illegal Acts",
    "Sexual Content or Sexual Acts",
    "PII",
    "Suicide & Self-Harm",
    "Unethical Acts",
    "Politically Sensitive Topics",
    "Copyright Violation",
    "Jailbreak",
)
QWEN3GUARD_LABELS: tuple[str, ...] = ("Safe", "Unsafe", "Controversial")
_PROBE = "eta-guard probe 7q"


class _TextGuard:
    """What both text guards share: messages from a request, markers broken, one lock."""

    #: Requests this gate reads: text-only ones (it cannot see images).
    applies_to = frozenset({"text_only"})

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        mode: GuardMode,
        threshold: float,
        name: str,
        max_new_tokens: int,
    ) -> None:
        if mode not in ("prompt", "response"):
            raise InvalidInputError(f"mode={mode!r}: use 'prompt' (gate) or 'response' (judge)")
        if not 0.0 <= threshold <= 1.0:
            raise InvalidInputError(f"threshold={threshold!r} must be a probability in [0, 1]")
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens={max_new_tokens!r} must be >= 1")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInputError(f"{name}: the checkpoint's tokenizer has no chat template")
        self.model, self.tokenizer = model, tokenizer
        self.processor = tokenizer  # the name the spec builder shares weights under
        self.mode, self.threshold, self.name = mode, threshold, name
        self.max_new_tokens = max_new_tokens
        self._markers = control_strings(tokenizer)
        self._lock = threading.Lock()

    def turns(self, request: GuardRequest, *, parts: bool) -> list[dict[str, Any]]:
        """Alternating user/assistant turns of ``request`` (markers broken); contents as a list of
        text parts (``parts=True``) or one string."""
        turns = llama_guard_turns(
            request, self.mode, clean=lambda t: break_markers(t, self._markers), image_parts=[]
        )
        if parts:
            return turns
        return [
            {"role": t["role"], "content": "\n\n".join(p["text"] for p in t["content"])}
            for t in turns
        ]

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(module_device(self.model))

    def _generate(self, ids: torch.Tensor) -> Any:
        return self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )


class LlamaGuardTextEvaluator(_TextGuard):
    """Llama Guard 3 1B / 8B scoring P(unsafe) of a prompt or a response (unsafe iff >= threshold).

    Args:
        model: ``LlamaForCausalLM`` (a Llama Guard 3 text checkpoint).
        tokenizer: Its tokenizer, whose chat template is the guard's.
        mode: ``"prompt"`` (gate: text-only requests) or ``"response"`` (judge: answers).
        threshold: P(unsafe) at or above which the request is flagged.
        name: Shown in verdicts.
        max_new_tokens: Greedy tokens read for the verdict line and the categories.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        mode: GuardMode = "prompt",
        threshold: float = 0.5,
        name: str = "llama_guard_text",
        max_new_tokens: int = 20,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            mode=mode,
            threshold=threshold,
            name=name,
            max_new_tokens=max_new_tokens,
        )
        self.safe_id = single_token(tokenizer, "safe")
        self.unsafe_id = single_token(tokenizer, "unsafe")
        self.parts = _content_form(self, add_generation_prompt=False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> LlamaGuardTextEvaluator:
        """Load a Llama Guard 3 text checkpoint (``device``, ``dtype``, ``local_files_only``,
        ``model_kwargs``, ``tokenizer_kwargs``, ``allow_new_weights``; the rest go to ``__init__``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs["processor_kwargs"] = kwargs.pop("tokenizer_kwargs", None)
        return load_guard(
            cls,
            name_or_path,
            AutoModelForCausalLM,
            AutoTokenizer,
            default_name=f"llama_guard_text:{name_or_path}",
            **kwargs,
        )

    def render(self, request: GuardRequest) -> str:
        """The prompt string the guard receives (its chat template, not tokenized)."""
        return self.tokenizer.apply_chat_template(
            self.turns(request, parts=self.parts), tokenize=False
        )

    def check(self, requests: list[GuardRequest]) -> list[GuardScore]:
        """P(unsafe) (over ``safe`` / ``unsafe``) and categories per request."""
        return [self._score(r) for r in requests]

    @torch.inference_mode()
    def _score(self, request: GuardRequest) -> GuardScore:
        with self._lock:
            ids = self._prompt_ids(self.render(request))
            out = self._generate(ids)
        new = out.sequences[0, ids.shape[1] :].tolist()
        step = next((i for i, t in enumerate(new) if self.tokenizer.decode([t]).strip()), None)
        if step is None:
            raise EvaluatorError(
                f"{self.name} wrote no verdict in {self.max_new_tokens} tokens (only whitespace)"
            )
        logits = out.logits[step][0].float()
        pair = torch.softmax(logits[[self.safe_id, self.unsafe_id]], dim=-1)
        answer = self.tokenizer.decode(new, skip_special_tokens=True)
        return GuardScore(float(pair[1]), llama_guard_categories(answer))


class Qwen3GuardEvaluator(_TextGuard):
    """Qwen3Guard-Gen scoring P(Unsafe) (+ P(Controversial) when strict) of a prompt or response.

    Args:
        model: ``Qwen3ForCausalLM`` (a Qwen3Guard-Gen checkpoint).
        tokenizer: Its tokenizer, whose chat template is the guard's.
        mode: ``"prompt"`` (gate: text-only requests) or ``"response"`` (judge: answers).
        threshold: The probability at or above which the request is flagged.
        controversial: ``"unsafe"`` (strict: Controversial counts as unsafe) or ``"safe"`` (loose).
        name: Shown in verdicts.
        max_new_tokens: Greedy tokens read after ``Safety:`` for the label and the categories.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        mode: GuardMode = "prompt",
        threshold: float = 0.5,
        controversial: Literal["unsafe", "safe"] = "unsafe",
        name: str = "qwen3guard",
        max_new_tokens: int = 24,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            mode=mode,
            threshold=threshold,
            name=name,
            max_new_tokens=max_new_tokens,
        )
        if controversial not in ("unsafe", "safe"):
            raise InvalidInputError(
                f"controversial={controversial!r}: use 'unsafe' (strict) or 'safe' (loose)"
            )
        self.controversial = controversial
        self.label_ids = _label_ids(tokenizer)
        self.parts = _content_form(self, add_generation_prompt=True)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> Qwen3GuardEvaluator:
        """Load a Qwen3Guard-Gen checkpoint (same loading options as
        :meth:`LlamaGuardTextEvaluator.from_pretrained`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs["processor_kwargs"] = kwargs.pop("tokenizer_kwargs", None)
        return load_guard(
            cls,
            name_or_path,
            AutoModelForCausalLM,
            AutoTokenizer,
            default_name=f"qwen3guard:{name_or_path}",
            **kwargs,
        )

    def render(self, request: GuardRequest) -> str:
        """The prompt the guard receives: its chat template (generation prompt on) + ``Safety:``."""
        prompt = self.tokenizer.apply_chat_template(
            self.turns(request, parts=self.parts), tokenize=False, add_generation_prompt=True
        )
        return prompt + "Safety:"

    def check(self, requests: list[GuardRequest]) -> list[GuardScore]:
        """The unsafe probability and categories per request."""
        return [self._score(r) for r in requests]

    @torch.inference_mode()
    def _score(self, request: GuardRequest) -> GuardScore:
        with self._lock:
            ids = self._prompt_ids(self.render(request))
            out = self._generate(ids)
        probs = torch.softmax(out.logits[0][0].float()[list(self.label_ids)], dim=-1)
        score = float(probs[1] + (probs[2] if self.controversial == "unsafe" else 0.0))
        answer = "Safety:" + self.tokenizer.decode(
            out.sequences[0, ids.shape[1] :].tolist(), skip_special_tokens=True
        )
        return GuardScore(score, qwen3guard_categories(answer))


_CATEGORIES_LINE = re.compile(r"^\s*Categories:(.*)$", re.MULTILINE)


def qwen3guard_categories(answer: str) -> tuple[str, ...]:
    """The categories a Qwen3Guard answer names on its ``Categories:`` line (its own names only,
    in order, without repeats; ``None`` or an unknown name gives nothing)."""
    match = _CATEGORIES_LINE.search(answer)
    if match is None:
        return ()
    names = [n.strip().rstrip(".") for n in match.group(1).split(",")]
    return tuple(dict.fromkeys(n for n in names if n in QWEN3GUARD_CATEGORIES))


def _label_ids(tokenizer: Any) -> tuple[int, int, int]:
    """The first token of each label after ``Safety:`` (Safe, Unsafe, Controversial)."""
    head = tokenizer.encode("Safety:", add_special_tokens=False)
    ids = []
    for label in QWEN3GUARD_LABELS:
        full = tokenizer.encode(f"Safety: {label}", add_special_tokens=False)
        if full[: len(head)] != head or len(full) == len(head):
            raise InvalidInputError(
                f"the guard's tokenizer merges 'Safety:' with {label!r}; is this a Qwen3Guard "
                "checkpoint?"
            )
        ids.append(int(full[len(head)]))
    if len(set(ids)) != 3:
        raise InvalidInputError(
            "the guard's tokenizer starts two Qwen3Guard labels with the same token; their "
            "probabilities cannot be told apart (is this a Qwen3Guard checkpoint?)"
        )
    return ids[0], ids[1], ids[2]


def _content_form(guard: _TextGuard, *, add_generation_prompt: bool) -> bool:
    """True if the guard's template reads OpenAI-style text parts, False if string contents.

    Rendered once with a probe text in each form: a template that reads the other form either
    fails or drops the text (Llama Guard 3 1B's template silently renders no conversation when
    given strings), so the form whose rendering holds the probe is the checkpoint's.
    """
    request = GuardRequest([{"role": "user", "content": [{"type": "text", "text": _PROBE}]}])
    if guard.mode == "response":
        request = GuardRequest(request.messages, response="ok")
    for parts in (True, False):
        try:
            text = guard.tokenizer.apply_chat_template(
                guard.turns(request, parts=parts),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception:  # noqa: BLE001 - a template for the other form raises here
            continue
        if _PROBE in text:
            return parts
    raise InvalidInputError(
        f"{guard.name}: the checkpoint's chat template renders neither string contents nor text "
        "parts into its prompt; is this a Llama Guard 3 / Qwen3Guard checkpoint?"
    )
