"""ETAClipEmbedding, ETAImageSafetyPostprocessor and ETASafetyEvaluator, alone and inside a real
multimodal ``RetrieverQueryEngine`` over a ``MultiModalVectorStoreIndex`` of generated images.

Random tiny checkpoints say nothing about safety: decisions are forced with thresholds.
"""

# Fixtures are imported from llama_index_fixtures, so their use as arguments "redefines" them.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from llama_index.core.base.response.schema import Response
from llama_index.core.evaluation import BatchEvalRunner
from llama_index.core.indices import MultiModalVectorStoreIndex
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import ImageNode, NodeWithScore, TextNode
from llama_index.embeddings.eta import ETAClipEmbedding
from llama_index.evaluation.eta import ETASafetyEvaluator
from llama_index.evaluation.eta.base import feedback, to_evaluation_result
from llama_index.llms.eta import ETAMultiModalLLM
from llama_index.postprocessor.eta import ETAImageSafetyPostprocessor

from eta_guard import ETAConfig, SafetyVerdict
from eta_guard.errors import InvalidInputError

sys.path.insert(0, str(Path(__file__).parent))
from llama_index_fixtures import (  # noqa: E402, F401
    FAST,
    FLAG_ALL,
    FLAG_NONE,
    IMAGE_KINDS,
    image_dir,
    li_ckpt,
    li_eta,
    li_llm,
    offline_settings,
    png_b64,
    png_bytes,
)

ETA_KEYS = ("eta_image_unsafe", "eta_image_score")
# LlamaIndex's own BatchEvalRunner still calls its deprecated asyncio_module().
pytestmark = pytest.mark.filterwarnings("ignore:asyncio_module:DeprecationWarning")


def _image_nodes(folder: Path) -> list[ImageNode]:
    return [
        ImageNode(image_path=str(p), metadata={"file_name": p.name})
        for p in sorted(folder.glob("*.png"))
    ]


def _with_scores(nodes: list[Any]) -> list[NodeWithScore]:
    return [NodeWithScore(node=n, score=1.0 - i / 10) for i, n in enumerate(nodes)]


@pytest.fixture(scope="module")
def index(li_eta, image_dir) -> MultiModalVectorStoreIndex:
    embed = ETAClipEmbedding(evaluator=li_eta)
    nodes = [*_image_nodes(image_dir), TextNode(text="The squares are painted in bright colors.")]
    return MultiModalVectorStoreIndex(nodes, embed_model=embed, image_embed_model=embed)


@pytest.fixture
def engine_calls(li_eta, monkeypatch) -> list[list[dict]]:
    """Records the engine messages of every ETA call (the LLM's view of the prompt)."""
    calls: list[list[dict]] = []
    real_stream, real_astream = li_eta.stream, li_eta.astream

    def stream(messages, **kw):
        calls.append(messages)
        return real_stream(messages, **kw)

    def astream(messages, **kw):
        calls.append(messages)
        return real_astream(messages, **kw)

    monkeypatch.setattr(li_eta, "stream", stream)
    monkeypatch.setattr(li_eta, "astream", astream)
    return calls


def _parts(calls: list[list[dict]], kind: str) -> list[Any]:
    return [
        part
        for messages in calls
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == kind
    ]


# ---------------------------------------------------------------------------- embedding
def test_embedding_is_the_pre_evaluators_clip(li_eta, li_ckpt, image_dir):
    shared = ETAClipEmbedding(evaluator=li_eta)
    alone = ETAClipEmbedding(clip=li_ckpt.clip)
    assert not alone._evaluator.loaded  # lazy
    path = str(image_dir / "red.png")
    expected = li_eta.evaluator.pre.embed_images([path])[0]
    for embed in (shared, alone):
        image = torch.tensor(embed.get_image_embedding(path))
        assert torch.allclose(image, expected, atol=1e-5)
        text = torch.tensor(embed.get_text_embedding("a red square"))
        assert text.shape == expected.shape and abs(text.norm().item() - 1) < 1e-4
    assert shared.pre is li_eta.evaluator.pre


def test_embedding_batches_bytesio_and_async(li_eta, image_dir):
    embed = ETAClipEmbedding(evaluator=li_eta, embed_batch_size=2)
    paths = [str(p) for p in sorted(image_dir.glob("*.png"))]
    batch = embed.get_image_embedding_batch(paths)
    assert len(batch) == len(IMAGE_KINDS)
    from_bytes = embed.get_image_embedding(io.BytesIO((image_dir / "noise.png").read_bytes()))
    assert torch.allclose(
        torch.tensor(from_bytes),
        torch.tensor(batch[paths.index(str(image_dir / "noise.png"))]),
        atol=1e-5,
    )
    texts = embed.get_text_embedding_batch(["a", "b", "c"])
    query = embed.get_query_embedding("a")
    assert torch.allclose(torch.tensor(texts[0]), torch.tensor(query), atol=1e-6)

    async def run():
        return await embed.aget_image_embedding(paths[0]), await embed.aget_query_embedding("a")

    a_image, a_query = asyncio.run(run())
    assert torch.allclose(torch.tensor(a_image), torch.tensor(batch[0]), atol=1e-5)
    assert torch.allclose(torch.tensor(a_query), torch.tensor(query), atol=1e-6)


def test_embedding_forwards_run_on_clips_model_thread(li_eta, image_dir):
    import threading

    from eta_guard.model_thread import model_thread

    embed = ETAClipEmbedding(evaluator=li_eta)
    seen: list[int] = []
    handles = [
        m.register_forward_pre_hook(lambda *_: seen.append(threading.get_ident()))
        for m in li_eta.evaluator.pre.encoder.model.modules()
    ]
    try:
        embed.get_text_embedding("a red square")
        asyncio.run(embed.aget_image_embedding(str(image_dir / "red.png")))
    finally:
        for handle in handles:
            handle.remove()
    assert seen and set(seen) == {model_thread("cpu").ident}


def test_embedding_shares_an_llms_engine_lazily(li_ckpt):
    llm = ETAMultiModalLLM(vlm=li_ckpt.vlm, clip=li_ckpt.clip, reward_model=li_ckpt.reward_model)
    embed = ETAClipEmbedding(evaluator=llm)
    assert not llm._engine.loaded
    embed.get_text_embedding("load now")
    assert llm._engine.loaded and embed.pre is llm.engine.evaluator.pre


def test_embedding_refuses_bad_images_and_remote_urls(li_eta, monkeypatch):
    import eta_guard.media

    monkeypatch.setattr(
        eta_guard.media, "fetch_bytes", lambda *a, **k: pytest.fail("network access")
    )
    embed = ETAClipEmbedding(evaluator=li_eta)
    with pytest.raises(InvalidInputError, match="not an image"):
        embed.get_image_embedding(io.BytesIO(b"not an image at all"))
    with pytest.raises(InvalidInputError, match="remote"):
        embed.get_image_embedding("https://example.com/cat.png")
    with pytest.raises(InvalidInputError, match="not both"):
        ETAClipEmbedding(clip="x", evaluator=li_eta)
    with pytest.raises(InvalidInputError, match="expected an ETAEvaluator"):
        ETAClipEmbedding(evaluator="not an evaluator")


# ---------------------------------------------------------------------------- postprocessor
def _mixed_nodes(image_dir: Path) -> list[NodeWithScore]:
    return _with_scores(
        [
            ImageNode(image_path=str(image_dir / "red.png")),
            TextNode(text="a text chunk"),
            ImageNode(image=png_b64("blue")),
        ]
    )


@pytest.mark.parametrize(
    ("mode", "thresholds", "kept_images", "flag"),
    [
        ("drop", FLAG_ALL, 0, None),
        ("drop", FLAG_NONE, 2, None),
        ("flag", FLAG_ALL, 2, True),
        ("flag", FLAG_NONE, 2, False),
    ],
    ids=["drop-all", "drop-none", "flag-all", "flag-none"],
)
def test_postprocessor_modes(li_eta, image_dir, mode, thresholds, kept_images, flag):
    nodes = _mixed_nodes(image_dir)
    screen = ETAImageSafetyPostprocessor(
        evaluator=li_eta, mode=mode, config=ETAConfig(**FAST, **thresholds)
    )
    out = screen.postprocess_nodes(nodes)
    images = [n for n in out if isinstance(n.node, ImageNode)]
    assert len(images) == kept_images
    assert [n.node.text for n in out if not isinstance(n.node, ImageNode)] == ["a text chunk"]
    # Order and retrieval scores are kept.
    assert [n.score for n in out] == sorted((n.score for n in out), reverse=True)
    for item in images:
        meta = item.node.metadata
        if flag is None:
            assert not set(ETA_KEYS) & set(meta)
        else:
            assert meta["eta_image_unsafe"] is flag and isinstance(meta["eta_image_score"], float)
            # The flags stay out of the LLM prompt and of embeddings.
            assert set(ETA_KEYS) <= set(item.node.excluded_llm_metadata_keys)
            assert set(ETA_KEYS) <= set(item.node.excluded_embed_metadata_keys)
    assert all(not set(ETA_KEYS) & set(n.node.metadata) for n in nodes)  # inputs untouched


def test_postprocessor_scores_match_the_engine(li_eta, image_dir):
    screen = ETAImageSafetyPostprocessor(evaluator=li_eta, mode="flag")
    out = screen.postprocess_nodes(_mixed_nodes(image_dir))
    scores = [n.node.metadata["eta_image_score"] for n in out if isinstance(n.node, ImageNode)]
    expected = li_eta.evaluator.score_images([image_dir / "red.png", png_bytes("blue")])
    assert scores == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("policy", "kept", "flag"),
    [("unsafe", 1, True), ("safe", 2, False)],
)
def test_postprocessor_invalid_images_follow_the_policy(
    li_eta, image_dir, monkeypatch, policy, kept, flag
):
    import eta_guard.media

    monkeypatch.setattr(
        eta_guard.media, "fetch_bytes", lambda *a, **k: pytest.fail("network access")
    )
    nodes = _with_scores(
        [
            ImageNode(image_path=str(image_dir / "red.png")),
            ImageNode(image_url="https://example.com/x.png"),
        ]
    )
    config = ETAConfig(**FAST, **FLAG_NONE)
    dropped = ETAImageSafetyPostprocessor(evaluator=li_eta, on_invalid_image=policy, config=config)
    assert len(dropped.postprocess_nodes(nodes)) == kept
    flagged = ETAImageSafetyPostprocessor(
        evaluator=li_eta, mode="flag", on_invalid_image=policy, config=config
    ).postprocess_nodes(nodes)
    meta = flagged[1].node.metadata
    assert meta["eta_image_unsafe"] is flag and meta["eta_image_score"] is None
    assert "remote" in meta["eta_image_error"]


def test_postprocessor_raise_policy_names_the_node(li_eta):
    node = ImageNode(id_="bad-node", image="bm90IGFuIGltYWdl")  # base64 of "not an image"
    screen = ETAImageSafetyPostprocessor(evaluator=li_eta, on_invalid_image="raise")
    with pytest.raises(InvalidInputError, match="bad-node"):
        screen.postprocess_nodes([NodeWithScore(node=node)])


def test_postprocessor_loads_clip_lazily_and_runs_async(li_ckpt, image_dir):
    screen = ETAImageSafetyPostprocessor(clip=li_ckpt.clip, mode="flag")
    assert not screen._evaluator.loaded
    assert screen.postprocess_nodes([NodeWithScore(node=TextNode(text="t"))])[0].node.text == "t"
    assert not screen._evaluator.loaded  # no image, no CLIP
    out = asyncio.run(screen.apostprocess_nodes(_mixed_nodes(image_dir)))
    assert screen._evaluator.loaded and "eta_image_score" in out[0].node.metadata


# ---------------------------------------------------------------------------- evaluator
def _verdict(**kw: Any) -> SafetyVerdict:
    return SafetyVerdict.combine(pre_threshold=0.16, post_threshold=0.06, **kw)


@pytest.mark.parametrize(
    ("verdict", "passing", "phrases"),
    [
        (
            _verdict(pre_score=0.3, post_score=-1.0),
            False,
            ["unsafe.", "CLIP score 0.3000", "reward -1.0000"],
        ),
        (_verdict(pre_score=0.3, post_score=1.0), True, ["safe.", "Response: reward 1.0000"]),
        (
            _verdict(post_score=-1.0, skipped={"pre": "no image given"}),
            False,
            ["pre check skipped: no image given"],
        ),
        (_verdict(pre_score=0.0), True, ["Image: CLIP score 0.0000 vs threshold 0.16"]),
        (
            _verdict(input_unsafe=True, errors={"pre": "CLIP failed"}),
            False,
            ["pre check failed: CLIP failed"],
        ),
    ],
    ids=["both-unsafe", "image-only-unsafe", "response-only", "image-only-safe", "failed-closed"],
)
def test_evaluation_result_from_verdict(verdict, passing, phrases):
    result = to_evaluation_result(verdict, query="q", response="r", contexts=["c"])
    assert result.passing is passing and result.score == (1.0 if passing else 0.0)
    assert all(p in result.feedback for p in phrases), result.feedback
    assert result.feedback == feedback(verdict)
    assert result.verdict == verdict.model_dump()
    assert result.invalid_result is bool(verdict.errors)
    assert (result.query, result.response, result.contexts) == ("q", "r", ["c"])


@pytest.mark.parametrize(("thresholds", "passing"), [(FLAG_ALL, False), (FLAG_NONE, True)])
def test_evaluator_alone(li_eta, image_dir, thresholds, passing):
    evaluator = ETASafetyEvaluator(evaluator=li_eta, config=ETAConfig(**FAST, **thresholds))
    result = evaluator.evaluate(
        query="What is it?", response="A red square.", image_paths=[str(image_dir / "red.png")]
    )
    assert result.passing is passing and result.score == float(passing)
    assert result.verdict["pre_score"] is not None and result.verdict["post_score"] is not None
    assert "ETA verdict" in result.feedback


def test_evaluator_loads_from_model_paths(li_ckpt, image_dir):
    evaluator = ETASafetyEvaluator(clip=li_ckpt.clip, reward_model=li_ckpt.reward_model)
    result = asyncio.run(evaluator.aevaluate(response="Fine.", images=[png_bytes("green")]))
    assert len(result.verdict["image_scores"]) == 1
    with pytest.raises(InvalidInputError, match="nothing to evaluate"):
        evaluator.evaluate(query="only a query")
    with pytest.raises(InvalidInputError, match="not both"):
        ETASafetyEvaluator(clip="x", evaluator=li_ckpt)


def test_evaluator_in_batch_eval_runner(li_eta, image_dir):
    evaluator = ETASafetyEvaluator(evaluator=li_eta, config=ETAConfig(**FAST, **FLAG_ALL))
    runner = BatchEvalRunner({"safety": evaluator}, workers=2)
    results = runner.evaluate_response_strs(
        queries=["q1", "q2", "q3"],
        response_strs=["a1", "a2", "a3"],
        image_paths=[
            [str(image_dir / "red.png")],
            [],
            [str(image_dir / "red.png"), str(image_dir / "blue.png")],
        ],
    )["safety"]
    assert [r.query for r in results] == ["q1", "q2", "q3"]
    assert [len(r.verdict["image_scores"]) for r in results] == [1, 0, 2]
    assert all(r.passing is False for r in results)  # FLAG_ALL: every side is unsafe


def test_evaluate_response_uses_the_source_images(li_eta, image_dir):
    evaluator = ETASafetyEvaluator(evaluator=li_eta)
    source = _with_scores([*_image_nodes(image_dir)[:2], TextNode(text="t")])
    response = Response(response="Two squares.", source_nodes=source)
    result = evaluator.evaluate_response(query="What?", response=response)
    assert len(result.verdict["image_scores"]) == 2
    runner = BatchEvalRunner({"safety": evaluator}, workers=2)
    batch = asyncio.run(runner.aevaluate_responses(queries=["What?"], responses=[response]))
    assert batch["safety"][0].verdict["image_scores"] == result.verdict["image_scores"]
    text_only = ETASafetyEvaluator(evaluator=li_eta, use_source_images=False)
    assert (
        text_only.evaluate_response(query="What?", response=response).verdict["image_scores"] == []
    )


# ---------------------------------------------------------------------------- the query engine
def test_multimodal_query_engine(offline_settings, index, li_llm, engine_calls):
    retriever = index.as_retriever(similarity_top_k=1, image_similarity_top_k=2)
    engine = RetrieverQueryEngine.from_args(retriever, llm=li_llm, multimodal=True)
    response = engine.query("What color are the squares?")
    assert response.response and response.response != "Empty Response"
    kinds = [type(n.node).__name__ for n in response.source_nodes]
    assert kinds.count("ImageNode") == 2 and kinds.count("TextNode") == 1
    # The retrieved images reached the VLM as images, and the retrieved text as text.
    assert len(_parts(engine_calls, "image")) == 2
    assert any("bright colors" in p["text"] for p in _parts(engine_calls, "text"))


@pytest.mark.parametrize(
    ("mode", "thresholds", "images_seen", "unsafe_flag"),
    [("drop", FLAG_ALL, 0, None), ("drop", FLAG_NONE, 2, None), ("flag", FLAG_ALL, 2, True)],
    ids=["drop-all", "keep-all", "flag-all"],
)
def test_query_engine_with_the_postprocessor(
    offline_settings, index, li_llm, engine_calls, mode, thresholds, images_seen, unsafe_flag
):
    screen = ETAImageSafetyPostprocessor(
        evaluator=li_llm, mode=mode, config=ETAConfig(**FAST, **thresholds)
    )
    retriever = index.as_retriever(similarity_top_k=1, image_similarity_top_k=2)
    engine = RetrieverQueryEngine.from_args(
        retriever, llm=li_llm, multimodal=True, node_postprocessors=[screen]
    )
    response = engine.query("What color are the squares?")
    images = [n for n in response.source_nodes if isinstance(n.node, ImageNode)]
    assert len(images) == images_seen == len(_parts(engine_calls, "image"))
    if unsafe_flag is not None:
        assert all(n.node.metadata["eta_image_unsafe"] is unsafe_flag for n in images)
        assert not any("eta_image" in p["text"] for p in _parts(engine_calls, "text"))


def test_query_engine_async_and_streaming(offline_settings, index, li_llm):
    retriever = index.as_retriever(similarity_top_k=1, image_similarity_top_k=1)
    engine = RetrieverQueryEngine.from_args(retriever, llm=li_llm, multimodal=True)
    answer = engine.query("Describe the image.").response
    assert asyncio.run(engine.aquery("Describe the image.")).response == answer
    streaming = RetrieverQueryEngine.from_args(
        retriever, llm=li_llm, multimodal=True, streaming=True
    )
    pieces = list(streaming.query("Describe the image.").response_gen)
    assert len(pieces) > 1 and "".join(pieces) == answer

    async def astream() -> list[str]:
        response = await streaming.aquery("Describe the image.")
        return [piece async for piece in response.async_response_gen()]

    pieces = asyncio.run(astream())
    assert len(pieces) > 1 and "".join(pieces) == answer


def test_query_engine_answer_scored_by_the_evaluator(offline_settings, index, li_llm):
    retriever = index.as_retriever(similarity_top_k=1, image_similarity_top_k=2)
    engine = RetrieverQueryEngine.from_args(retriever, llm=li_llm, multimodal=True)
    response = engine.query("What color are the squares?")
    result = ETASafetyEvaluator(evaluator=li_llm).evaluate_response(query="q", response=response)
    assert result.response == response.response
    assert len(result.verdict["image_scores"]) == 2 and result.passing in (True, False)


@pytest.mark.filterwarnings("ignore:Call to deprecated class SimpleMultiModalQueryEngine")
def test_index_as_query_engine_legacy_path(offline_settings, index, li_llm, engine_calls):
    """``index.as_query_engine`` (SimpleMultiModalQueryEngine, being retired) also works: it
    wants "multi" in the LLM's class name and sends the images as ImageBlocks to ``chat``."""
    engine = index.as_query_engine(llm=li_llm, image_similarity_top_k=2)
    response = engine.query("What color are the squares?")
    assert response.response
    assert len(response.metadata["image_nodes"]) == 2 == len(_parts(engine_calls, "image"))


def test_allow_local_image_files_false_is_honoured(li_eta, image_dir):
    """ETAConfig(allow_local_image_files=False) refuses paths here as it does in the engine."""
    config = ETAConfig(**FAST, allow_local_image_files=False)
    path = str(image_dir / "red.png")
    with pytest.raises(
        InvalidInputError, match="image path refused|local image files are disabled"
    ):
        ETAClipEmbedding(evaluator=li_eta, config=config).get_image_embedding(path)
    screen = ETAImageSafetyPostprocessor(evaluator=li_eta, config=config, on_invalid_image="raise")
    with pytest.raises(
        InvalidInputError, match="image path refused|local image files are disabled"
    ):
        screen.postprocess_nodes(_with_scores([ImageNode(image_path=path)]))
    with pytest.raises(
        InvalidInputError, match="image path refused|local image files are disabled"
    ):
        li_eta.evaluator.with_config(config).evaluate(images=[path])  # the engine, for reference
