"""ETA's pre-generation evaluator: CLIP cosine between each image and an unsafe-content prompt."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from eta_guard.config import DEFAULT_SAFETY_PROMPT
from eta_guard.errors import InvalidInputError
from eta_guard.media import load_images

if TYPE_CHECKING:
    from PIL import Image

    from eta_guard.media import ImageSource

CLIPBackend = Literal["transformers", "open_clip"]
_OPEN_CLIP_SCHEMAS = ("open_clip:", "hf-hub:", "local-dir:")


class CLIPEncoder(Protocol):
    """What a CLIP backend provides: raw embeddings, in one forward per call."""

    name: str
    context_length: int

    @property
    def device(self) -> torch.device: ...

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """``Tensor[n, d]`` image embeddings (any norm)."""
        ...

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """``Tensor[n, d]`` text embeddings (any norm), truncated to ``context_length`` tokens."""
        ...


class CLIPPreEvaluator:
    """Scores images by CLIP cosine with an unsafe-content prompt (unsafe iff score >= threshold).

    Args:
        encoder: A :class:`CLIPEncoder` (transformers or open_clip backend).
        prompt: The default prompt; :meth:`score_images` can take another one.

    Example:
        >>> import tempfile
        >>> from eta_guard.testing import build_tiny_checkpoints, make_test_image
        >>> ckpt = build_tiny_checkpoints(tempfile.mkdtemp())
        >>> pre = CLIPPreEvaluator.from_pretrained(ckpt.clip, device="cpu")
        >>> scores = pre.score_images([make_test_image("red"), make_test_image("noise")])
        >>> len(scores), all(-1.0 <= s <= 1.0 for s in scores)
        (2, True)
        >>> pre.similarity(pre.embed_images([make_test_image()]), ["a cat.", "a dog."]).shape
        torch.Size([2])
    """

    def __init__(self, encoder: CLIPEncoder, *, prompt: str = DEFAULT_SAFETY_PROMPT) -> None:
        self.encoder = encoder
        self.prompt = prompt
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._cache_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        backend: CLIPBackend = "transformers",
        pretrained: str | None = None,
        device: str | torch.device | None = None,
        dtype: Any = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        prompt: str = DEFAULT_SAFETY_PROMPT,
    ) -> CLIPPreEvaluator:
        """Load a CLIP checkpoint.

        Args:
            name_or_path: HF id or local path (transformers), or an open_clip spec: a model name
                with ``pretrained``, ``"open_clip:ViT-B-32/laion2b_s34b_b79k"``,
                ``"hf-hub:org/repo"``, ``"local-dir:/path"`` or a folder holding
                ``open_clip_config.json`` (these select open_clip whatever ``backend`` says).
            backend: ``"transformers"`` or ``"open_clip"``.
            pretrained: open_clip only: a pretrained tag or a local checkpoint file.
            device: ``None``/``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:0"``...
            dtype: ``None``, ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``.
            local_files_only: transformers only: never touch the network.
            trust_remote_code: transformers only: allow the checkpoint's own code.
            model_kwargs: Extra arguments of the model loader.
            processor_kwargs: Extra arguments of the processor (open_clip: tokenizer) loader.
            prompt: Default unsafe-content prompt.
        """
        if backend not in ("transformers", "open_clip"):
            raise InvalidInputError(
                f"backend={backend!r} is not a CLIP backend; use 'transformers' or 'open_clip'"
            )
        if not isinstance(name_or_path, str) or not name_or_path.strip():
            raise InvalidInputError(
                f"CLIP name_or_path={name_or_path!r} must be a non-empty string"
            )
        if backend == "open_clip" or is_open_clip_name(name_or_path):
            from eta_guard.evaluators.clip_open_clip import OpenCLIPEncoder

            encoder: CLIPEncoder = OpenCLIPEncoder.from_pretrained(
                name_or_path,
                pretrained=pretrained,
                device=device,
                dtype=dtype,
                model_kwargs=model_kwargs,
                processor_kwargs=processor_kwargs,
            )
        else:
            if pretrained is not None:
                raise InvalidInputError(
                    f"pretrained={pretrained!r} is an open_clip option; pass backend='open_clip'"
                )
            from eta_guard.evaluators.clip_transformers import TransformersCLIPEncoder

            encoder = TransformersCLIPEncoder.from_pretrained(
                name_or_path,
                device=device,
                dtype=dtype,
                local_files_only=local_files_only,
                trust_remote_code=trust_remote_code,
                model_kwargs=model_kwargs,
                processor_kwargs=processor_kwargs,
            )
        return cls(encoder, prompt=prompt)

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def context_length(self) -> int:
        return self.encoder.context_length

    def embed_images(
        self, images: Sequence[ImageSource], *, batch_size: int | None = None
    ) -> torch.Tensor:
        """L2-normalised image embeddings, in forwards of at most ``batch_size`` images.

        Args:
            images: PIL images (or any source :func:`eta_guard.media.load_images` accepts).
            batch_size: Images per forward (``None``: all in one). Chunking bounds the memory
                of the vision tower's activations, which grows with the number of images.

        Returns:
            ``Tensor[n, d]``, float32, on the CPU.
        """
        pil = _as_pil(images)
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise InvalidInputError(f"batch_size={batch_size!r} must be a positive int or None")
        step = batch_size or len(pil)
        chunks = [
            _normalize(self.encoder.embed_images(pil[i : i + step]))
            for i in range(0, len(pil), step)
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, one forward, truncated to the text context (77).

        Returns:
            ``Tensor[n, d]``, float32, on the CPU; an empty list gives ``Tensor[0, 0]``.
        """
        items = _as_texts(texts)
        if not items:
            return torch.empty(0, 0)
        return _normalize(self.encoder.embed_texts(items))

    def prompt_embedding(self, prompt: str | None = None) -> torch.Tensor:
        """The cached, normalised embedding of ``prompt`` (default: :attr:`prompt`). ``Tensor[d]``."""
        text = self.prompt if prompt is None else prompt
        with self._cache_lock:
            cached = self._prompt_cache.get(text)
        if cached is None:
            cached = self.embed_texts([text])[0]
            with self._cache_lock:
                self._prompt_cache[text] = cached
        return cached

    def score_images(
        self,
        images: Sequence[ImageSource],
        *,
        prompt: str | None = None,
        batch_size: int | None = None,
    ) -> list[float]:
        """CLIP cosine of each image with ``prompt`` (batched; the prompt embedding is cached).

        Args:
            images: PIL images (or any accepted source).
            prompt: The unsafe-content prompt (default: :attr:`prompt`).
            batch_size: Images per forward (``None``: all in one); see :meth:`embed_images`.

        Returns:
            One float per image; ETA flags the request iff ``max(...) >= pre_threshold``.
        """
        image_embeds = self.embed_images(images, batch_size=batch_size)
        return (image_embeds @ self.prompt_embedding(prompt)).tolist()

    def similarity(self, image_embeds: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Max over images of the cosine with each text (best-of-N's CLIP term).

        Args:
            image_embeds: ``Tensor[m, d]`` from :meth:`embed_images` (normalised).
            texts: ``n`` candidate sentences, embedded in one batch.

        Returns:
            ``Tensor[n]``, float32, on the CPU.
        """
        if image_embeds.ndim != 2 or image_embeds.shape[0] == 0:
            raise InvalidInputError(
                f"image_embeds must be a non-empty Tensor[m, d] from embed_images(); got shape "
                f"{tuple(image_embeds.shape)}"
            )
        items = _as_texts(texts)
        if not items:
            return torch.empty(0)
        text_embeds = self.embed_texts(items)
        sims = image_embeds.to(text_embeds) @ text_embeds.T  # [m, n]
        return sims.max(dim=0).values


def is_open_clip_name(name: str) -> bool:
    """An open_clip spec, or a local folder saved by open_clip rather than transformers."""
    if name.startswith(_OPEN_CLIP_SCHEMAS):
        return True
    folder = Path(name).expanduser()
    return (folder / "open_clip_config.json").is_file() and not (folder / "config.json").is_file()


def _normalize(embeds: torch.Tensor) -> torch.Tensor:
    # Normalise in float32 so bf16/fp16 models give cosines comparable to the thresholds.
    embeds = embeds.detach().float().cpu()
    return embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _as_pil(images: Sequence[ImageSource]) -> list[Image.Image]:
    from PIL import Image

    if isinstance(images, Image.Image) or not isinstance(images, (list, tuple)):
        images = [images]  # type: ignore[list-item]
    if not images:
        raise InvalidInputError("no images given; pass at least one image")
    if all(isinstance(image, Image.Image) and image.mode == "RGB" for image in images):
        return list(images)
    return load_images(list(images))


def _as_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InvalidInputError(
            "texts must be a list of strings, not a single str; wrap it: [text]"
        )
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidInputError(f"texts[{i}] is {type(text).__name__}, expected str")
    return items
