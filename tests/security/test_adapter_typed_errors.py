"""Class 7 of issue 8, adapter part: wrong input types get ``eta_guard.errors`` types.

Written as a caller sending whatever it likes: no ``TypeError`` / ``AttributeError`` from deep
inside an adapter, only ``InvalidInputError`` with a short message.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk

sys.path.insert(0, str(Path(__file__).parents[1]))
from langchain_eta import ETAGuardMiddleware, ETAOutputGuard  # noqa: E402
from langchain_fixtures import lc_ckpt, lc_eta, lc_evaluator  # noqa: E402, F401
from llama_index_fixtures import li_ckpt, li_eta  # noqa: E402, F401

from eta_guard.errors import InvalidInputError  # noqa: E402

WRONG = [123, None, b"bytes", {"text": "hi"}, [AIMessage("a list")], 1.5, object()]


def _short_typed(call: Any) -> None:
    with pytest.raises(InvalidInputError) as caught:
        call()
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("value", WRONG, ids=lambda v: type(v).__name__)
def test_output_guard_invoke(lc_evaluator, value):  # noqa: F811
    guard = ETAOutputGuard(evaluator=lc_evaluator)
    _short_typed(lambda: guard.invoke(value))


@pytest.mark.parametrize("value", WRONG[:3], ids=lambda v: type(v).__name__)
def test_output_guard_stream(lc_evaluator, value):  # noqa: F811
    guard = ETAOutputGuard(evaluator=lc_evaluator)
    _short_typed(lambda: list(guard.stream(value)))


async def test_output_guard_ainvoke(lc_evaluator):  # noqa: F811
    guard = ETAOutputGuard(evaluator=lc_evaluator)
    with pytest.raises(InvalidInputError):
        await guard.ainvoke(123)


@pytest.mark.parametrize(
    "chunks",
    [
        ["text", AIMessageChunk("chunk")],
        [AIMessageChunk("a"), AIMessage("b")],
        [AIMessage("a")] * 2,
    ],
    ids=["str-then-chunk", "chunk-then-message", "two-messages"],
)
def test_output_guard_mixed_streams(lc_evaluator, chunks):  # noqa: F811
    guard = ETAOutputGuard(evaluator=lc_evaluator)
    _short_typed(lambda: list(guard.transform(iter(chunks))))


@pytest.mark.parametrize("kwargs", [{"rule": "nope"}, {}], ids=["bad-rule", "no-evaluator"])
def test_middleware_settings(lc_evaluator, kwargs):  # noqa: F811
    evaluator = lc_evaluator if kwargs else None
    _short_typed(lambda: ETAGuardMiddleware(evaluator, **kwargs))


def test_llama_index_components(li_eta):  # noqa: F811
    from llama_index.evaluation.eta import ETASafetyEvaluator
    from llama_index.llms.eta import ETAMultiModalLLM
    from llama_index.postprocessor.eta import ETAImageSafetyPostprocessor

    llm = ETAMultiModalLLM(eta=li_eta)
    screen = ETAImageSafetyPostprocessor(evaluator=li_eta)
    judge = ETASafetyEvaluator(evaluator=li_eta)
    calls = {
        "complete(image_documents=int)": lambda: llm.complete("q", image_documents=123),
        "postprocess_nodes(int)": lambda: screen.postprocess_nodes(123),
        "postprocess_nodes([int])": lambda: screen.postprocess_nodes([123]),
        "postprocess_nodes([None])": lambda: screen.postprocess_nodes([None]),
        "evaluate(images=int)": lambda: judge.evaluate(response="x", images=123),
        "evaluate(image_paths=int)": lambda: judge.evaluate(response="x", image_paths=5),
        "evaluate_response(str)": lambda: judge.evaluate_response(response="x"),
    }
    for name, call in calls.items():
        try:
            _short_typed(call)
        except BaseException as e:
            raise AssertionError(f"{name}: {type(e).__name__}: {e}") from e
