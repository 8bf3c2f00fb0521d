"""Local Hugging Face guard models as judges: Llama Guard 3, Llama Guard 3-Vision, MD-Judge-style.

``llama-guard``: a causal LM whose own chat template writes the guard prompt (Llama Guard 3
1B/8B); it judges the conversation ``[user: question, assistant: answer]``. ``llama-guard-vision``:
an image-text-to-text model with the same idea and the image in the user turn (Llama Guard
3-11B-Vision). ``md-judge``: a causal LM fed a plain prompt template (default:
:data:`~eta_guard.eval.judges.prompts.MD_JUDGE_STYLE_TEMPLATE`). All decode greedily and read
``safe`` / ``unsafe`` from the first line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from eta_guard.eval.judges.base import JudgeInput, Judgment, parse_safe_unsafe
from eta_guard.eval.judges.prompts import (
    MD_JUDGE_STYLE_TEMPLATE,
    break_special_tokens,
    check_template,
    fill_template,
)

GuardFormat = Literal["llama-guard", "llama-guard-vision", "md-judge"]
FORMATS: tuple[str, ...] = ("llama-guard", "llama-guard-vision", "md-judge")


class HFGuardJudge:
    """A local generative guard model as a judge.

    Args:
        model: The loaded model (``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for
            ``llama-guard-vision``).
        processor: Its tokenizer (text formats) or processor (vision).
        format: Which prompt format the model expects (see the module docstring).
        template: ``md-judge`` only: a prompt with ``{question}`` and ``{response}``.
        max_new_tokens: Tokens to decode (the verdict is in the first few).
        name: The judge's name in records and reports.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        format: GuardFormat,
        template: str | None = None,
        max_new_tokens: int = 16,
        name: str | None = None,
    ) -> None:
        from eta_guard.errors import InvalidInputError

        if format not in FORMATS:
            raise InvalidInputError(f"judge format {format!r}: use one of {list(FORMATS)}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.format = format
        self.template = check_template(template or MD_JUDGE_STYLE_TEMPLATE)
        self.max_new_tokens = max_new_tokens
        self.name = name or format
        self._specials = [
            *getattr(self.tokenizer, "all_special_tokens", []),
            *self.tokenizer.get_added_vocab(),
        ]

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        format: GuardFormat,
        device: str | None = None,
        dtype: Any = None,
        trust_remote_code: bool = False,
        local_files_only: bool = False,
        template: str | None = None,
        name: str | None = None,
    ) -> HFGuardJudge:
        """Load a guard model and its tokenizer / processor (through the local HF cache)."""
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        from eta_guard._device import load_pretrained

        vision = format == "llama-guard-vision"
        model, processor = load_pretrained(
            f"judge {format}",
            name_or_path,
            AutoModelForImageTextToText if vision else AutoModelForCausalLM,
            AutoProcessor if vision else AutoTokenizer,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
        return cls(model, processor, format=format, template=template, name=name)

    def prompt(self, item: JudgeInput) -> str:
        """The exact text the guard model reads for ``item`` (untrusted parts neutralised)."""
        question = break_special_tokens(item.question, self._specials)
        response = break_special_tokens(item.response, self._specials)
        if self.format == "md-judge":
            warning = break_special_tokens(item.safety_warning or "", self._specials) or None
            return fill_template(self.template, question, response, warning)
        if self.format == "llama-guard":
            conversation: list[dict[str, Any]] = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": response},
            ]
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        user: list[dict[str, Any]] = [{"type": "text", "text": question}]
        if item.image is not None:
            user.insert(0, {"type": "image"})
        conversation = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": response}]},
        ]
        return self.processor.apply_chat_template(conversation, tokenize=False)

    def judge(self, inputs: Sequence[JudgeInput]) -> list[Judgment]:
        return [self._one(item) for item in inputs]

    def _one(self, item: JudgeInput) -> Judgment:
        import torch

        text = self.prompt(item)
        if self.format == "llama-guard-vision" and item.image is not None:
            from eta_guard.media import load_image

            image = load_image(item.image)
            enc = self.processor(text=text, images=[image], return_tensors="pt")
        elif self.format == "md-judge":
            enc = self.tokenizer(text, return_tensors="pt")
        else:  # the chat template wrote BOS itself
            enc = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        enc = enc.to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self._pad()
            )
        new = out[0, enc["input_ids"].shape[1] :]
        return parse_safe_unsafe(self.tokenizer.decode(new, skip_special_tokens=True))

    def _pad(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id
