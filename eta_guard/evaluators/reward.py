"""ETA's post-generation evaluator: a text reward model scoring responses in a safety format.

The reward model never sees the user's question. It sees the conversation
``[user: <safety instruction>, assistant: <response>]`` rendered with its own chat template.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from eta_guard._device import load_pretrained, module_device, resolve_device
from eta_guard.config import RewardNumerics
from eta_guard.errors import InvalidInputError

logger = logging.getLogger(__name__)

_NO_LIMIT = 100_000
#: Shorter common prefixes are not worth a second forward.
_MIN_SHARED_PREFIX = 16
_DEFAULT_MAX_LENGTH = 4096
#: Private-use placeholders that stand for the two messages' contents when the template is
#: rendered, to tell template text (whose special tokens are real) from content (whose are not).
_PLACEHOLDERS = ("\ue000eta-content-0\ue001", "\ue000eta-content-1\ue001")
#: Fraction of a window repeated at the start of the next one, so that a sentence cut by one
#: window's edge is whole in the next (if it is shorter than the overlap).
_WINDOW_OVERLAP = 0.25
#: Tokens kept free in each window for tokenisation differences at the response's edges.
_WINDOW_SLACK = 8
#: Rows per forward when long answers are scored in windows.
_WINDOW_BATCH = 8


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
        max_windows: Most windows one answer longer than ``max_length`` is scored in (an
            answer needing more is refused with :class:`InvalidInputError`).

    The conversation is rendered with the template, but only the template's own text is
    tokenized with special tokens parsed: the instruction and the response are tokenized with
    special tokens split, so a response that spells ``<|eot_id|>`` cannot forge a turn.

    An answer whose conversation is longer than ``max_length`` is scored in overlapping windows
    of the response (each in the full safety conversation) and gets the lowest window reward,
    so a harmful tail cannot hide behind a long harmless opening. Answers that fit are scored
    exactly as one sequence.

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
        max_windows: int = 32,
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
        if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
            raise InvalidInputError(f"max_windows={max_windows!r} must be a positive int")
        self.model = model.eval() if device is None else model.to(resolve_device(device)).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_windows = max_windows
        self.pad_token_id = _ensure_pad_token(model, tokenizer)
        self.max_length = max_length or _context_length(model, tokenizer)
        self._specials = _special_token_pattern(tokenizer)
        self._bos_ids, self._eos_ids = _added_special_ids(tokenizer)
        self._instruction_cache: dict[str, tuple[str, str, str, str]] = {}
        from eta_guard.evaluators.armorm import LlamaForRewardModelWithGating, gating_pattern

        if isinstance(model, LlamaForRewardModelWithGating):
            model.gating_token_pattern = gating_pattern(tokenizer)

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
        allow_new_weights: bool = False,
        max_windows: int = 32,
    ) -> RewardPostEvaluator:
        """Load with ``AutoModelForSequenceClassification`` / ``AutoTokenizer.from_pretrained``.

        ArmoRM checkpoints (``config.architectures == ["LlamaForRewardModelWithGating"]``, the
        reference RM) load natively with :mod:`eta_guard.evaluators.armorm`: no remote code,
        whatever ``trust_remote_code`` says.

        Args:
            allow_new_weights: Accept a checkpoint that loads with newly initialised (random)
                weights; refused by default (see :func:`eta_guard._device.load_pretrained`).

        Raises:
            InvalidInputError: The checkpoint cannot be loaded (the message says how to fix it),
                loads with new weights, or its tokenizer has no chat template and
                ``chat_template`` was not given.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not isinstance(name_or_path, str) or not name_or_path.strip():
            raise InvalidInputError(
                f"reward model name_or_path={name_or_path!r} must be a non-empty string"
            )
        model_class: Any = AutoModelForSequenceClassification
        remote = trust_remote_code
        if _is_armorm(name_or_path, local_files_only):
            from eta_guard.evaluators.armorm import LlamaForRewardModelWithGating

            model_class, remote = LlamaForRewardModelWithGating, False
        model, tokenizer = load_pretrained(
            "reward model",
            name_or_path,
            model_class,
            AutoTokenizer,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
            trust_remote_code=remote,
            model_kwargs=model_kwargs,
            processor_kwargs=tokenizer_kwargs,
            allow_new_weights=allow_new_weights,
        )
        return cls(
            model,
            tokenizer,
            max_length=max_length,
            chat_template=chat_template,
            name=name_or_path,
            max_windows=max_windows,
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

    def score(
        self, responses: Sequence[str], instruction: str, *, numerics: RewardNumerics = "fast"
    ) -> list[float]:
        """Reward of each response under ``instruction``, in one padded forward.

        A response too long for ``max_length`` is scored in overlapping windows (forwards of
        8 rows) and gets its lowest window reward.

        Args:
            responses: Response texts (never the user's question).
            instruction: The safety instruction shown as the user turn.
            numerics: ``"fast"``: the model's dtype, rows batched, their common prefix run once.
                ``"reference"``: the reference's numerics (exactness over speed): each
                conversation (window) alone, under bfloat16 autocast, with the math SDPA kernel
                only (the reference turns the flash and memory-efficient kernels off).

        Returns:
            One float per response; ETA flags a response iff its reward ``<= post_threshold``.

        Raises:
            InvalidInputError: The instruction alone does not fit ``max_length``, or a response
                needs more than ``max_windows`` windows.
        """
        items = _as_texts(responses)
        if not isinstance(instruction, str) or not instruction:
            raise InvalidInputError(f"instruction={instruction!r} must be a non-empty str")
        if not items:
            return []
        if numerics not in ("fast", "reference"):
            raise InvalidInputError(f"numerics={numerics!r} must be 'fast' or 'reference'")
        plans = [self._windows(instruction, r) for r in items]
        if numerics == "reference":
            return [min(self._forward_reference(seq) for seq in plan) for plan in plans]
        if all(len(p) == 1 for p in plans):
            return self._forward([p[0] for p in plans])
        rows = [seq for plan in plans for seq in plan]
        scores = [
            s
            for start in range(0, len(rows), _WINDOW_BATCH)
            for s in self._forward(rows[start : start + _WINDOW_BATCH])
        ]
        out, offset = [], 0
        for plan in plans:
            out.append(min(scores[offset : offset + len(plan)]))
            offset += len(plan)
        return out

    def window_counts(self, responses: Sequence[str], instruction: str) -> list[int]:
        """How many windows :meth:`score` scores each response in (1 when it fits; no forward)."""
        items = _as_texts(responses)
        counts = []
        for response in items:
            ids = self.encode(instruction, response)
            if len(ids) <= self.max_length:
                counts.append(1)
            else:
                counts.append(len(self._window_starts(instruction, response)[1]))
        return counts

    def _forward(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of token sequences, in one forward (prefix shared when it pays)."""
        shared = shared_prefix_length(sequences, self.pad_token_id)
        with torch.inference_mode():
            if len(sequences) > 1 and shared >= _MIN_SHARED_PREFIX and self.prefix_sharing:
                output = self._forward_shared_prefix(sequences, shared)
            else:
                input_ids, attention_mask = self.pad_batch(sequences)
                output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return reward_scalar(output, len(sequences)).float().cpu().tolist()

    def _forward_reference(self, sequence: list[int]) -> float:
        """One conversation alone, as the reference scores it (see :meth:`score`)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        device = self.device
        ids = torch.tensor([sequence], dtype=torch.long, device=device)
        with (
            torch.inference_mode(),
            torch.autocast(device_type=device.type, dtype=torch.bfloat16),
            sdpa_kernel(SDPBackend.MATH),
        ):
            output = self.model(input_ids=ids)
        return float(reward_scalar(output, 1).float().cpu()[0])

    @property
    def prefix_sharing(self) -> bool:
        """Whether the model scores a suffix run after a cached prefix as the whole row."""
        # transformers' generic head pools correctly from a suffix; ArmoRM has its own shared-
        # prefix forward (its gate may read a position inside the prefix). Other custom heads
        # need the whole sequence.
        from transformers.modeling_layers import GenericForSequenceClassification

        from eta_guard.evaluators.armorm import LlamaForRewardModelWithGating

        return isinstance(
            self.model, (GenericForSequenceClassification, LlamaForRewardModelWithGating)
        )

    def _forward_shared_prefix(self, sequences: list[list[int]], shared: int) -> Any:
        """One forward where the rows' common prefix (instruction + accepted answer) runs once.

        Best-of-N candidates differ only in their last sentence, so the prefix is encoded at
        batch 1, its KV cache expanded to the batch, and only the differing suffixes run batched.
        """
        from transformers import DynamicCache

        from eta_guard.evaluators.armorm import LlamaForRewardModelWithGating

        prefix = torch.tensor([sequences[0][:shared]], dtype=torch.long, device=self.device)
        if isinstance(self.model, LlamaForRewardModelWithGating):
            suffix_ids, suffix_mask = self.pad_batch([s[shared:] for s in sequences])
            return self.model.forward_shared_prefix(prefix, suffix_ids, suffix_mask)
        cache = DynamicCache(config=self.model.config)
        base = getattr(self.model, self.model.base_model_prefix)
        base(input_ids=prefix, cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(sequences))
        input_ids, suffix_mask = self.pad_batch([s[shared:] for s in sequences])
        prefix_mask = torch.ones(
            (len(sequences), shared), dtype=suffix_mask.dtype, device=self.device
        )
        return self.model(
            input_ids=input_ids,
            attention_mask=torch.cat([prefix_mask, suffix_mask], dim=1),
            cache=cache,
            use_cache=True,
        )

    # ------------------------------------------------------------------ encoding
    def encode(self, instruction: str, response: str) -> list[int]:
        """Token ids of the safety conversation, contents tokenized with special tokens split.

        The template's own text keeps its special tokens (turn markers, BOS); whatever the
        instruction or the response contain is text: ``"<|eot_id|>"`` in a response becomes
        the tokens of those characters, never the end-of-turn token. For contents without
        special-token text, the ids equal tokenizing the rendered conversation.

        Raises:
            InvalidInputError: The chat template does not place each content once, unchanged
                apart from surrounding whitespace handling.
        """
        head, instruction_text, middle, tail = self._skeleton(instruction)
        rendered = self.format(instruction, response)
        lead = head + instruction_text + middle
        fits = len(rendered) >= len(lead) + len(tail)
        if not (fits and rendered.startswith(lead) and rendered.endswith(tail)):
            raise InvalidInputError(
                f"the chat template of the reward model {self.name!r} renders the response in a "
                "way that depends on the instruction; pass chat_template= with a template that "
                "writes each message's content in place"
            )
        response_text = rendered[len(lead) : len(rendered) - len(tail)]
        segments = [
            (head, True),
            (instruction_text, False),
            (middle, True),
            (response_text, False),
            (tail, True),
        ]
        ids = self._tokenize_segments(segments)
        bos = getattr(self.tokenizer, "bos_token", None)
        # The template usually writes BOS itself; adding it again would shift every score.
        if not (bos and rendered.startswith(bos)):
            ids = self._bos_ids + ids + self._eos_ids
        return ids

    def _skeleton(self, instruction: str) -> tuple[str, str, str, str]:
        """``(head, instruction as rendered, middle, tail)`` of the template around the response."""
        cached = self._instruction_cache.get(instruction)
        if cached is not None:
            return cached
        first, second = _PLACEHOLDERS
        bare = self.format(first, second)
        if (
            bare.count(first) != 1
            or bare.count(second) != 1
            or bare.index(first) > bare.index(second)
        ):
            raise InvalidInputError(
                f"the chat template of the reward model {self.name!r} does not write the user "
                "and assistant contents once each, in order; pass chat_template= with one that does"
            )
        head, rest = bare.split(first)
        middle, tail = rest.split(second)
        with_instruction = self.format(instruction, second)
        lead, found, after = with_instruction.rpartition(middle + second + tail)
        if not found or after or not lead.startswith(head):
            raise InvalidInputError(
                f"the chat template of the reward model {self.name!r} changes its layout with "
                "the instruction; pass chat_template= with one that writes contents in place"
            )
        skeleton = (head, lead[len(head) :], middle, tail)
        if len(self._instruction_cache) < 16:  # two instructions in practice
            self._instruction_cache[instruction] = skeleton
        return skeleton

    def _tokenize_segments(self, segments: list[tuple[str, bool]]) -> list[int]:
        """Ids of text segments; special tokens are parsed only in segments marked as template.

        Text between template special tokens is joined across segments before tokenizing, as
        the tokenizer itself would, so that benign contents get exactly the usual ids.
        """
        pieces: list[str | int] = []
        for text, is_template in segments:
            parts = self._specials.split(text) if is_template and self._specials else [text]
            for i, part in enumerate(parts):
                if i % 2 == 1:  # a captured special token
                    pieces.append(self.tokenizer.convert_tokens_to_ids(part))
                elif part:
                    if pieces and isinstance(pieces[-1], str):
                        pieces[-1] += part
                    else:
                        pieces.append(part)
        ids: list[int] = []
        for piece in pieces:
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(self._text_ids(piece))
        return ids

    def _text_ids(self, text: str) -> list[int]:
        return list(
            self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )

    def _window_starts(self, instruction: str, response: str) -> tuple[list[int], list[int], int]:
        """``(response ids, window starts, window size)`` for a response that does not fit."""
        overhead = len(self.encode(instruction, "")) + _WINDOW_SLACK
        size = self.max_length - overhead
        if size < 1:
            raise InvalidInputError(
                f"the reward-model instruction alone takes {overhead - _WINDOW_SLACK} tokens, "
                f"too many for max_length={self.max_length}; shorten rm_decision_prompt / "
                "rm_search_prompt or raise max_length"
            )
        response_ids = self._text_ids(response)
        stride = max(1, size - int(size * _WINDOW_OVERLAP))
        count = 1 + max(0, math.ceil((len(response_ids) - size) / stride))
        return response_ids, [i * stride for i in range(count)], size

    def _windows(self, instruction: str, response: str) -> list[list[int]]:
        """The token sequences a response is scored in: one if it fits, else overlapping windows.

        Raises:
            InvalidInputError: The instruction alone does not fit, or the response needs more
                than ``max_windows`` windows.
        """
        ids = self.encode(instruction, response)
        if len(ids) <= self.max_length:
            return [ids]
        response_ids, starts, size = self._window_starts(instruction, response)
        if len(starts) > self.max_windows:
            raise InvalidInputError(
                f"the response is {len(response_ids)} tokens long: scoring all of it needs "
                f"{len(starts)} windows of {size} tokens, more than max_windows="
                f"{self.max_windows}; cap the answer length or raise max_windows"
            )
        windows = []
        for start in starts:
            keep = min(size, len(response_ids) - start)
            while True:
                text = self.tokenizer.decode(response_ids[start : start + keep])
                seq = self.encode(instruction, text)
                if len(seq) <= self.max_length or keep <= 1:
                    break
                keep -= max(1, len(seq) - self.max_length)
            if len(seq) > self.max_length:
                raise InvalidInputError(
                    f"a {keep}-token window of the response does not fit max_length="
                    f"{self.max_length}; raise max_length"
                )
            windows.append(seq)
        logger.info(
            "response of %d tokens scored in %d windows of up to %d tokens (max_length=%d)",
            len(response_ids),
            len(windows),
            size,
            self.max_length,
        )
        return windows

    def pad_batch(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to ``Tensor[B, L]`` ids and mask (the model pools at the last non-pad token)."""
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)


def shared_prefix_length(sequences: list[list[int]], pad_token_id: int | None = None) -> int:
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


def _is_armorm(name_or_path: str, local_files_only: bool) -> bool:
    """Whether the checkpoint's config names ArmoRM's architecture (no remote code is run)."""
    from transformers import AutoConfig

    from eta_guard.evaluators.armorm import is_armorm_config

    try:
        config = AutoConfig.from_pretrained(
            name_or_path, local_files_only=local_files_only, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError):
        return False  # the model load that follows reports the problem
    return is_armorm_config(config)


def _special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex capturing the tokenizer's special tokens (longest first), or ``None``."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = {str(t) for t in decoder.values() if getattr(t, "special", False)}
    names |= {str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
    names.discard("")
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(f"({alternatives})")


def _added_special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (e.g. BOS) with special tokens on."""
    probe = "a"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def reward_scalar(output: Any, batch_size: int) -> torch.Tensor:
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
