"""SafetyVerdict: ETA's AND rule, thresholds, merging."""

from __future__ import annotations

import pytest

from eta_guard import SafetyVerdict


def _v(**kw):
    return SafetyVerdict.combine(pre_threshold=0.16, post_threshold=0.06, **kw)


@pytest.mark.parametrize(
    ("pre", "post", "input_unsafe", "output_unsafe", "unsafe"),
    [
        (0.16, 0.06, True, True, True),  # both at the threshold count as unsafe
        (0.159, 0.06, False, True, False),
        (0.2, 0.061, True, False, False),
        (0.0, 1.0, False, False, False),
        (0.3, None, True, None, True),  # input-only check
        (None, -1.0, None, True, True),  # output-only check
        (None, None, None, None, False),
    ],
)
def test_and_rule_table(pre, post, input_unsafe, output_unsafe, unsafe):
    v = _v(pre_score=pre, post_score=post)
    assert (v.input_unsafe, v.output_unsafe, v.unsafe) == (input_unsafe, output_unsafe, unsafe)


def test_explicit_flag_wins_over_score_for_fail_closed():
    v = _v(pre_score=None, input_unsafe=True, errors={"pre": "boom"})
    assert v.unsafe and v.errors == {"pre": "boom"}


def test_merge_input_and_output_sides():
    pre = _v(
        pre_score=0.3, image_scores=[0.1, 0.3], timings={"pre": 0.01}, skipped={"post": "later"}
    )
    post = _v(post_score=0.0, timings={"post": 0.02}, skipped={"pre": "n/a"})
    merged = pre.merge(post)
    assert (merged.pre_score, merged.post_score) == (0.3, 0.0)
    assert merged.unsafe and merged.image_scores == [0.1, 0.3]
    assert merged.skipped == {}  # both sides ran
    assert merged.timings == {"pre": 0.01, "post": 0.02}


def test_merge_does_not_call_a_failed_side_skipped():
    # fail_closed after a CLIP error, then the output-only check (which saw no image)
    pre = _v(input_unsafe=True, errors={"pre": "CLIP exploded"}, skipped={"post": "later"})
    post = _v(post_score=0.0, skipped={"pre": "no image given"})
    merged = pre.merge(post)
    assert merged.errors == {"pre": "CLIP exploded"}
    assert merged.skipped == {}  # the image was given: its check failed, it was not skipped
    assert merged.input_unsafe and merged.unsafe
