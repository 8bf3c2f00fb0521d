"""Class 2 of issue 8, adapter side: the guard and the model must see the same pixels.

Written as an attacker would: an image whose pixels depend on the decoder (transparent pixels
that a decoder compositing on white shows as white and one dropping alpha as they are), an
animation whose later frames were never scored, and an image hidden in an earlier turn of a
client-supplied history. Random tiny models say nothing about safety: thresholds that flag
everything or nothing force each decision, so these tests prove the mechanics only.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain.agents import create_agent
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))
from langchain_eta import DEFAULT_REFUSAL, ETAGuardMiddleware, ETAInputGuard  # noqa: E402
from langchain_fixtures import FLAG_ALL, FLAG_NONE, lc_ckpt, lc_eta, lc_evaluator  # noqa: E402, F401
from llama_index_fixtures import li_ckpt, li_eta  # noqa: E402, F401

from eta_guard.errors import InvalidInputError  # noqa: E402


# ---------------------------------------------------------------- attack images
def alpha_trick_png() -> bytes:
    """Fully transparent noise: white to a decoder that composites alpha, noise to one that drops it."""
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.zeros((32, 32, 1), np.uint8)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def animated_gif() -> bytes:
    """A harmless first frame, then another frame that a first-frame check never sees."""
    frames = [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def naive_decode(data: bytes) -> np.ndarray:
    """How a model that ignores transparency decodes an image (drops the alpha channel)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class RecordingModel(GenericFakeChatModel):
    """A chat model that records the messages it is sent."""

    seen: list[Any] = []

    def _generate(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(list(messages))
        return super()._generate(messages, *args, **kwargs)


def _model() -> RecordingModel:
    return RecordingModel(messages=iter([AIMessage("It is a square.")] * 10), seen=[])


def _sent_images(messages: list[Any]) -> list[np.ndarray]:
    out = []
    for message in messages:
        for block in message.content_blocks:
            if block.get("type") == "image":
                out.append(naive_decode(base64.b64decode(block["base64"])))
    return out


@pytest.fixture
def scored(lc_evaluator, monkeypatch) -> list[np.ndarray]:  # noqa: F811
    """The images CLIP actually scores, recorded at the pre-evaluator."""
    seen: list[np.ndarray] = []
    real = lc_evaluator.pre.score_images

    def spy(images: Any, *args: Any, **kwargs: Any) -> Any:
        seen.extend(np.asarray(image.convert("RGB")) for image in images)
        return real(images, *args, **kwargs)

    monkeypatch.setattr(lc_evaluator.pre, "score_images", spy)
    return seen


def _evaluator(lc_evaluator, thresholds):  # noqa: F811
    return lc_evaluator.with_config(lc_evaluator.config.with_overrides(**thresholds))


def _image_message(data: bytes, mime: str = "image/png") -> HumanMessage:
    return HumanMessage(
        content=[
            {"type": "text", "text": "What is this?"},
            {"type": "image", "base64": b64(data), "mime_type": mime},
        ]
    )


# ---------------------------------------------------------------- LangChain input guard
def test_input_guard_forwards_exactly_the_pixels_it_scored(lc_evaluator, scored):  # noqa: F811
    model = _model()
    guard = ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_NONE), on_violation="replace")
    (guard | model).invoke([_image_message(alpha_trick_png())])
    sent = _sent_images(model.seen[0])
    assert len(sent) == len(scored) == 1
    assert np.array_equal(scored[0], naive_decode(alpha_trick_png()))  # CLIP saw the noise...
    assert np.array_equal(sent[0], scored[0])  # ...and so does the model, whatever its decoder


def test_input_guard_refuses_animations(lc_evaluator):  # noqa: F811
    guard = ETAInputGuard(evaluator=_evaluator(lc_evaluator, FLAG_NONE))
    with pytest.raises(InvalidInputError, match="animated"):
        guard.invoke([_image_message(animated_gif(), "image/gif")])


# ---------------------------------------------------------------- LangChain middleware
def _agent(model, evaluator, **kwargs):
    return create_agent(model=model, tools=[], middleware=[ETAGuardMiddleware(evaluator, **kwargs)])


def _history(data: bytes) -> list[Any]:
    """An image in an earlier user turn, an assistant turn after it, then a new question."""
    return [_image_message(data), AIMessage("A red square."), HumanMessage("Describe it again.")]


def test_middleware_checks_images_in_the_history(lc_evaluator, monkeypatch):  # noqa: F811
    model = _model()
    agent = _agent(model, _evaluator(lc_evaluator, FLAG_ALL), on_violation="replace")
    out = agent.invoke({"messages": _history(alpha_trick_png())})
    assert model.seen == [] and out["messages"][-1].text == DEFAULT_REFUSAL


def test_middleware_eta_rule_judges_history_images(lc_evaluator):  # noqa: F811
    model = _model()
    agent = _agent(model, _evaluator(lc_evaluator, FLAG_ALL), on_violation="replace", rule="eta")
    out = agent.invoke({"messages": _history(alpha_trick_png())})
    assert out["messages"][-1].text == DEFAULT_REFUSAL
    assert out["messages"][-1].response_metadata["eta_guard_verdict"]["pre_score"] is not None


@pytest.mark.parametrize("rule", ["each", "eta"])
def test_middleware_forwards_exactly_the_pixels_it_scored(lc_evaluator, scored, rule):  # noqa: F811
    model = _model()
    agent = _agent(model, _evaluator(lc_evaluator, FLAG_NONE), rule=rule)
    agent.invoke({"messages": _history(alpha_trick_png())})
    sent = _sent_images(model.seen[0])
    assert len(sent) == 1 and scored, "the history image must reach CLIP and the model"
    assert np.array_equal(sent[0], scored[-1])


def test_middleware_does_not_rescore_the_history(lc_evaluator, scored):  # noqa: F811
    agent = _agent(_model(), _evaluator(lc_evaluator, FLAG_NONE))
    state = agent.invoke({"messages": _history(alpha_trick_png())})
    assert len(scored) == 1
    for turn in range(3):  # a long chat: old images come from the cache, by content hash
        state = agent.invoke({"messages": [*state["messages"], HumanMessage(f"More {turn}?")]})
    assert len(scored) == 1


def test_middleware_refuses_animations(lc_evaluator):  # noqa: F811
    agent = _agent(_model(), _evaluator(lc_evaluator, FLAG_NONE))
    with pytest.raises(InvalidInputError, match="animated"):
        agent.invoke({"messages": [_image_message(animated_gif(), "image/gif")]})


# ---------------------------------------------------------------- LlamaIndex
def test_postprocessor_forwards_the_scored_image(li_eta, tmp_path, monkeypatch):  # noqa: F811
    from llama_index.core.schema import ImageNode, NodeWithScore
    from llama_index.postprocessor.eta import ETAImageSafetyPostprocessor

    from eta_guard.config import ETAConfig

    seen: list[np.ndarray] = []
    real = li_eta.evaluator.pre.score_images
    monkeypatch.setattr(
        li_eta.evaluator.pre,
        "score_images",
        lambda images, *a, **k: (seen.extend(np.asarray(i) for i in images), real(images, *a, **k))[
            1
        ],
    )
    path = tmp_path / "trick.png"
    path.write_bytes(alpha_trick_png())
    screen = ETAImageSafetyPostprocessor(evaluator=li_eta, config=ETAConfig(**FLAG_NONE))
    (kept,) = screen.postprocess_nodes([NodeWithScore(node=ImageNode(image_path=str(path)))])
    assert kept.node.image_path is None  # the LLM cannot go back to the file...
    sent = naive_decode(base64.b64decode(kept.node.image))  # ...it gets the scored pixels
    assert len(seen) == 1 and np.array_equal(sent, seen[0])


def test_llama_index_llm_refuses_animations(li_eta):  # noqa: F811
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.eta import ETAMultiModalLLM

    message = ChatMessage(
        role="user", blocks=[ImageBlock(image=animated_gif()), TextBlock(text="What is it?")]
    )
    with pytest.raises(InvalidInputError, match="animated"):
        ETAMultiModalLLM(eta=li_eta).chat([message])


def test_guards_refuse_too_many_images_before_decoding(lc_evaluator, monkeypatch):  # noqa: F811
    """The request limits hold where the guard decodes (it decodes before the engine would)."""
    import eta_guard.scored_images as scored_images

    decoded = []
    real = scored_images.load_image
    monkeypatch.setattr(
        scored_images, "load_image", lambda *a, **k: decoded.append(1) or real(*a, **k)
    )
    evaluator = _evaluator(lc_evaluator, {**FLAG_NONE, "max_images_per_request": 2})
    many = HumanMessage(
        content=[{"type": "image", "base64": b64(alpha_trick_png()), "mime_type": "image/png"}] * 3
    )
    with pytest.raises(InvalidInputError, match="max_images_per_request"):
        ETAInputGuard(evaluator=evaluator).invoke([many])
    with pytest.raises(InvalidInputError, match="max_images_per_request"):
        _agent(_model(), evaluator).invoke({"messages": [many]})
    assert decoded == []
