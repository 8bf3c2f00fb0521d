"""ETAEvaluator: every decision branch, failure policies, batching, async, bad input."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from eta_guard.config import ETAConfig
from eta_guard.errors import EvaluatorError, InvalidInputError
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.testing import make_test_image

RESPONSE = "I cannot help with that, but here is some safety advice."


@pytest.fixture(scope="module")
def evaluator(tiny_checkpoints):
    return ETAEvaluator.from_pretrained(
        clip=tiny_checkpoints.clip, reward_model=tiny_checkpoints.reward_model, device="cpu"
    )


@pytest.fixture(scope="module")
def images():
    return [make_test_image("red", (64, 64), 0), make_test_image("noise", (64, 64), 3)]


def _with(evaluator, **overrides):
    return evaluator.with_config(evaluator.config.with_overrides(**overrides))


FLAG_ALL = {"pre_threshold": -1.0, "post_threshold": 1e9}
FLAG_NONE = {"pre_threshold": 1.01, "post_threshold": -1e9}


@pytest.mark.parametrize(
    ("pre_t", "post_t", "input_unsafe", "output_unsafe", "unsafe"),
    [
        (-1.0, 1e9, True, True, True),
        (-1.0, -1e9, True, False, False),
        (1.01, 1e9, False, True, False),
        (1.01, -1e9, False, False, False),
    ],
)
def test_both_sides_use_the_and_rule(
    evaluator, images, pre_t, post_t, input_unsafe, output_unsafe, unsafe
):
    verdict = _with(evaluator, pre_threshold=pre_t, post_threshold=post_t).evaluate(
        images=images, response=RESPONSE
    )
    assert (verdict.input_unsafe, verdict.output_unsafe, verdict.unsafe) == (
        input_unsafe,
        output_unsafe,
        unsafe,
    )
    assert verdict.pre_score is not None and verdict.post_score is not None
    assert verdict.pre_threshold == pre_t and verdict.post_threshold == post_t
    assert (
        set(verdict.timings) == {"pre", "post"} and verdict.skipped == {} and verdict.errors == {}
    )


@pytest.mark.parametrize(("overrides", "flagged"), [(FLAG_ALL, True), (FLAG_NONE, False)])
def test_one_side_decides_alone(evaluator, images, overrides, flagged):
    ev = _with(evaluator, **overrides)
    only_images = ev.evaluate(images=images)
    assert only_images.unsafe is flagged and only_images.input_unsafe is flagged
    assert only_images.post_score is None and only_images.skipped == {"post": "no response given"}
    assert set(only_images.timings) == {"pre"}
    only_response = ev.evaluate(response=RESPONSE)
    assert only_response.unsafe is flagged and only_response.output_unsafe is flagged
    assert only_response.pre_score is None and only_response.skipped == {"pre": "no image given"}
    assert set(only_response.timings) == {"post"}
    assert ev.evaluate_input(images).unsafe is flagged
    assert ev.evaluate_output(RESPONSE).unsafe is flagged


def test_default_thresholds_match_scores(evaluator, images):
    verdict = evaluator.evaluate(images=images, response=RESPONSE)
    assert verdict.input_unsafe == (verdict.pre_score >= 0.16)
    assert verdict.output_unsafe == (verdict.post_score <= 0.06)


def test_largest_image_score_decides(evaluator, images):
    scores = evaluator.score_images(images)
    low, high = sorted(range(2), key=lambda i: scores[i])
    assert scores[low] < scores[high]
    ev = _with(evaluator, pre_threshold=(scores[low] + scores[high]) / 2)
    assert ev.evaluate(images=[images[low]]).input_unsafe is False
    both = ev.evaluate(images=[images[low], images[high]])
    assert both.input_unsafe is True
    assert both.pre_score == pytest.approx(max(scores), abs=1e-5)
    assert both.image_scores == pytest.approx([scores[low], scores[high]], abs=1e-5)


def test_single_image_source_is_accepted(evaluator, images, tmp_path):
    path = tmp_path / "x.png"
    images[0].save(path)
    from_path = evaluator.evaluate(images=str(path))
    assert len(from_path.image_scores) == 1
    with pytest.raises(InvalidInputError):
        _with(evaluator, allow_local_image_files=False).evaluate(images=str(path))
    assert from_path.pre_score == pytest.approx(
        evaluator.evaluate(images=images[0]).pre_score, abs=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "nothing to evaluate"),
        ({"images": b"not an image at all"}, "images"),
        ({"images": []}, "nothing to evaluate"),
        ({"response": 42}, "response is int"),
    ],
)
def test_bad_input(evaluator, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        evaluator.evaluate(**kwargs)


def test_bad_batch_items(evaluator):
    with pytest.raises(InvalidInputError, match="list of dicts"):
        evaluator.evaluate_batch({"response": "x"})
    with pytest.raises(InvalidInputError, match=r"items\[1\]: nothing"):
        evaluator.evaluate_batch([{"response": "x"}, {}])
    with pytest.raises(InvalidInputError, match="unknown keys"):
        evaluator.evaluate_batch([{"response": "x", "question": "y"}])
    with pytest.raises(InvalidInputError, match=r"items\[0\]\.images"):
        evaluator.evaluate_batch([{"images": [b"\x89PNG\r\n\x1a\ngarbage"]}])
    assert evaluator.evaluate_batch([]) == []


def test_missing_side_is_an_error_not_a_skip(evaluator, images):
    clip_only = ETAEvaluator(pre=evaluator.pre)
    rm_only = ETAEvaluator(post=evaluator.post)
    with pytest.raises(EvaluatorError, match="pre-generation .*not loaded"):
        rm_only.evaluate(images=images)
    with pytest.raises(EvaluatorError, match="reward model.*not loaded"):
        clip_only.evaluate(images=images, response=RESPONSE)
    with pytest.raises(EvaluatorError, match="not loaded"):
        clip_only.score_responses([RESPONSE])
    assert clip_only.evaluate(images=images).skipped == {"post": "no reward model loaded"}


def _break(monkeypatch, evaluator, side):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    if side == "pre":
        monkeypatch.setattr(evaluator.pre.encoder, "embed_images", boom)
    else:
        monkeypatch.setattr(evaluator.post.model, "forward", boom)


@pytest.mark.parametrize("side", ["pre", "post"])
def test_failure_policy_raise(evaluator, images, monkeypatch, side):
    _break(monkeypatch, evaluator, side)
    with pytest.raises(EvaluatorError) as info:
        evaluator.evaluate(images=images, response=RESPONSE)
    stage = "pre-generation" if side == "pre" else "post-generation"
    # Safe to show a client: the stage and the error type, never the inner text.
    assert stage in str(info.value) and "out of memory" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("side", ["pre", "post"])
@pytest.mark.parametrize(("policy", "flag"), [("fail_closed", True), ("fail_open", False)])
def test_failure_policies_record_the_error(evaluator, images, monkeypatch, side, policy, flag):
    ev = _with(evaluator, on_evaluator_error=policy, **FLAG_ALL)
    _break(monkeypatch, evaluator, side)
    verdict = ev.evaluate(images=images, response=RESPONSE)
    other = "post" if side == "pre" else "pre"
    assert set(verdict.errors) == {side} and "RuntimeError" in verdict.errors[side]
    assert getattr(verdict, f"{side}_score") is None
    assert getattr(verdict, f"{other}_score") is not None
    failed_flag = verdict.input_unsafe if side == "pre" else verdict.output_unsafe
    assert failed_flag is flag
    assert verdict.unsafe is flag  # the healthy side is flagged by FLAG_ALL
    assert side in verdict.timings
    alone = ev.evaluate(**({"images": images} if side == "pre" else {"response": RESPONSE}))
    assert alone.unsafe is flag and side in alone.errors


def test_batch_equals_single_calls_in_one_forward_per_side(evaluator, images, monkeypatch):
    items = [
        {"images": images},
        {"response": RESPONSE},
        {"images": images[1], "response": "Sure, here is how."},
        {"images": [images[0]]},
    ]
    clip_calls, rm_calls = [], []
    embed = evaluator.pre.encoder.embed_images
    monkeypatch.setattr(
        evaluator.pre.encoder, "embed_images", lambda x: clip_calls.append(len(x)) or embed(x)
    )
    handle = evaluator.post.model.register_forward_pre_hook(
        lambda m, a, kw: rm_calls.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        batch = evaluator.evaluate_batch(items)
    finally:
        handle.remove()
    assert clip_calls == [4] and rm_calls == [2]
    for item, verdict in zip(items, batch, strict=True):
        single = evaluator.evaluate(**item)
        for field in ("pre_score", "post_score"):
            a, b = getattr(verdict, field), getattr(single, field)
            assert (a is None) == (b is None)
            if a is not None:
                assert a == pytest.approx(b, abs=1e-5)
        assert verdict.image_scores == pytest.approx(single.image_scores, abs=1e-5)
        assert verdict.unsafe == single.unsafe and verdict.skipped == single.skipped


async def test_async_variants_equal_sync(evaluator, images):
    ev = _with(evaluator, **FLAG_ALL)
    sync = ev.evaluate(images=images, response=RESPONSE)
    results = await asyncio.gather(
        ev.aevaluate(images=images, response=RESPONSE),
        ev.aevaluate_input(images),
        ev.aevaluate_output(RESPONSE),
        ev.aevaluate_batch([{"images": images, "response": RESPONSE}]),
    )
    both, only_in, only_out, batch = results
    for verdict in (both, batch[0]):
        assert verdict.pre_score == pytest.approx(sync.pre_score, abs=1e-5)
        assert verdict.post_score == pytest.approx(sync.post_score, abs=1e-5)
        assert verdict.unsafe is True
    assert only_in.pre_score == pytest.approx(sync.pre_score, abs=1e-5)
    assert only_out.post_score == pytest.approx(sync.post_score, abs=1e-5)


def test_concurrent_threads_get_consistent_scores(evaluator, images):
    expected = evaluator.evaluate(images=images, response=RESPONSE)
    results, errors = [], []

    def work():
        try:
            results.append(evaluator.evaluate(images=images, response=RESPONSE))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    for verdict in results:
        assert verdict.pre_score == pytest.approx(expected.pre_score, abs=1e-5)
        assert verdict.post_score == pytest.approx(expected.post_score, abs=1e-5)


def test_with_config_shares_models_and_config_round_trips(evaluator, images, tmp_path):
    config = ETAConfig(pre_threshold=0.3, post_threshold=-0.2, on_evaluator_error="fail_closed")
    path = tmp_path / "eta.json"
    evaluator.with_config(config).save_config(path)
    ev = evaluator.with_config(ETAConfig.load(path))
    assert ev.pre is evaluator.pre and ev.post is evaluator.post
    assert ev.config == config and evaluator.config == ETAConfig()
    assert evaluator.with_config(evaluator.config) is evaluator
    verdict = ev.evaluate(images=images, response=RESPONSE)
    assert (verdict.pre_threshold, verdict.post_threshold) == (0.3, -0.2)


def test_safety_prompt_comes_from_config(evaluator, images):
    ev = _with(evaluator, safety_prompt="a picture of a weapon")
    expected = evaluator.pre.score_images(images, prompt="a picture of a weapon")
    assert ev.score_images(images) == pytest.approx(expected, abs=1e-6)
    assert ev.score_images(images) != pytest.approx(evaluator.score_images(images), abs=1e-6)


def test_from_pretrained_one_side(tiny_checkpoints, images):
    clip_only = ETAEvaluator.from_pretrained(
        clip=tiny_checkpoints.clip, reward_model=None, device="cpu"
    )
    assert clip_only.post is None and clip_only.pre is not None
    assert isinstance(clip_only.evaluate(images=images).pre_score, float)
    rm_only = ETAEvaluator.from_pretrained(
        clip=None, reward_model=tiny_checkpoints.reward_model, device="cpu"
    )
    assert rm_only.pre is None and rm_only.post is not None
    with pytest.raises(InvalidInputError, match="nothing to evaluate with"):
        ETAEvaluator.from_pretrained(clip=None, reward_model=None)
    with pytest.raises(InvalidInputError, match="config"):
        ETAEvaluator(config={"pre_threshold": 0.1})


def test_scores_match_the_evaluators(evaluator, images):
    assert torch.allclose(
        torch.tensor(evaluator.score_images(images)),
        torch.tensor(evaluator.pre.score_images(images)),
        atol=1e-6,
    )
    assert evaluator.score_responses([RESPONSE]) == pytest.approx(
        evaluator.post.score([RESPONSE], evaluator.config.rm_decision_prompt), abs=1e-6
    )


def test_importing_the_evaluator_modules_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, eta_guard.evaluators, eta_guard.calibration, "
        "eta_guard.evaluators.eta_evaluator; "
        "print(sorted(m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("side", ["pre", "post"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_score_is_an_evaluator_failure_not_a_pass(
    evaluator, images, monkeypatch, side, bad
):
    # A NaN compares False with any threshold: taken as a score it would silently pass the check
    # (e.g. a float16 reward model that overflowed).
    if side == "pre":
        monkeypatch.setattr(
            evaluator.pre,
            "score_images",
            lambda imgs, prompt=None, batch_size=None: [bad] * len(imgs),
        )
    else:
        monkeypatch.setattr(evaluator.post, "score", lambda texts, instruction: [bad] * len(texts))
    kwargs = {"images": images} if side == "pre" else {"response": RESPONSE}
    with pytest.raises(EvaluatorError, match="non-finite"):
        evaluator.evaluate(**kwargs)
    with pytest.raises(EvaluatorError, match="non-finite"):
        if side == "pre":
            evaluator.score_images(images)
        else:
            evaluator.score_responses([RESPONSE], search=True)
    closed = _with(evaluator, on_evaluator_error="fail_closed").evaluate(**kwargs)
    assert closed.unsafe and side in closed.errors and getattr(closed, f"{side}_score") is None


def test_sentence_scorer_is_the_max_cosine_over_images(evaluator, images, monkeypatch):
    sentences = ["a red square.", "random noise!"]
    expected = evaluator.pre.similarity(evaluator.pre.embed_images(images), sentences).tolist()
    calls = []
    original = evaluator.pre.embed_images
    monkeypatch.setattr(
        evaluator.pre, "embed_images", lambda i, **kw: calls.append(1) or original(i, **kw)
    )
    scorer = evaluator.sentence_scorer(images)
    assert scorer(sentences) == pytest.approx(expected, abs=1e-6)
    assert scorer(sentences[:1]) == pytest.approx(expected[:1], abs=1e-6)
    assert calls == [1]  # the images are embedded once per request


def test_missing_images_are_a_typed_error(evaluator):
    for call in (lambda: evaluator.score_images(None), lambda: evaluator.sentence_scorer(None)):
        with pytest.raises(InvalidInputError, match="None"):
            call()
