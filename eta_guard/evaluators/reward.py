"""ETA's post-generation evaluator: a text reward model scoring responses in a safety format.

The reward model never sees the user's question. It sees the conversation
``[user: <safety instruction>, assistant: <response>]`` rendered with its own chat template.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from eta_guard._device import load_pretrained, module_device, resolve_device
from eta_guard.errors import InvalidInputError

logger = logging.getLogger(__name__)

_NO_LIMIT = 100_000
#: Shorter common prefixes are not worth a second forward.
_MIN_SHARED_PREFIX = 16
_DEFAULT_MAX_LENGTH = 4096


class RewardPostEvaluator:
    """Scores responses with a sequence-classification reward model (higher is safer).

    Args:
        model: ``AutoModelForSequenceClassification``-style model. Its scalar is ``output.score``
            when present (ArmoRM's custom code), else ``output.logits[:, 0]``.
        tokenizer: The model's tokenizer; it must have a chat template.
        device: Move the model there (``None`` leaves it where it is).
        max_length: Longest rendered conversation in tokens (default: the model's context).
        chat_template: A Jinja chat template for tokenizers that lack one.
        name: A label for logs and reports.

    Raises:
        InvalidInputError: The tokenizer has no chat template and none was given.

    Example:
        >>> import tempfile
        >>> from eta_guard.testing import build_tiny_checkpoints
        >>> ckpt = build_tiny_checkpoints(tempfile.mkdtemp())
        >>> rm = RewardPostEvaluator.from_pretrained(ckpt.reward_model, device="cpu")
        >>> rewards = rm.score(["I can't help with that.", "Sure, step one..."], "Be safe.")
        >>> len(rewards)
        2
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        chat_template: str | None = None,
        name: str = "reward_model",
    ) -> None:
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInputError(
                f"the reward model tokenizer of {name!r} has no chat template, so the safety "
                "conversation cannot be rendered; pass chat_template='<jinja template>' "
                "(e.g. the template of the model the RM was trained from)"
            )
        if max_length is not None and max_length < 1:
            raise InvalidInputError(f"max_length={max_length!r} must be a positive int or None")
        self.model = model.eval() if device is None else model.to(resolve_device(device)).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.pad_token_id = _ensure_pad_token(model, tokenizer)
        self.max_length = max_length or _context_length(model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: Any = None,
        trust_remote_code: bool = False,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        max_length: int | None = None,
        chat_template: str | None = None,
    ) -> RewardPostEvaluator:
        """Load with ``AutoModelForSequenceClassification`` / ``AutoTokenizer.from_pretrained``.

        ArmoRM (the reference RM) ships custom code: pass ``trust_remote_code=True`` for it.

        Raises:
            InvalidInputError: The checkpoint cannot be loaded (the message says how to fix it),
                or its tokenizer has no chat template and ``chat_template`` was not given.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not isinstance(name_or_path, str) or not name_or_path.strip():
            raise InvalidInputError(
                f"reward model name_or_path={name_or_path!r} must be a non-empty string"
            )
        model, tokenizer = load_pretrained(
            "reward model",
            name_or_path,
            AutoModelForSequenceClassification,
            AutoTokenizer,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
            processor_kwargs=tokenizer_kwargs,
        )
        return cls(
            model, tokenizer, max_length=max_length, chat_template=chat_template, name=name_or_path
        )

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    def format(self, instruction: str, response: str) -> str:
        """The safety conversation rendered with the RM's own chat template (not tokenized)."""
        conversation = [
            {"role": "user", "content": instruction},
            {"role": "assistant", "content": response},
        ]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False)

    def score(self, responses: Sequence[str], instruction: str) -> list[float]:
        """Reward of each response under ``instruction``, in one padded forward.

        Args:
            responses: Response texts (never the user's question).
            instruction: The safety instruction shown as the user turn.

        Returns:
            One float per response; ETA flags a response iff its reward ``<= post_threshold``.
        """
        items = _as_texts(responses)
        if not isinstance(instruction, str) or not instruction:
            raise InvalidInputError(f"instruction={instruction!r} must be a non-empty str")
        if not items:
            return []
        sequences = [self._encode(instruction, r) for r in items]
        shared = _shared_prefix_length(sequences, self.pad_token_id)
        with torch.inference_mode():
            if len(items) > 1 and shared >= _MIN_SHARED_PREFIX and self._prefix_sharing:
                output = self._forward_shared_prefix(sequences, shared)
            else:
                input_ids, attention_mask = self._batch(sequences)
                output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return _scalar(output, len(items)).float().cpu().tolist()

    @property
    def _prefix_sharing(self) -> bool:
        # Only transformers' generic head is known to pool correctly from a suffix: custom heads
        # (ArmoRM's gating looks for tokens inside the prompt) need the whole sequence.
        from transformers.modeling_layers import GenericForSequenceClassification

        return isinstance(self.model, GenericForSequenceClassification)

    def _forward_shared_prefix(self, sequences: list[list[int]], shared: int) -> Any:
        """One forward where the rows' common prefix (instruction + accepted answer) runs once.

        Best-of-N candidates differ only in their last sentence, so the prefix is encoded at
        batch 1, its KV cache expanded to the batch, and only the differing suffixes run batched.
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        prefix = torch.tensor([sequences[0][:shared]], dtype=torch.long, device=self.device)
        base = getattr(self.model, self.model.base_model_prefix)
        base(input_ids=prefix, cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(sequences))
        input_ids, suffix_mask = self._batch([s[shared:] for s in sequences])
        prefix_mask = torch.ones(
            (len(sequences), shared), dtype=suffix_mask.dtype, device=self.device
        )
        return self.model(
            input_ids=input_ids,
            attention_mask=torch.cat([prefix_mask, suffix_mask], dim=1),
            cache=cache,
            use_cache=True,
        )

    # ------------------------------------------------------------------ helpers
    def _tokenize(self, text: str) -> list[int]:
        # The template usually writes BOS itself; adding it again would shift every score.
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _encode(self, instruction: str, response: str) -> list[int]:
        """Token ids of the rendered conversation, the response cut so that it fits."""
        ids = self._tokenize(self.format(instruction, response))
        if len(ids) <= self.max_length:
            return ids
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        keep = len(response_ids)
        # Token counts are not additive across a re-render, so shrink until it fits.
        while len(ids) > self.max_length and keep > 0:
            keep = max(0, min(keep - 1, keep - (len(ids) - self.max_length)))
            cut = self.tokenizer.decode(response_ids[:keep], skip_special_tokens=True)
            ids = self._tokenize(self.format(instruction, cut))
        if len(ids) > self.max_length:
            raise InvalidInputError(
                f"the reward-model instruction alone takes {len(ids)} tokens, more than "
                f"max_length={self.max_length}; shorten rm_decision_prompt / rm_search_prompt "
                "or raise max_length"
            )
        logger.warning(
            "response truncated from %d to %d tokens to fit the reward model's max_length=%d",
            len(response_ids),
            keep,
            self.max_length,
        )
        return ids

    def _batch(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to ``Tensor[B, L]`` ids and mask (the model pools at the last non-pad token)."""
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)


def _shared_prefix_length(sequences: list[list[int]], pad_token_id: int | None = None) -> int:
    """Length of the common token prefix of all rows that leaves each row's pooled token in its suffix.

    The head pools at the last token that is not ``pad_token_id``. When the chat template ends
    with that id (a pad that fell back to EOS), a row's suffix could hold only such tokens, and
    pooling over the suffix would then pick the wrong position; so the prefix stops before each
    row's last non-pad token (and always leaves every row at least one token).
    """
    limit = min(len(s) for s in sequences) - 1
    for seq in sequences:
        last = next((i for i in range(len(seq) - 1, -1, -1) if seq[i] != pad_token_id), 0)
        limit = min(limit, last)
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


def _scalar(output: Any, batch_size: int) -> torch.Tensor:
    """``Tensor[B]``: ``output.score`` (ArmoRM, ``[B, 1]`` or ``[B]``) else ``logits[:, 0]``."""
    score = getattr(output, "score", None)
    if score is None:
        score = output[0] if isinstance(output, tuple) else output.logits
    if not isinstance(score, torch.Tensor) or score.shape[0] != batch_size:
        raise TypeError(
            f"reward model output has no per-row scalar (got {type(score).__name__} "
            f"{tuple(getattr(score, 'shape', ()))}); expected .score or .logits of shape [B, ...]"
        )
    return score.reshape(batch_size, -1)[:, 0]


def _ensure_pad_token(model: Any, tokenizer: Any) -> int:
    """Pick the padding id and tell the model, so pooling finds the last real token."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    pad = 0
    for candidate in (
        getattr(config, "pad_token_id", None),
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,  # may be a list in some configs
    ):
        if isinstance(candidate, (list, tuple)) and candidate:
            candidate = candidate[0]
        if isinstance(candidate, int):
            pad = candidate
            break
    config.pad_token_id = pad
    if config is not model.config:
        model.config.pad_token_id = pad
    return pad


def _context_length(model: Any, tokenizer: Any) -> int:
    limits = []
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions))
    max_len = getattr(tokenizer, "model_max_length", None)
    if max_len and max_len < _NO_LIMIT:
        limits.append(int(max_len))
    return min(limits) if limits else _DEFAULT_MAX_LENGTH


def _as_texts(responses: Sequence[str]) -> list[str]:
    if isinstance(responses, str):
        raise InvalidInputError(
            "responses must be a list of strings, not a single str; wrap it: [response]"
        )
    items = list(responses)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidInputError(f"responses[{i}] is {type(text).__name__}, expected str")
    return items
