"""What the VLM sees of a conversation: ``ETAConfig.system_prompt`` and ``pad_images_to_square``.

Applied to the VLM's copy of the conversation only. CLIP scores the images as given (the
reference feeds CLIP the raw image, and pads only for LLaVA), and the reward model never sees
the conversation.

System text rule: ``system_prompt`` is a *default*. A conversation that carries its own system
message keeps it, alone (as chat templates with a built-in default system text do, e.g.
Qwen2-VL's). The system text is then rendered by the family's chat template: llava-hf's template
writes a system turn's text before ``USER:``, which gives the reference ``llava_v1`` layout
``"<system> USER: <image>\\n<question> ASSISTANT:"``; templates without a system role get it
folded into the first user turn (:func:`eta_guard.messages.fold_system_message`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eta_guard.errors import InvalidInputError

if TYPE_CHECKING:
    from PIL import Image

    from eta_guard.config import ETAConfig
    from eta_guard.messages import Conversation


def expand_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """Pad ``image`` to a square with ``color``, the original centred (LLaVA's expand2square).

    A square image is returned unchanged; otherwise the short side is padded, with the image
    pasted at offset ``(long - short) // 2``.
    """
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


@dataclass(frozen=True)
class ImageMean:
    """What ``pad_images_to_square`` needs of a VLM image processor that runs elsewhere (an
    engine): its ``image_mean``, three floats in [0, 1]. ``pad_color`` reads it like a processor.
    """

    image_mean: tuple[float, float, float]

    @classmethod
    def of(cls, values: Sequence[float]) -> ImageMean:
        """Validate ``values`` (three numbers in [0, 1]).

        Raises:
            InvalidInputError: not three numbers in [0, 1].
        """
        try:
            mean = tuple(float(v) for v in values)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"image_mean={values!r}: give three floats in [0, 1]") from e
        if len(mean) != 3 or not all(0.0 <= v <= 1.0 for v in mean):
            raise InvalidInputError(f"image_mean={values!r}: give three floats in [0, 1]")
        return cls(mean)


def pad_color(processor: Any) -> tuple[int, int, int]:
    """The image processor's mean as an RGB colour, ``int(mean * 255)`` as the reference does.

    Raises:
        InvalidInputError: The processor has no ``image_mean`` of three values.
    """
    if processor is None:
        raise InvalidInputError(
            "pad_images_to_square=True needs the VLM image processor's image_mean; with an "
            "engine, give the served model's processor (its path or id, as tokenizer=) or "
            "image_mean=, or use preset='paper' (LLaVA-1.5's mean); else set "
            "pad_images_to_square=False"
        )
    image_processor = getattr(processor, "image_processor", processor)
    mean = getattr(image_processor, "image_mean", None)
    if mean is None or len(mean) != 3:
        raise InvalidInputError(
            f"pad_images_to_square=True needs the VLM image processor's image_mean (3 values); "
            f"{type(image_processor).__name__} has {mean!r}; set pad_images_to_square=False"
        )
    return tuple(int(float(x) * 255) for x in mean)  # type: ignore[return-value]


def for_vlm(conversation: Conversation, config: ETAConfig, processor: Any) -> Conversation:
    """The conversation as the VLM should see it under ``config`` (the input is not modified)."""
    messages = conversation.messages
    images = conversation.images
    changed = False
    if config.system_prompt and not any(m.get("role") == "system" for m in messages):
        system = {"role": "system", "content": [{"type": "text", "text": config.system_prompt}]}
        messages = [system, *messages]
        changed = True
    if config.pad_images_to_square and images:
        color = pad_color(processor)
        for i, image in enumerate(images):
            # A thin strip passes the pixel limit but its square may not (1 x 40M -> 1.6e15 px).
            side = max(image.size)
            if side * side > config.max_image_pixels:
                raise InvalidInputError(
                    f"image {i} is {image.size[0]}x{image.size[1]}; padded to a square it would "
                    f"have {side * side} pixels, over max_image_pixels={config.max_image_pixels}; "
                    "send a less elongated image, or set pad_images_to_square=False"
                )
        images = [expand_to_square(image, color) for image in images]
        changed = True
    if not changed:
        return conversation
    # replace() keeps the tools and response format the conversation carries.
    return dataclasses.replace(conversation, messages=list(messages), images=list(images))
