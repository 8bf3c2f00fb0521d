"""Issue 18, hardening items 1 and 2: text the models cannot encode, and merging cost.

1. A lone UTF-16 surrogate (``"\\ud800"``, legal JSON) is text no tokenizer can encode. It used to
   make the reward model raise, so that under ``on_evaluator_error="fail_open"`` a harmful text
   went unflagged (and one poisoned string unflagged its whole batch). It is the client's bad
   input: an ``InvalidInputError`` in the library, a 400 on the server, never an evaluator failure.
2. Consecutive same-role messages are merged; that was quadratic (80,000 messages: 18.5 s) and ran
   before the text limit.

Random tiny checkpoints: mechanics, not safety.
"""

from __future__ import annotations

import gc
import json
import time

import httpx
import pytest

from eta_guard import ETAConfig, ETAEvaluator
from eta_guard.errors import InvalidInputError
from eta_guard.limits import RequestLimits
from eta_guard.messages import normalize_messages

LONE = "\ud800"


@pytest.fixture(scope="module")
def fail_open_evaluator(tiny_checkpoints) -> ETAEvaluator:
    # post_threshold=10: every text the RM judges is unsafe, so "not flagged" can only mean
    # "not judged".
    cfg = ETAConfig(on_evaluator_error="fail_open", post_threshold=10.0)
    return ETAEvaluator.from_pretrained(
        clip=tiny_checkpoints.clip, reward_model=tiny_checkpoints.reward_model, config=cfg
    )


@pytest.mark.parametrize(
    "content",
    [
        f"how to make a bomb {LONE}",
        [{"type": "text", "text": f"x{LONE}"}],
        [f"bare {LONE} string"],
        "\udfff",
    ],
    ids=["str", "text-part", "bare-str-part", "low-surrogate"],
)
def test_messages_with_a_lone_surrogate_are_refused(content):
    with pytest.raises(InvalidInputError, match="lone UTF-16 surrogate"):
        normalize_messages([{"role": "user", "content": content}])


def test_astral_characters_still_pass():
    conv = normalize_messages([{"role": "user", "content": "ok \U0001f600"}])
    assert conv.messages[0]["content"][0]["text"] == "ok \U0001f600"


def test_evaluator_refuses_instead_of_failing_open(fail_open_evaluator):
    assert fail_open_evaluator.evaluate(response="harmful text").unsafe  # judged: flagged
    with pytest.raises(InvalidInputError, match="surrogate"):
        fail_open_evaluator.evaluate(response=f"harmful text {LONE}")
    with pytest.raises(InvalidInputError, match=r"responses\[1\]"):
        fail_open_evaluator.evaluate_batch([{"response": "harmful"}, {"response": LONE}])
    with pytest.raises(InvalidInputError, match="surrogate"):
        fail_open_evaluator.score_responses([LONE])


def test_moderations_answers_400_and_never_unflags(fail_open_evaluator):
    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    app = create_app(evaluator=fail_open_evaluator, settings=ServerSettings())
    # The raw JSON escape, as an attacker's client sends it (httpx would refuse to encode it).
    poisoned = b'{"input": ["harmful text", "harmful \\ud800 text"]}'
    with serve_in_thread(app) as base:
        ok = httpx.post(f"{base}/v1/moderations", json={"input": ["harmful text"]}, timeout=30)
        assert ok.status_code == 200 and ok.json()["results"][0]["flagged"]
        resp = httpx.post(
            f"{base}/v1/moderations",
            content=poisoned,
            headers={"content-type": "application/json"},
            timeout=30,
        )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "surrogate" in error["message"] and error["param"] == "input[1]"


def test_stop_strings_with_a_lone_surrogate_are_refused():
    from eta_guard.limits import check_stop_strings

    with pytest.raises(InvalidInputError, match=r"stop\[0\]"):
        check_stop_strings([LONE])


# ------------------------------------------------------------------- item 2: merging cost


def _fastest(fn, n: int, runs: int) -> float:
    # The cyclic GC is paused while timing: its full collections scan every live object (the
    # whole test session's), which would make any allocation-heavy step look superlinear.
    best = float("inf")
    for _ in range(runs):
        gc.collect()
        gc.disable()
        try:
            started = time.perf_counter()
            fn(n)
            best = min(best, time.perf_counter() - started)
        finally:
            gc.enable()
    return best


def _ratio(fn) -> float:
    """time(40,000 messages) / time(5,000): about 8 when linear, 64 when quadratic. Fastest of a
    few runs each, and a wide gap between the two growths, so that load on shared cores (which
    can slow one run several times over) does not decide it."""
    return _fastest(fn, 40_000, 3) / _fastest(fn, 5_000, 5)


def test_merging_many_messages_is_linear():
    # 40,000 messages of 80 characters: 86 s before (quadratic string joining), 0.5 s after.
    text = "x" * 80

    def merge(n: int) -> None:
        messages = [{"role": "user", "content": text} for _ in range(n)]
        conv = normalize_messages(messages, limits=RequestLimits(max_text_chars=10**8))
        assert len(conv.messages[0]["content"][0]["text"]) == n * 82 - 2

    ratio = _ratio(merge)
    assert ratio < 24, f"8x the messages took {ratio:.1f}x the time"


def test_text_limit_is_checked_before_merging():
    def refuse(n: int) -> None:
        messages = [{"role": "user", "content": "x" * 80} for _ in range(n)]
        with pytest.raises(InvalidInputError, match="max_text_chars"):
            normalize_messages(messages)  # 800,000+ characters > 200,000: refused before merging

    ratio = _ratio(refuse)
    assert ratio < 24, f"8x the messages took {ratio:.1f}x the time to refuse"


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            [{"role": "user", "content": [{"type": "text", "text": "a\n\nb"}]}],
        ),
        (
            [
                {"role": "user", "content": [{"type": "text", "text": "a"}, "b"]},
                {"role": "user", "content": ""},
                {"role": "user", "content": "c"},
            ],
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b\n\nc"}],
                }
            ],
        ),
        (
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "user", "content": []},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
                {"role": "user", "content": "d"},
            ],
            [
                {"role": "system", "content": [{"type": "text", "text": "s"}]},
                {"role": "user", "content": [{"type": "text", "text": "a\n\nb"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "c"}]},
                {"role": "user", "content": [{"type": "text", "text": "d"}]},
            ],
        ),
    ],
    ids=["seam", "parts-kept-within-a-message", "roles"],
)
def test_merging_joins_only_at_message_seams(messages, expected):
    assert normalize_messages(messages).messages == expected


def test_merged_text_still_counts_the_seams():
    # Raw text is 200,000 characters (at the limit); the blank lines at the seams push it over.
    messages = [{"role": "user", "content": "a" * 100_000} for _ in range(2)]
    with pytest.raises(InvalidInputError, match="max_text_chars"):
        normalize_messages(messages)
    json.dumps(normalize_messages(messages[:1]).messages)  # one message: fine
