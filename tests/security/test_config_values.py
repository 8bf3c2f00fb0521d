"""Issue 8, class 6 (config values that validate but crash), as an attacker would try it.

A config often comes from a file or a request's overrides. Every value ``ETAConfig`` accepts must
work on every path (the aligned path included); everything else is refused with a short, typed
error. ``ETAConfig.load`` reads only small regular UTF-8 files.
"""

from __future__ import annotations

import os
import threading

import pytest

from eta_guard import ETA, ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.testing import make_test_image

FLAG_ALL = {"pre_threshold": -1.0, "post_threshold": 1e9}  # every request takes the aligned path
FAST = {"max_new_tokens": 8, "max_sentence_tokens": 4, "num_candidates": 2, "seed": 0}


@pytest.fixture(scope="module")
def eta(tiny_checkpoints) -> ETA:
    return ETA.from_pretrained(
        tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        config=ETAConfig(**FAST, **FLAG_ALL),
    )


MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image", "image": make_test_image()}, {"type": "text", "text": "Hi"}],
    }
]


@pytest.mark.parametrize(
    "override",
    [
        {"seed": 2**64 - 1},
        {"seed": 2**64},
        {"seed": 2**80},
        {"temperature": 1e-300},
        {"temperature": 5e-324},
        {"temperature": 1e-4},
        {"temperature": 1e300},
        {"top_k": 10**18},
        {"alpha": 1e308},
        # Decodes to the tiny VLM's full context (~10 s): slow.
        pytest.param({"max_new_tokens": 10**12}, marks=pytest.mark.slow),
        {"max_sentence_tokens": 10**12},
        {"num_candidates": 64, "max_new_tokens": 2},
        {"prefix": ""},
        {"sentence_terminators": ("x" * 1000,)},
    ],
    ids=lambda o: ",".join(f"{k}={str(v)[:12]}" for k, v in o.items()),
)
def test_every_value_that_validates_works_on_the_aligned_path(eta, override):
    try:
        ETAConfig(**override)
    except InvalidInputError:
        return  # refused up front, with a typed error: fine
    result = eta.generate(MESSAGES, **override)  # must not raise
    assert result.aligned and result.text.startswith(override.get("prefix", "As an AI assistant"))


def test_the_boundaries_are_where_they_should_be():
    assert ETAConfig(seed=2**64 - 1, temperature=1e-4).seed == 2**64 - 1
    for bad in ({"seed": 2**64}, {"temperature": 1e-5}):
        with pytest.raises(InvalidInputError, match=next(iter(bad))):
            ETAConfig(**bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ETAConfig(on_evaluator_error="x" * 1_000_000),
        lambda: ETAConfig().with_overrides(safety_prompt=["y" * 1_000_000]),
        lambda: ETAConfig(**{f"unknown_{i}": "z" * 1000 for i in range(10_000)}),
    ],
    ids=["huge-value", "huge-list", "many-errors"],
)
def test_error_messages_are_bounded(make):
    with pytest.raises(InvalidInputError) as caught:
        make()
    assert len(str(caught.value)) < 1500


def test_load_refuses_large_files_without_echoing_them(tmp_path):
    path = tmp_path / "big.json"
    path.write_text('{"safety_prompt": "' + "a" * 2_000_000 + '"}')
    with pytest.raises(InvalidInputError, match="larger than") as caught:
        ETAConfig.load(path)
    assert len(str(caught.value)) < 300


def test_load_refuses_non_utf8_with_a_typed_error(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"prefix": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        ETAConfig.load(path)


def test_load_refuses_special_files_without_blocking(tmp_path):
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            ETAConfig.load(fifo)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            outcome.append(e)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # unblock a reader stuck in open(), then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail("ETAConfig.load blocked on a FIFO")
    assert isinstance(outcome[0], InvalidInputError) and "regular file" in str(outcome[0])
    with pytest.raises(InvalidInputError, match="regular file"):
        ETAConfig.load(tmp_path)  # a directory
