"""CLIP encoder backed by ``open_clip`` (optional: ``pip install "eta-guard[open-clip]"``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from eta_guard._device import (
    ALLOW_NEW_WEIGHTS,
    load_error,
    module_device,
    module_dtype,
    resolve_device,
    resolve_dtype,
)
from eta_guard.errors import InvalidInputError

if TYPE_CHECKING:
    from PIL import Image

#: Prefix that selects this backend from a single name string.
OPEN_CLIP_PREFIX = "open_clip:"
_SCHEMAS = ("hf-hub:", "local-dir:")

_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def import_open_clip() -> Any:
    """Import ``open_clip`` or say which extra installs it."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            'the open_clip CLIP backend needs open_clip_torch: pip install "eta-guard[open-clip]"'
        ) from e
    return open_clip


def parse_open_clip_name(name: str, pretrained: str | None = None) -> tuple[str, str | None]:
    """Split an open_clip name spec into ``(model_name, pretrained)``.

    Accepted: ``"ViT-B-32"`` with ``pretrained`` (a tag such as ``"laion2b_s34b_b79k"`` or a local
    checkpoint file), ``"open_clip:ViT-B-32/laion2b_s34b_b79k"``, ``"hf-hub:org/repo"``,
    ``"local-dir:/path"``, or a local directory holding ``open_clip_config.json``.

    Example:
        >>> parse_open_clip_name("open_clip:ViT-B-32/laion2b_s34b_b79k")
        ('ViT-B-32', 'laion2b_s34b_b79k')
    """
    spec = name.strip()
    if spec.startswith(OPEN_CLIP_PREFIX):
        spec = spec[len(OPEN_CLIP_PREFIX) :]
        if not spec.startswith(_SCHEMAS) and "/" in spec:
            spec, tag = spec.split("/", 1)
            if pretrained is not None and pretrained != tag:
                raise InvalidInputError(
                    f"open_clip name {name!r} names pretrained={tag!r} but pretrained={pretrained!r} "
                    "was also passed; give it once"
                )
            pretrained = tag
    if not spec:
        raise InvalidInputError(f"open_clip name {name!r} has no model name; e.g. 'ViT-B-32'")
    if spec.startswith(_SCHEMAS):
        if pretrained is not None:
            raise InvalidInputError(
                f"open_clip name {name!r} already says where the weights are; drop "
                f"pretrained={pretrained!r}"
            )
        return spec, None
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "open_clip_config.json")):
        return "local-dir:" + spec, None
    return spec, pretrained


class OpenCLIPEncoder:
    """Raw (unnormalised) CLIP embeddings from an open_clip model.

    Args:
        model: An open_clip ``CLIP`` model (``encode_image`` / ``encode_text``).
        preprocess: Its evaluation image transform (PIL -> ``Tensor[3, H, W]``).
        tokenizer: ``open_clip.get_tokenizer(model_name)``; truncates to its context length.
        name: A label for logs and reports.
    """

    def __init__(
        self, model: Any, preprocess: Any, tokenizer: Any, *, name: str = "open_clip"
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        length = getattr(tokenizer, "context_length", None) or getattr(
            model, "context_length", None
        )
        self.context_length = int(length or 77)

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        pretrained: str | None = None,
        device: str | torch.device | None = None,
        dtype: Any = None,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
    ) -> OpenCLIPEncoder:
        """Load with ``open_clip.create_model_and_transforms`` and ``open_clip.get_tokenizer``.

        ``model_kwargs`` feed ``create_model_and_transforms``; ``processor_kwargs`` feed
        ``get_tokenizer``. Pretrained tags download through the HF cache (offline: cache only).

        Raises:
            ImportError: open_clip is not installed.
            InvalidInputError: The model cannot be found or loaded.
        """
        open_clip = import_open_clip()
        model_name, tag = parse_open_clip_name(name, pretrained)
        target = resolve_device(device)
        resolved = resolve_dtype(dtype)
        kwargs = dict(model_kwargs or {})
        allow_new = kwargs.pop(ALLOW_NEW_WEIGHTS, False)
        if tag is None and not model_name.startswith(_SCHEMAS) and allow_new is not True:
            # open_clip builds a model with no weights at all then: a random CLIP, silently.
            raise InvalidInputError(
                f"open_clip model {model_name!r} was given no weights (pretrained=None), so it "
                "would be random; pass pretrained=<tag or checkpoint file>, an 'hf-hub:' / "
                "'local-dir:' name, or, only if you mean it, model_kwargs={'allow_new_weights': True}"
            )
        if isinstance(resolved, torch.dtype):  # "auto" / None: open_clip's default, float32
            if resolved not in _PRECISION:
                raise InvalidInputError(
                    f"dtype={dtype!r} is not supported by open_clip; use float32, bfloat16 or float16"
                )
            kwargs.setdefault("precision", _PRECISION[resolved])
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=tag, device=target, **kwargs
            )
            tokenizer = open_clip.get_tokenizer(model_name, **(processor_kwargs or {}))
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise load_error(
                "open_clip model", f"{model_name} (pretrained={tag!r})", e, trust_remote_code=True
            ) from e
        # A name parse_open_clip_name() reads back, so the spec can be saved and reloaded.
        label = model_name if tag is None else f"{model_name}/{tag}"
        return cls(model, preprocess, tokenizer, name=f"open_clip:{label}")

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Embed RGB images in one forward. Returns ``Tensor[n, d]`` (not normalised)."""
        pixels = torch.stack([self.preprocess(image) for image in images])
        pixels = pixels.to(self.device, module_dtype(self.model))
        return self.model.encode_image(pixels)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Embed texts in one forward; the tokenizer truncates to the context (77). ``Tensor[n, d]``."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens)
