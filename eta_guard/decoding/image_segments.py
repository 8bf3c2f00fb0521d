"""LLaVA's prompt construction: the text between image placeholders is tokenized segment by segment.

The LLaVA code that trained LLaVA-1.5 and LLaVA-NeXT (``llava/mm_utils.py``,
``tokenizer_image_token``) splits the prompt at ``<image>`` and tokenizes each segment on its own,
so a SentencePiece tokenizer starts every segment after an image with ``▁``: the model was
trained on ``<image> ▁ <0x0A> ...``. transformers' processors tokenize the whole text at once and
(transformers 5, ``Metaspace(prepend_scheme="first")``) drop that ``▁``. For the families trained
that way (:data:`SEGMENTED_FAMILIES`) the text spans of the processor's ids are replaced by the
segments' own ids; the image slots, pixel values and everything else stay the processor's.
Other families keep the processor's ids: their own code tokenizes the whole text.
"""

from __future__ import annotations

from typing import Any

import torch

from eta_guard.errors import InvalidInputError

#: ``model_type`` of families whose reference code tokenizes each segment between images alone.
SEGMENTED_FAMILIES = frozenset({"llava", "llava_next"})

#: Per-token processor outputs: the mask is 1 and type ids are 0 ("text") on text tokens.
_PER_TOKEN_KEYS = ("attention_mask", "token_type_ids", "mm_token_type_ids")


def segment_ids(tokenizer: Any, text: str, placeholder: str, *, add_bos: bool) -> list[list[int]]:
    """The ids of each segment of ``text`` between ``placeholder``s, each tokenized alone.

    The first segment gets the tokenizer's special tokens when ``add_bos`` (as the reference's
    ``tokenizer(chunk)`` does); later ones none (the reference drops their BOS).
    """
    chunks = text.split(placeholder)
    out = []
    for i, chunk in enumerate(chunks):
        special = add_bos and i == 0
        out.append([int(t) for t in tokenizer(chunk, add_special_tokens=special)["input_ids"]])
    return out


def splice_segments(
    model_inputs: dict[str, Any], image_token_id: int, segments: list[list[int]]
) -> dict[str, Any]:
    """A batch-1 processor output whose text spans (between image-slot runs) are ``segments``.

    Per-token tensors are rebuilt: image positions keep the processor's values, text positions
    get 1 (attention mask) or 0 (type ids).

    Raises:
        InvalidInputError: the processor's text spans do not line up with the segments (a
            processor that does not expand each placeholder to one run of image slots).
    """
    ids = model_inputs["input_ids"][0].tolist()
    runs: list[tuple[int, int]] = []  # (start, end) of each maximal run of image slots
    for i, token in enumerate(ids):
        if token == image_token_id:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
    bounds = [0] + [x for run in runs for x in run] + [len(ids)]
    spans = [(bounds[k], bounds[k + 1]) for k in range(0, len(bounds), 2)]
    # Adjacent placeholders give an empty segment and merge their runs: match non-empty spans.
    texts = [s for s in spans if s[1] > s[0]]
    wanted = [s for s in segments if s]
    if len(texts) != len(wanted) or len(runs) > len(segments) - 1:
        raise InvalidInputError(
            f"the processor's prompt has {len(texts)} text spans around {len(runs)} image runs, "
            f"but the text has {len(wanted)} non-empty segments; cannot tokenize it as the "
            "reference does"
        )
    new_ids: list[int] = []
    source: list[int | None] = []  # old position of each new token (None: text)
    cursor = 0
    for (start, end), replacement in zip(texts, wanted, strict=True):
        new_ids += ids[cursor:start] + replacement
        source += list(range(cursor, start)) + [None] * len(replacement)
        cursor = end
    new_ids += ids[cursor:]
    source += list(range(cursor, len(ids)))
    out = dict(model_inputs)
    tensor = model_inputs["input_ids"]
    out["input_ids"] = torch.tensor([new_ids], dtype=tensor.dtype, device=tensor.device)
    for key in _PER_TOKEN_KEYS:
        value = model_inputs.get(key)
        if not (torch.is_tensor(value) and tuple(value.shape) == (1, len(ids))):
            continue
        fill = 1 if key == "attention_mask" else 0
        row = value[0].tolist()
        rebuilt = [fill if at is None else row[at] for at in source]
        out[key] = torch.tensor([rebuilt], dtype=value.dtype, device=value.device)
    return out
