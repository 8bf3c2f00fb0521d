"""``ETA.stream(cancel=event)``: a set event stops the call and raises ``RequestCancelled``."""

from __future__ import annotations

import threading

import pytest


@pytest.fixture(scope="module")
def eta(tiny_checkpoints):
    from eta_guard import ETA, ETAConfig

    c = tiny_checkpoints
    cfg = ETAConfig(max_new_tokens=400, num_candidates=2)
    return ETA.from_pretrained(c.vlm, clip=c.clip, reward_model=c.reward_model, config=cfg)


def _messages(test_image):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": test_image},
                {"type": "text", "text": "Describe it."},
            ],
        }
    ]


@pytest.mark.parametrize("pre_threshold", [1.01, -1.01], ids=["streamed", "held_back"])
def test_cancel_stops_the_call(eta, test_image, pre_threshold):
    from eta_guard.errors import RequestCancelled

    cancel = threading.Event()
    overrides = {"pre_threshold": pre_threshold, "post_threshold": 1e9}
    stream = eta.stream(_messages(test_image), cancel=cancel, **overrides)
    threading.Timer(0.05, cancel.set).start()
    with pytest.raises(RequestCancelled):
        for _ in stream:
            pass
    # The model is free again: the next call runs to the end.
    result = eta.generate(_messages(test_image), max_new_tokens=4, **overrides)
    assert result.usage.output_tokens > 0


def test_unset_cancel_changes_nothing(eta, test_image):
    plain = eta.generate(_messages(test_image), max_new_tokens=8, pre_threshold=1.01)
    chunks = list(
        eta.stream(
            _messages(test_image), cancel=threading.Event(), max_new_tokens=8, pre_threshold=1.01
        )
    )
    assert "".join(c.text for c in chunks) == plain.text


def test_cancel_during_the_best_of_n_search(eta, test_image):
    from eta_guard.errors import RequestCancelled

    cancel = threading.Event()
    overrides = {"pre_threshold": -1.01, "post_threshold": 1e9, "max_sentence_tokens": 8}
    chunks = []
    with pytest.raises(RequestCancelled):
        for chunk in eta.stream(_messages(test_image), cancel=cancel, **overrides):
            chunks.append(chunk)
            cancel.set()  # after the prefix: the search is running
    assert chunks and chunks[0].text.startswith("As an AI assistant")
    assert all(c.result is None for c in chunks)
