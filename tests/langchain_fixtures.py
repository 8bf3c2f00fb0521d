"""Shared helpers of the ``test_langchain_*`` tests (imported by path: tests are not a package)."""

from __future__ import annotations

import base64
import threading
from typing import Any

import pytest

from eta_guard.verdict import ETAResult, ETAStreamChunk, SafetyVerdict, TokenUsage

#: ETA knobs that keep the tiny model fast in tests.
FAST = {"max_new_tokens": 8, "num_candidates": 2, "max_sentence_tokens": 6, "seed": 0}
#: Thresholds that flag everything / nothing (random tiny models say nothing about safety).
FLAG_ALL = {"pre_threshold": -2.0, "post_threshold": 1e9}
FLAG_NONE = {"pre_threshold": 2.0, "post_threshold": -1e9}


@pytest.fixture(scope="session")
def lc_ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The suite's tiny checkpoints (``tiny_checkpoints`` from conftest when there is one)."""
    try:
        return request.getfixturevalue("tiny_checkpoints")
    except pytest.FixtureLookupError:
        from eta_guard.testing import build_tiny_checkpoints

        return build_tiny_checkpoints(tmp_path_factory.mktemp("lc-tiny"))


@pytest.fixture(scope="session")
def lc_eta(lc_ckpt: Any) -> Any:
    """One loaded ETA engine shared by the LangChain tests."""
    from eta_guard import ETA, ETAConfig

    config = ETAConfig(num_candidates=2, max_sentence_tokens=6, max_new_tokens=8, seed=0)
    return ETA.from_pretrained(
        lc_ckpt.vlm, clip=lc_ckpt.clip, reward_model=lc_ckpt.reward_model, config=config
    )


@pytest.fixture(scope="session")
def lc_evaluator(lc_eta: Any) -> Any:
    """The shared engine's ETAEvaluator (CLIP + RM)."""
    return lc_eta.evaluator


def png_bytes(kind: str = "red") -> bytes:
    from eta_guard.testing import image_to_bytes, make_test_image

    return image_to_bytes(make_test_image(kind))


def png_b64(kind: str = "red") -> str:
    return base64.b64encode(png_bytes(kind)).decode()


class FakeETA:
    """Stands in for ``eta_guard.ETA``: answers ``reply`` in pieces and records every call."""

    model_name = "fake-vlm"

    def __init__(self, reply: str = "A red square. It is plain.", *, aligned: bool = False) -> None:
        self.reply, self.aligned = reply, aligned
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def _result(self, overrides: dict[str, Any]) -> ETAResult:
        verdict = SafetyVerdict.combine(
            pre_threshold=0.16, post_threshold=0.06, pre_score=0.3, post_score=0.01
        )
        return ETAResult(
            text=self.reply,
            verdict=verdict,
            aligned=self.aligned,
            usage=TokenUsage(input_tokens=7, output_tokens=5, total_tokens=12),
            finish_reason="stop",
            model_name=self.model_name,
        )

    def stream(self, messages: Any, *, stop: Any = None, **overrides: Any):
        with self.lock:
            self.calls.append({"messages": messages, "stop": stop, "overrides": overrides})
        for word in self.reply.split(" "):
            yield ETAStreamChunk(text=word + " " if word != self.reply.split(" ")[-1] else word)
        yield ETAStreamChunk(text="", result=self._result(overrides))

    async def astream(self, messages: Any, *, stop: Any = None, **overrides: Any):
        for chunk in self.stream(messages, stop=stop, **overrides):
            yield chunk
