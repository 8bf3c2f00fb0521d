"""Stopping units of the sentence-level search, each a tiny callable with a one-line contract.

- :class:`SentenceEndCriteria`: one bool per row, "the last token ends a sentence" (decoded text).
- :class:`CancelCriteria`: one bool per row, all ``True`` once a cancel event is set.
- :func:`candidate_lengths`: how many tokens each sampled row keeps, and whether it hit EOS.
- :func:`cut_at_stop` / :func:`stop_holdback`: stop-string handling on decoded text.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch
from transformers import StoppingCriteria

from eta_guard.errors import InvalidInputError

#: Tokens decoded together when a byte-level token is only part of a UTF-8 character. Four covers
#: any character split into single-byte tokens; more covers merged byte pieces too.
_TAIL_TOKENS = 8
_REPLACEMENT = "\ufffd"

#: How a token's text is matched against the terminators. ``"exact"`` (the reference's rule: only
#: the bare ``'.'`` token, Llama id 29889, ends a sentence; ``'▁.'``, ``'...'``, ``'.)'`` do not) or
#: ``"contains"`` (any token whose text contains a terminator: more, shorter sentences).
SentenceEndRule = Literal["exact", "contains"]
SENTENCE_END_RULES: tuple[str, ...] = ("exact", "contains")

_Masks = tuple[torch.Tensor, torch.Tensor]
_MaskKey = tuple[tuple[str, ...], str]
# id(tokenizer) -> (weak ref to it, {(terminators, rule): masks}). Keyed by identity because
# tokenizers are not hashable; the weak ref tells a live entry from a recycled id and drops the
# entry with it.
_MASK_CACHE: dict[int, tuple[weakref.ref, dict[_MaskKey, _Masks]]] = {}
_MASK_LOCK = threading.Lock()
#: Texts tried as the one-token lead that token texts are decoded after (see _token_texts).
_LEADS = ("a", "x", "I", "the", "hello")


def vocabulary_masks(
    tokenizer: Any, terminators: tuple[str, ...], rule: SentenceEndRule = "contains"
) -> _Masks:
    """Per-token masks over the tokenizer's vocabulary, computed once per tokenizer, terminators and rule.

    Returns:
        ``(ends, partial)``: bool tensors of shape ``[len(tokenizer)]``. ``ends[t]``: the text of
        token ``t`` as it reads after a word is exactly a terminator (``rule="exact"``) or
        contains one (``rule="contains"``). ``partial[t]``: token ``t`` decodes to an incomplete
        UTF-8 sequence (byte-level pieces), so it must be judged in context. Special tokens are in
        neither mask.
    """
    _check_rule(rule)
    key = (tuple(terminators), rule)
    with _MASK_LOCK:
        per_tok = _cache_for(tokenizer)
        if key in per_tok:
            return per_tok[key]
        texts = _token_texts(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        matches = (
            (lambda text: text in terminators)
            if rule == "exact"
            else (lambda text: any(t in text for t in terminators))
        )
        ends = torch.tensor(
            [i not in special and matches(text) for i, text in enumerate(texts)], dtype=torch.bool
        )
        partial = torch.tensor(
            [i not in special and _REPLACEMENT in text for i, text in enumerate(texts)],
            dtype=torch.bool,
        )
        per_tok[key] = (ends, partial)
        return per_tok[key]


def _token_texts(tokenizer: Any) -> list[str]:
    """Each token's text as it reads in the middle of a text (after a one-token word).

    Decoded alone, SentencePiece-style tokens lose their leading space (``'▁.'`` would read
    ``'.'``); after a lead word they keep it (``' .'``), so the exact rule can tell them apart.
    """
    size = len(tokenizer)
    decode = lambda batch: tokenizer.batch_decode(  # noqa: E731
        batch, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    lead = _lead_token(tokenizer)
    alone = decode([[i] for i in range(size)])
    if lead is None:
        return alone
    lead_text = decode([[lead]])[0]
    texts = []
    for i, text in enumerate(decode([[lead, i] for i in range(size)])):
        texts.append(text[len(lead_text) :] if text.startswith(lead_text) else alone[i])
    return texts


def _lead_token(tokenizer: Any) -> int | None:
    unk = getattr(tokenizer, "unk_token_id", None)
    for text in _LEADS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] != unk:
            return int(ids[0])
    return None


def _check_rule(rule: str) -> None:
    if rule not in SENTENCE_END_RULES:
        raise InvalidInputError(
            f"sentence_end_rule={rule!r}: use 'exact' (the reference: a token whose text is "
            "exactly a terminator) or 'contains' (a token whose text contains one)"
        )


def _cache_for(tokenizer: Any) -> dict[_MaskKey, _Masks]:
    key = id(tokenizer)
    entry = _MASK_CACHE.get(key)
    if entry is not None and entry[0]() is tokenizer:
        return entry[1]

    def forget(_: weakref.ref) -> None:
        _MASK_CACHE.pop(key, None)

    try:
        ref = weakref.ref(tokenizer, forget)
    except TypeError:  # not weak-referenceable: compute without caching
        return {}
    _MASK_CACHE[key] = (ref, {})
    return _MASK_CACHE[key][1]


def _lookup(mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``mask[ids]`` with ids outside the tokenizer's vocabulary (padded embeddings) mapped to False."""
    inside = (ids >= 0) & (ids < mask.numel())
    return mask[ids.clamp(0, mask.numel() - 1)] & inside


class SentenceEndCriteria(StoppingCriteria):
    """Returns one bool per row: does the row's last token end a sentence?

    Tokenizer-agnostic: a token ends a sentence when its text (as it reads after a word) is exactly
    one of ``terminators`` (``rule="exact"``, the reference's rule) or contains one
    (``rule="contains"``). Byte-level tokens holding only part of a UTF-8 character (a multi-byte
    terminator such as ``'。'`` split over several tokens) are judged on the decoded tail of the row.

    Args:
        tokenizer: the VLM's tokenizer.
        terminators: non-empty strings that end a sentence, e.g. ``(".",)``.
        start_length: length of ``input_ids`` when sampling started; rows no longer than this
            have produced nothing and never count as ended.
        rule: ``"exact"`` or ``"contains"``.
    """

    def __init__(
        self,
        tokenizer: Any,
        terminators: Sequence[str],
        *,
        start_length: int = 0,
        rule: SentenceEndRule = "exact",
    ) -> None:
        terminators = tuple(terminators)
        if not terminators or any(not isinstance(t, str) or not t for t in terminators):
            raise InvalidInputError(
                f"terminators={terminators!r}: give at least one non-empty string, e.g. ('.', '!', '?')"
            )
        if start_length < 0:
            raise InvalidInputError(f"start_length={start_length!r}: must be >= 0")
        _check_rule(rule)
        self.tokenizer = tokenizer
        self.terminators = terminators
        self.start_length = start_length
        self.rule = rule
        self.ends_mask, self.partial_mask = vocabulary_masks(tokenizer, terminators, rule)

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        """Judge the last token of each row.

        Args:
            input_ids: ``[batch, seq]`` token ids (never modified).

        Returns:
            ``[batch]`` bools.
        """
        if input_ids.shape[-1] <= self.start_length:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].cpu()  # the vocabulary masks live on the CPU: N ids cross, not V
        done = _lookup(self.ends_mask, last)
        for row in torch.nonzero(_lookup(self.partial_mask, last)).flatten().tolist():
            done[row] = self._tail_completes_terminator(input_ids[row])
        return done.to(input_ids.device)

    def _tail_completes_terminator(self, row: torch.Tensor) -> bool:
        """Whether appending the row's last token adds a terminator to the decoded tail."""
        tail = row[-_TAIL_TOKENS:].tolist()
        decode = lambda ids: self.tokenizer.decode(  # noqa: E731
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        with_last, without_last = decode(tail), decode(tail[:-1])
        if self.rule == "exact":  # the character(s) this token completes are a terminator
            settled = without_last.rstrip(_REPLACEMENT)
            return with_last.startswith(settled) and with_last[len(settled) :] in self.terminators
        return any(with_last.count(t) > without_last.count(t) for t in self.terminators)


class CancelCriteria(StoppingCriteria):
    """Returns one bool per row: all ``True`` once any of ``events`` is set (a consumer stopped listening)."""

    def __init__(self, *events: threading.Event | AnyEvent | None) -> None:
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        cancelled = any(e.is_set() for e in self.events)
        return torch.full(
            (input_ids.shape[0],), cancelled, dtype=torch.bool, device=input_ids.device
        )


class AnyEvent:
    """Reads as set when any of ``events`` is (None entries ignored): a cancel made of several."""

    def __init__(self, *events: Any) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


class PromptSnapshot(StoppingCriteria):
    """Never stops; after the first decoding step hands ``snapshot()`` (e.g. a copy of the
    prompt's KV cache, which then covers exactly the prompt) to ``on_ready``, once."""

    def __init__(self, snapshot: Any, on_ready: Any) -> None:
        self.snapshot, self.on_ready, self.fired = snapshot, on_ready, False

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if not self.fired:
            self.fired = True
            self.on_ready(self.snapshot())
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)


def candidate_lengths(
    sequences: torch.Tensor,
    start_length: int,
    *,
    eos_token_ids: Sequence[int],
    sentence_end: SentenceEndCriteria | None,
) -> tuple[list[int], list[bool]]:
    """Returns, per row, the tokens kept (through its first EOS or sentence end) and whether it hit EOS.

    Args:
        sequences: ``[n, start_length + T]`` context followed by ``T`` sampled tokens per row;
            tokens after a row's end (padding) are ignored.
        start_length: length of the context.
        eos_token_ids: ids that end the answer.
        sentence_end: the sentence-end criterion, or None to cut at EOS only.

    Returns:
        ``(lengths, ended)``: ``lengths[r]`` in ``[1, T]``; ``ended[r]`` is True iff row ``r``
        stops on an EOS token (which is included in its length).
    """
    sequences = sequences.cpu()  # one copy instead of a device sync per row and step
    n, total = sequences.shape
    steps = total - start_length
    if steps <= 0:
        raise InvalidInputError(
            f"no sampled tokens: sequences have {total} <= start_length={start_length}"
        )
    lengths, ended = [steps] * n, [False] * n
    open_rows = set(range(n))
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=sequences.dtype)
    for t in range(1, steps + 1):
        if not open_rows:
            break
        prefix = sequences[:, : start_length + t]
        is_eos = torch.isin(prefix[:, -1], eos) if eos.numel() else torch.zeros(n, dtype=torch.bool)
        is_end = sentence_end(prefix) if sentence_end is not None else torch.zeros_like(is_eos)
        for row in sorted(open_rows):
            if bool(is_eos[row]) or bool(is_end[row]):
                lengths[row], ended[row] = t, bool(is_eos[row])
                open_rows.discard(row)
    return lengths, ended


def cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    """Returns ``text`` cut before the earliest stop string, and whether one was found."""
    if not stop:
        return text, False
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def stop_holdback(text: str, stop: Sequence[str] | None) -> int:
    """Returns how many trailing characters of ``text`` could still begin a stop string (or end mid-character)."""
    hold = len(text) - len(text.rstrip(_REPLACEMENT))
    for s in stop or ():
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
