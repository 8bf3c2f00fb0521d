"""``ETAImageSafetyPostprocessor``: drop or flag retrieved images ETA's CLIP check marks unsafe."""

from __future__ import annotations

from typing import Any, Literal

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle
from llama_index.llms.eta._loading import (
    Lazy,
    evaluator_source,
    lazy_evaluator,
    local_files_allowed,
)
from llama_index.llms.eta._messages import image_node_source, is_image_node

from eta_guard.config import DEFAULT_CLIP, ETAConfig
from eta_guard.errors import InvalidInputError

#: Metadata keys written on image nodes; kept out of the LLM prompt and of embeddings.
UNSAFE_KEY = "eta_image_unsafe"
SCORE_KEY = "eta_image_score"
ERROR_KEY = "eta_image_error"
_KEYS = (UNSAFE_KEY, SCORE_KEY, ERROR_KEY)


class ETAImageSafetyPostprocessor(BaseNodePostprocessor):
    """Node postprocessor that screens retrieved ``ImageNode``s with ETA's CLIP pre-evaluator.

    Every image node is scored in one batched CLIP forward (cosine with ETA's unsafe-content
    prompt); the engine's verdict marks it unsafe when the score reaches
    ``config.pre_threshold``. ``mode="drop"`` removes unsafe images before synthesis;
    ``mode="flag"`` keeps them and writes ``eta_image_unsafe`` / ``eta_image_score`` into the
    node's metadata (excluded from the LLM prompt and embeddings). Text nodes pass untouched.
    Every image node that goes on carries exactly the image that was scored: a metadata-free PNG
    in ``node.image`` (``image_path`` / ``image_url`` cleared), so the LLM after the filter never
    reads a file or URL that differs from, or changed after, what CLIP saw. Animated images are
    refused (they count as invalid). Local ``image_path``s are read unless
    ``allow_local_image_files=False`` (retrieved nodes are the application's own data).
    An image that cannot be loaded (corrupt, missing, a remote URL without
    ``allow_remote_images``) follows ``on_invalid_image``: treated as ``"unsafe"`` (default,
    fail-closed), ``"safe"``, or ``"raise"`` the engine's ``InvalidInputError``.

    Setup:
        .. code-block:: bash

            pip install "eta-guard[llama-index]"

    Instantiate (offline, on tiny random checkpoints):
        .. code-block:: python

            from eta_guard.testing import build_tiny_checkpoints
            from llama_index.postprocessor.eta import ETAImageSafetyPostprocessor

            ckpt = build_tiny_checkpoints("/tmp/eta-tiny")
            screen = ETAImageSafetyPostprocessor(clip=ckpt.clip, mode="flag")
            # or share weights: ETAImageSafetyPostprocessor(evaluator=llm)

    Use:
        .. code-block:: python

            from eta_guard.testing import make_test_image
            from llama_index.core.schema import ImageNode, NodeWithScore

            make_test_image("red").save("/tmp/eta-red.png")
            nodes = screen.postprocess_nodes([NodeWithScore(node=ImageNode(image_path="/tmp/eta-red.png"))])
            nodes[0].node.metadata["eta_image_score"]

    In a multimodal query engine (one set of weights for answers, retrieval and screening):
        .. code-block:: python

            from llama_index.core.indices import MultiModalVectorStoreIndex
            from llama_index.core.query_engine import RetrieverQueryEngine
            from llama_index.embeddings.eta import ETAClipEmbedding
            from llama_index.llms.eta import ETAMultiModalLLM

            llm = ETAMultiModalLLM(
                vlm=ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model, max_new_tokens=8
            )
            embed = ETAClipEmbedding(evaluator=llm)
            nodes = [ImageNode(image_path="/tmp/eta-red.png", metadata={"file_name": "red.png"})]
            index = MultiModalVectorStoreIndex(nodes, embed_model=embed, image_embed_model=embed)
            engine = RetrieverQueryEngine.from_args(
                index.as_retriever(image_similarity_top_k=1), llm=llm, multimodal=True,
                node_postprocessors=[ETAImageSafetyPostprocessor(evaluator=llm, mode="drop")],
            )
            engine.query("What is shown?").response
    """

    clip: str | None = Field(
        DEFAULT_CLIP, description="CLIP id or path (as in ETA.from_pretrained)."
    )
    config: ETAConfig | None = Field(
        None, description="Threshold and image limits (default: the engine's)."
    )
    mode: Literal["drop", "flag"] = Field(
        "drop", description="Drop unsafe images or flag them in metadata."
    )
    on_invalid_image: Literal["unsafe", "safe", "raise"] = Field(
        "unsafe", description="What an image that cannot be loaded counts as."
    )
    device: str | None = Field(None, description="Torch device for CLIP.")
    allow_local_image_files: bool | None = Field(
        None,
        description="Read image nodes' image_path (default: on unless config sets it off): retrieved nodes come from the application's "
        "own index, not from users. Turn it off when users can put paths into nodes.",
    )
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="More ETAEvaluator.from_pretrained arguments."
    )

    _evaluator: Lazy[Any] = PrivateAttr()

    def __init__(self, clip: str | None = None, *, evaluator: Any = None, **kwargs: Any) -> None:
        """Pass ``clip`` (id or path) or a ready ``evaluator`` (ETAEvaluator / ETA / ETAMultiModalLLM)."""
        if clip is not None and evaluator is not None:
            raise InvalidInputError("pass clip=<model id or path> or evaluator=..., not both")
        name = clip or (DEFAULT_CLIP if evaluator is None else None)
        super().__init__(clip=name, **kwargs)
        if evaluator is not None:
            self._evaluator = evaluator_source(
                evaluator, where="ETAImageSafetyPostprocessor(evaluator=...)"
            )
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
        return "ETAImageSafetyPostprocessor"

    def _evaluator_now(self) -> Any:
        evaluator = self._evaluator.get()
        return evaluator if self.config is None else evaluator.with_config(self.config)

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        _check_nodes(nodes)
        positions = [i for i, n in enumerate(nodes) if is_image_node(n.node)]
        if not positions:
            return list(nodes)
        evaluator = self._evaluator_now()
        judged, scored = judge_images(
            [nodes[i].node for i in positions],
            evaluator,
            self.on_invalid_image,
            allow_local_files=local_files_allowed(
                self.allow_local_image_files, evaluator.config, default=True
            ),
            text=query_bundle.query_str if query_bundle is not None else None,
        )
        decisions = dict(zip(positions, judged, strict=True))
        images = dict(zip(positions, scored, strict=True))
        out = []
        for i, item in enumerate(nodes):
            decision = decisions.get(i)
            if decision is None:
                out.append(item)
                continue
            node = forwarded(item.node, images[i])
            if self.mode == "flag":
                out.append(NodeWithScore(node=flagged(node, decision), score=item.score))
            elif not decision[UNSAFE_KEY]:
                out.append(NodeWithScore(node=node, score=item.score))
        return out


def _check_nodes(nodes: Any) -> None:
    if not isinstance(nodes, (list, tuple)):
        raise InvalidInputError(
            f"nodes must be a list of NodeWithScore, got {type(nodes).__qualname__}"
        )
    for i, item in enumerate(nodes):
        if not isinstance(item, NodeWithScore):
            raise InvalidInputError(
                f"nodes[{i}] is {type(item).__qualname__}, expected a NodeWithScore"
            )


def judge_images(
    nodes: list[ImageNode],
    evaluator: Any,
    on_invalid: str,
    *,
    allow_local_files: bool = True,
    text: str | None = None,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Per node: a metadata dict (``eta_image_unsafe``, ``eta_image_score``, the load error)
    and the ``ScoredImage`` that was scored (``None`` when it could not be loaded). ``text``
    (the query) is what the evaluator's gates read beside each image; CLIP never sees it.

    Images are decoded one by one (so one bad image names its node), then scored by the
    engine's ``evaluate_batch`` in a single CLIP forward; the engine's verdict decides.
    """
    from eta_guard.limits import RequestLimits
    from eta_guard.scored_images import load_scored_image, scored_options

    options = scored_options(evaluator.config, allow_local_files=allow_local_files)
    loaded: list[Any] = []
    errors: dict[int, str] = {}
    with RequestLimits.from_config(evaluator.config).pixel_budget():  # pixels over all nodes
        for i, node in enumerate(nodes):
            try:
                loaded.append(load_scored_image(image_node_source(node), **options))
            except InvalidInputError as e:
                if on_invalid == "raise":
                    raise InvalidInputError(f"image node {str(node.node_id)[:80]!r}: {e}") from e
                errors[i] = str(e)
                loaded.append(None)
    good = [s.image for s in loaded if s is not None]
    extra = {"text": text} if text else {}
    items = [{"images": [img], **extra} for img in good]
    verdicts = iter(evaluator.evaluate_batch(items) if good else [])
    out = []
    for i, image in enumerate(loaded):
        if image is None:
            out.append({UNSAFE_KEY: on_invalid == "unsafe", SCORE_KEY: None, ERROR_KEY: errors[i]})
        else:
            verdict = next(verdicts)
            out.append({UNSAFE_KEY: bool(verdict.input_unsafe), SCORE_KEY: verdict.pre_score})
    return out, loaded


def forwarded(node: ImageNode, image: Any) -> ImageNode:
    """A copy of ``node`` that carries exactly the scored image (inline PNG), or ``node`` as is
    when it could not be loaded (it is then dropped or flagged per ``on_invalid_image``).

    The original ``image_path`` / ``image_url`` are cleared, so that the LLM after the filter
    gets the pixels that were scored, not a file or URL that may differ or change.
    """
    if image is None:
        return node
    copy = node.model_copy()
    copy.image, copy.image_path, copy.image_url = image.base64, None, None
    copy.image_mimetype = "image/png"
    return copy


def flagged(node: ImageNode, decision: dict[str, Any]) -> ImageNode:
    """A copy of ``node`` whose metadata carries ``decision`` (kept out of prompts/embeddings)."""
    copy = node.model_copy()
    copy.metadata = {**node.metadata, **decision}
    copy.excluded_llm_metadata_keys = _merge(node.excluded_llm_metadata_keys)
    copy.excluded_embed_metadata_keys = _merge(node.excluded_embed_metadata_keys)
    return copy


def _merge(keys: list[str]) -> list[str]:
    return [*keys, *(k for k in _KEYS if k not in keys)]
