"""CLIP encoder backed by transformers (``CLIPModel`` + ``CLIPProcessor``, or any model with
``get_image_features`` / ``get_text_features`` such as SigLIP)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from eta_guard._device import load_pretrained, module_device, module_dtype

if TYPE_CHECKING:
    from PIL import Image

# A tokenizer without a real limit reports a huge sentinel as model_max_length.
_NO_LIMIT = 100_000


class TransformersCLIPEncoder:
    """Raw (unnormalised) CLIP embeddings from a transformers model.

    Args:
        model: A model with ``get_image_features`` and ``get_text_features`` (e.g. ``CLIPModel``).
        processor: Its processor (image processor + tokenizer), e.g. ``CLIPProcessor``.
        name: A label for logs and reports (usually the checkpoint id).
    """

    def __init__(self, model: Any, processor: Any, *, name: str = "clip") -> None:
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise TypeError(
                    f"{type(model).__name__} has no {method}(); load a CLIP-style dual encoder "
                    "(CLIPModel, SiglipModel, ...)"
                )
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.context_length = _context_length(model, processor)
        # SigLIP was trained on texts padded to the full length; CLIP pools at the EOS token.
        model_type = str(getattr(model.config, "model_type", ""))
        self._padding: bool | str = "max_length" if model_type.startswith("siglip") else True

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: Any = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
    ) -> TransformersCLIPEncoder:
        """Load with ``AutoModel`` / ``AutoProcessor.from_pretrained`` (HF cache or a local path).

        Raises:
            InvalidInputError: The checkpoint cannot be found or loaded (the message says why).
        """
        from transformers import AutoModel, AutoProcessor

        model, processor = load_pretrained(
            "CLIP model",
            name_or_path,
            AutoModel,
            AutoProcessor,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
            processor_kwargs=processor_kwargs,
        )
        return cls(model, processor, name=name_or_path)

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Embed RGB images in one forward. Returns ``Tensor[n, d]`` (not normalised)."""
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(self.device, module_dtype(self.model))
        return _features(self.model.get_image_features(pixel_values=pixel_values))

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Embed texts in one forward, truncated to the text context. Returns ``Tensor[n, d]``."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        batch = tokenizer(
            list(texts),
            padding=self._padding,
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        inputs = {
            k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")
        }
        return _features(self.model.get_text_features(**inputs))


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns output objects from ``get_*_features``; older versions a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot find the embedding in {type(output).__name__}")
    return pooled


def _context_length(model: Any, processor: Any) -> int:
    """Tokens the text tower accepts: the smaller of its position table and the tokenizer limit."""
    limits = []
    text_config = getattr(model.config, "text_config", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions))
    tokenizer = getattr(processor, "tokenizer", processor)
    max_len = getattr(tokenizer, "model_max_length", None)
    if max_len and max_len < _NO_LIMIT:
        limits.append(int(max_len))
    return min(limits) if limits else 77
