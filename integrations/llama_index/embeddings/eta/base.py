"""``ETAClipEmbedding``: text and image embeddings from ETA's own CLIP checkpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from io import BytesIO
from typing import Any

from llama_index.core.base.embeddings.base import Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.embeddings.multi_modal_base import MultiModalEmbedding
from llama_index.core.schema import ImageType
from llama_index.llms.eta._loading import (
    Lazy,
    evaluator_source,
    lazy_evaluator,
    local_files_allowed,
)

from eta_guard.config import DEFAULT_CLIP, ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.model_thread import run_on, thread_for


class ETAClipEmbedding(MultiModalEmbedding):
    """Multimodal embedding from the CLIP checkpoint ETA's pre-evaluator uses.

    One CLIP then serves both retrieval (a ``MultiModalVectorStoreIndex``) and safety: pass
    ``evaluator=`` an ``ETAEvaluator``, an ``ETA`` or an ``ETAMultiModalLLM`` to share its
    weights, or ``clip=`` a model id/path to load CLIP alone (lazily, on first use). Embeddings
    are L2-normalised; texts are truncated to CLIP's 77-token context.

    Setup:
        .. code-block:: bash

            pip install "eta-guard[llama-index]"

    Instantiate (offline, on tiny random checkpoints):
        .. code-block:: python

            from eta_guard.testing import build_tiny_checkpoints
            from llama_index.embeddings.eta import ETAClipEmbedding

            ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
            embed = ETAClipEmbedding(clip=ckpt.clip)  # or ETAClipEmbedding(evaluator=llm)

    Embed:
        .. code-block:: python

            from eta_guard.testing import make_test_image

            make_test_image("red").save("/tmp/eta-red.png")
            embed.get_text_embedding("a red square")
            embed.get_image_embedding("/tmp/eta-red.png")

    Index images:
        .. code-block:: python

            from llama_index.core.indices import MultiModalVectorStoreIndex
            from llama_index.core.schema import ImageNode

            # Nodes need text or metadata: LlamaIndex does not index empty ones.
            nodes = [ImageNode(image_path="/tmp/eta-red.png", metadata={"file_name": "red.png"})]
            index = MultiModalVectorStoreIndex(nodes, embed_model=embed, image_embed_model=embed)
            index.as_retriever(image_similarity_top_k=1).retrieve("a red square")
    """

    clip: str | None = Field(
        DEFAULT_CLIP, description="CLIP id or path (as in ETA.from_pretrained)."
    )
    config: ETAConfig | None = Field(None, description="Image limits (max pixels, remote URLs).")
    device: str | None = Field(None, description="Torch device for CLIP.")
    allow_local_image_files: bool | None = Field(
        None,
        description="Read images from local paths (default: on unless config sets it off): LlamaIndex hands image *file paths* to an "
        "image embedding model while it builds an index from the application's own files. "
        "Turn it off when image paths can come from users (e.g. image queries).",
    )
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More ETAEvaluator.from_pretrained arguments (dtype, clip_backend, ...).",
    )

    _evaluator: Lazy[Any] = PrivateAttr()

    def __init__(self, clip: str | None = None, *, evaluator: Any = None, **kwargs: Any) -> None:
        """Pass ``clip`` (id or path) or a ready ``evaluator`` (ETAEvaluator / ETA / ETAMultiModalLLM)."""
        if clip is not None and evaluator is not None:
            raise InvalidInputError("pass clip=<model id or path> or evaluator=..., not both")
        name = clip or (DEFAULT_CLIP if evaluator is None else None)
        kwargs.setdefault("model_name", name or "eta-clip")
        super().__init__(clip=name, **kwargs)
        if evaluator is not None:
            self._evaluator = evaluator_source(evaluator, where="ETAClipEmbedding(evaluator=...)")
        else:
            self._evaluator = lazy_evaluator(
                clip=name,
                reward_model=None,
                config=self.config,
                device=self.device,
                **self.load_kwargs,
            )

    @classmethod
    def class_name(cls) -> str:
        return "ETAClipEmbedding"

    @property
    def pre(self) -> Any:
        """ETA's CLIP pre-evaluator (loaded on first access)."""
        pre = self._evaluator.get().pre
        if pre is None:
            raise InvalidInputError("the ETAEvaluator given to ETAClipEmbedding has no CLIP loaded")
        return pre

    # ------------------------------------------------------------------ text
    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        pre = self.pre  # its forward on CLIP's model thread (a remote CLIP's call stays here)
        return run_on(thread_for(pre), lambda: pre.embed_texts(list(texts)).tolist())

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._get_text_embedding(query)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        # A worker keeps the loop free (a first load, image decoding); forwards hop to CLIP's thread.
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._aget_text_embeddings([text]))[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await self._aget_text_embedding(query)

    # ------------------------------------------------------------------ images
    def _get_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        config = self.config or self._evaluator.get().config or ETAConfig()
        local = local_files_allowed(self.allow_local_image_files, config, default=True)
        images = load_for_clip(img_file_paths, config, allow_local_files=local)
        pre = self.pre
        return run_on(thread_for(pre), lambda: pre.embed_images(images).tolist())

    def _get_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return self._get_image_embeddings([img_file_path])[0]

    async def _aget_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_image_embeddings, img_file_paths)

    async def _aget_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return (await self._aget_image_embeddings([img_file_path]))[0]


def load_for_clip(
    sources: Sequence[ImageType], config: ETAConfig, *, allow_local_files: bool = True
) -> list[Any]:
    """Decode LlamaIndex image inputs (paths or ``BytesIO``) with the engine's checks."""
    from eta_guard.media import image_options, load_image

    out = []
    for i, source in enumerate(sources):
        if isinstance(source, BytesIO):
            source = source.getvalue()
        try:
            options = {**image_options(config), "allow_local_files": allow_local_files}
            out.append(load_image(source, **options))
        except InvalidInputError as e:
            raise InvalidInputError(f"image {i} of {len(sources)}: {e}") from e
    return out
