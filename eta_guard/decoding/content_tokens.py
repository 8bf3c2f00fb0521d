"""Keep message content from acting as control when a VLM prompt is tokenized.

A chat template renders messages to one string that the processor then tokenizes with special
tokens parsed. Text a user (or a model, in the history) wrote that contains the template's turn
or end-of-sequence markers (``</s>``, ``<|im_end|>``, ``<end_of_utterance>``...) would become real
control tokens, and a literal image placeholder (``<image>``, ``<|image_pad|>``...) would become an
image slot. Here:

- :func:`render_with_spans` renders the conversation and finds where each text part landed, by
  rendering once more with a random sentinel in place of every text part;
- :func:`forged_markers` lists the special-token strings found *inside* those text spans;
- :func:`hole_text` swaps each of them for a "hole" (a special token the template and the
  processor leave alone), so the processor expands only the template's own image placeholders;
- :func:`fill_holes` replaces each hole id by the marker's ids tokenized with special tokens split:
  the model reads the marker as plain text.

A conversation without such markers is tokenized exactly as before (the processor sees the same
string), so ordinary prompts do not change by a single token.
"""

from __future__ import annotations

import bisect
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eta_guard.errors import InvalidInputError

Span = tuple[int, int]

#: Per-token processor outputs besides ``input_ids``: the mask (1 for new text tokens) and type
#: ids (0, "text", for new text tokens).
_PER_TOKEN_KEYS = ("attention_mask", "token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered conversation and where its message text lies in it.

    Attributes:
        text: the chat template's output.
        content_spans: ``(start, end)`` of every text part in ``text``, in order; ``None`` when the
            template changes message text (trims, upper-cases...) so the spans cannot be located.
    """

    text: str
    content_spans: list[Span] | None


def render_with_spans(
    render: Callable[[list[dict[str, Any]]], str], messages: list[dict[str, Any]]
) -> RenderedPrompt:
    """Render ``messages`` and locate every text part in the result.

    Args:
        render: messages -> template text (the adapter's renderer).
        messages: HF chat-template messages (content: list of parts).
    """
    text = render(messages)
    nonce = secrets.token_hex(8)
    contents: list[str] = []
    marked = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):  # str content is one text part
            marked.append({**message, "content": f"\ue000{nonce}:{len(contents)}\ue001"})
            contents.append(content)
            continue
        if not isinstance(content, list):
            marked.append(message)
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append({**part, "text": f"\ue000{nonce}:{len(contents)}\ue001"})
                contents.append(str(part.get("text", "")))
            else:
                parts.append(part)
        marked.append({**message, "content": parts})
    skeleton = render(marked)
    # Every sentinel must appear exactly once, in order. One scan, linear in the skeleton: a
    # find and a count per part from the start made a request of 50,000 tiny text parts cost
    # 89 s of CPU here before its length was even checked.
    found = list(re.finditer(f"\ue000{nonce}:(\\d+)\ue001", skeleton))
    if [int(m.group(1)) for m in found] != list(range(len(contents))):
        return RenderedPrompt(text, None)
    spans: list[Span] = []
    rebuilt: list[str] = []
    cursor = length = 0
    for match, content in zip(found, contents, strict=True):
        before = skeleton[cursor : match.start()]
        rebuilt += (before, content)
        start = length + len(before)
        spans.append((start, start + len(content)))
        length = start + len(content)
        cursor = match.end()
    rebuilt.append(skeleton[cursor:])
    if "".join(rebuilt) != text:  # the template transformed some text: spans are unknown
        return RenderedPrompt(text, None)
    return RenderedPrompt(text, spans)


def control_strings(processor: Any, tokenizer: Any) -> list[str]:
    """Strings the tokenizer parses as one added token, or the processor expands (placeholders)."""
    found = {
        str(getattr(token, "content", token))
        for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
    }
    found.update(str(t) for t in getattr(tokenizer, "all_special_tokens", None) or [])
    for name, value in (vars(processor) if processor is not None else {}).items():
        if name.endswith("token") and isinstance(value, str) and value:
            found.add(value)
    found.discard("")
    return sorted(found, key=len, reverse=True)


def forged_markers(text: str, spans: Sequence[Span], markers: Sequence[str]) -> list[Span]:
    """``(start, end)`` of every control string that lies inside a message's text.

    Occurrences are found left to right, longest first (as tokenizers match added tokens).

    Raises:
        InvalidInputError: a control string starts in message text and ends in the template
            (or the other way round): it can be neither kept nor split safely.
    """
    found: list[Span] = []
    if not markers or not spans:
        return found
    starts = [s[0] for s in spans]
    for begin, end in _leftmost_longest(text, markers):
        # the spans are sorted and disjoint: only the last one starting before `end` can overlap
        k = bisect.bisect_left(starts, end) - 1
        if k < 0 or spans[k][1] <= begin:
            continue  # template text: the marker is the template's own
        if not (spans[k][0] <= begin and end <= spans[k][1]):
            raise InvalidInputError(
                f"message text ends or starts with part of the control marker "
                f"{text[begin:end][:40]!r} that the chat template completes; remove that "
                "fragment from the message"
            )
        found.append((begin, end))
    return found


def _leftmost_longest(text: str, markers: Sequence[str]) -> list[Span]:
    """Non-overlapping occurrences of ``markers``, leftmost first, the longest at each start.

    One ``str.find`` pass per marker (linear, in C) rather than a per-character scan.
    """
    hits: list[tuple[int, int]] = []
    for marker in set(markers):
        at = text.find(marker)
        while at >= 0:
            hits.append((at, -len(marker)))
            at = text.find(marker, at + 1)
    chosen: list[Span] = []
    cursor = 0
    for begin, negative_length in sorted(hits):
        if begin >= cursor:
            chosen.append((begin, begin - negative_length))
            cursor = begin - negative_length
    return chosen


def hole_text(
    text: str, forged: Sequence[Span], *, tokenizer: Any, processor: Any, reserved_ids: set[int]
) -> tuple[str, str, int]:
    """``text`` with every forged marker replaced by one hole token; returns ``(text, hole, id)``.

    The hole is a special token that is no processor placeholder, whose id is not in
    ``reserved_ids`` (image / video token ids), and that occurs in the result only where it was
    put: message text may hold the hole's string too (it is then a forged marker itself, and
    holed), but the template's own text may not.

    Raises:
        InvalidInputError: the tokenizer has no special token usable as a hole.
    """
    placeholders = {
        v for k, v in vars(processor).items() if k.endswith("token") and isinstance(v, str)
    }
    ends = {getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)}
    candidates = [getattr(tokenizer, "unk_token", None), getattr(tokenizer, "pad_token", None)]
    candidates += list(getattr(tokenizer, "all_special_tokens", None) or [])
    for hole in dict.fromkeys(c for c in candidates if c):
        if hole in placeholders or hole in ends:
            continue
        ids = tokenizer(hole, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] in reserved_ids:
            continue
        pieces, cursor = [], 0
        for start, end in forged:
            pieces += [text[cursor:start], hole]
            cursor = end
        pieces.append(text[cursor:])
        holed = "".join(pieces)
        if holed.count(hole) == len(forged):  # not in the template, not formed at a seam
            return holed, hole, int(ids[0])
    raise InvalidInputError(
        "the message text holds chat-template control markers and the tokenizer has no spare "
        "special token to encode them as plain text; remove the markers from the message"
    )


def plain_text_ids(tokenizer: Any, text: str, control_ids: set[int]) -> list[int]:
    """``text`` tokenized with special tokens split (no BOS/EOS added): never a control token.

    Raises:
        InvalidInputError: the tokenizer still produced a control id (a non-special added token).
    """
    ids = [
        int(i)
        for i in tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ]
    if any(i in control_ids for i in ids):
        raise InvalidInputError(
            f"the message text {text[:40]!r} cannot be tokenized as plain text by this tokenizer "
            "(it still maps to a control token); remove it from the message"
        )
    return ids


def fill_holes(
    model_inputs: dict[str, Any], hole_id: int, replacements: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Replace the hole ids of a batch-1 processor output, in order, by ``replacements``.

    Per-token tensors (``attention_mask``, token-type ids) are rebuilt to match: ones for the
    attention mask, zeros (text) for type ids.

    Raises:
        InvalidInputError: the processor output holds a different number of holes.
    """
    ids = model_inputs["input_ids"][0].tolist()
    positions = [i for i, t in enumerate(ids) if t == hole_id]
    if len(positions) != len(replacements):
        raise InvalidInputError(
            f"the processor kept {len(positions)} of {len(replacements)} encoded control markers; "
            "remove the control markers from the message text"
        )
    new_ids: list[int] = []
    cursor = 0
    for at, replacement in zip(positions, replacements, strict=True):
        new_ids += ids[cursor:at] + list(replacement)
        cursor = at + 1
    new_ids += ids[cursor:]
    return _rebuild(model_inputs, new_ids, ids, positions, replacements)


def append_tokens(model_inputs: dict[str, Any], extra: Sequence[int]) -> dict[str, Any]:
    """Append text tokens ``extra`` to a batch-1 processor output (ids, mask, type ids)."""
    if not extra:
        return model_inputs
    ids = model_inputs["input_ids"]
    out = dict(model_inputs)
    tail = torch.tensor([list(extra)], dtype=ids.dtype, device=ids.device)
    out["input_ids"] = torch.cat([ids, tail], dim=1)
    length = ids.shape[1]
    for key, value in model_inputs.items():
        if key == "input_ids" or not _per_token(key, value, length):
            continue
        fill = 1 if key == "attention_mask" else 0
        out[key] = torch.cat([value, torch.full_like(tail, fill, dtype=value.dtype)], dim=1)
    return out


def _rebuild(
    model_inputs: dict[str, Any],
    new_ids: list[int],
    old_ids: list[int],
    positions: list[int],
    replacements: Sequence[Sequence[int]],
) -> dict[str, Any]:
    ids = model_inputs["input_ids"]
    out = dict(model_inputs)
    out["input_ids"] = torch.tensor([new_ids], dtype=ids.dtype, device=ids.device)
    for key, value in model_inputs.items():
        if key == "input_ids" or not _per_token(key, value, len(old_ids)):
            continue
        fill = 1 if key == "attention_mask" else 0
        row = value[0].tolist()
        rebuilt: list[int] = []
        cursor = 0
        for at, replacement in zip(positions, replacements, strict=True):
            rebuilt += row[cursor:at] + [fill] * len(replacement)
            cursor = at + 1
        rebuilt += row[cursor:]
        out[key] = torch.tensor([rebuilt], dtype=value.dtype, device=value.device)
    return out


def _per_token(key: str, value: Any, length: int) -> bool:
    """Whether ``key`` is a ``[1, length]`` per-token tensor (attention mask or type ids)."""
    return (
        key in _PER_TOKEN_KEYS
        and torch.is_tensor(value)
        and value.dim() == 2
        and tuple(value.shape) == (1, length)
    )
