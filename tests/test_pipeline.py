"""ETA end to end on random tiny checkpoints: every decision branch, streaming, async, families.

Random models prove mechanics (which stage runs, what is returned), not safety. Decisions are
forced with thresholds: pre_threshold=-1 flags every image, 1.01 none; post_threshold=1e9 flags
every response, -1e9 none.
"""

from __future__ import annotations

import asyncio
import struct
import time
import zlib

import pytest
import torch

from eta_guard import ETA, ETAConfig, EvaluatorError, InvalidInputError
from eta_guard.testing import build_tiny_checkpoints, image_to_bytes, make_test_image

FLAG_ALL = {"pre_threshold": -1.0, "post_threshold": 1e9}
FAST = {"max_new_tokens": 24, "max_sentence_tokens": 8, "num_candidates": 3, "seed": 0}


@pytest.fixture(scope="module")
def eta(tiny_checkpoints) -> ETA:
    return ETA.from_pretrained(
        tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        config=ETAConfig(**FAST),
    )


def _ask(image=None, text="Describe the picture."):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return [{"role": "user", "content": content}]


def _count_rm_calls(monkeypatch, eta: ETA) -> list[int]:
    calls: list[int] = []
    post = eta.evaluator.post
    original = post.score

    def spy(responses, *args, **kwargs):
        calls.append(len(responses))
        return original(responses, *args, **kwargs)

    monkeypatch.setattr(post, "score", spy)
    return calls


def test_safe_image_returns_vanilla_and_never_runs_the_reward_model(eta, monkeypatch):
    calls = _count_rm_calls(monkeypatch, eta)
    image = make_test_image("noise")
    result = eta.generate(_ask(image), pre_threshold=1.01)
    assert not result.aligned and result.vanilla_text is None
    assert result.verdict.pre_score is not None and result.verdict.input_unsafe is False
    assert result.verdict.post_score is None and "CLIP" in result.verdict.skipped["post"]
    assert calls == []
    conv_text = eta.vlm.generate_greedy(
        eta.vlm.prepare(_normalize(_ask(image))), max_new_tokens=FAST["max_new_tokens"]
    ).text
    assert result.text == conv_text
    assert set(result.timings) >= {"pre", "vanilla", "total"}


def _normalize(messages):
    from eta_guard.messages import normalize_messages

    return normalize_messages(messages)


def test_unsafe_image_with_safe_answer_keeps_the_answer(eta, monkeypatch):
    calls = _count_rm_calls(monkeypatch, eta)
    result = eta.generate(_ask(make_test_image()), pre_threshold=-1.0, post_threshold=-1e9)
    assert calls == [1]
    assert result.verdict.input_unsafe and result.verdict.output_unsafe is False
    assert not result.verdict.unsafe and not result.aligned
    assert not result.text.startswith(eta.config.prefix) or result.text == result.vanilla_text
    greedy = eta.vlm.generate_greedy(
        eta.vlm.prepare(_normalize(_ask(make_test_image()))), max_new_tokens=FAST["max_new_tokens"]
    )
    assert result.text == greedy.text  # the vanilla answer, untouched


def test_both_unsafe_aligns_with_prefix_and_best_of_n(eta):
    result = eta.generate(_ask(make_test_image()), **FLAG_ALL)
    assert result.aligned and result.verdict.unsafe
    assert result.text.startswith("As an AI assistant")
    assert result.vanilla_text is not None
    assert result.trace, "deep alignment must record its sentences"
    for step in result.trace:
        assert len(step.candidates) == FAST["num_candidates"]
        scores = [c.score for c in step.candidates]
        assert step.chosen == scores.index(max(scores))
        for c in step.candidates:
            expected = c.reward + (0.0 if c.clip is None else (1.0 / step.index) * c.clip)
            assert c.score == pytest.approx(expected)
    assert result.trace[0].candidates[0].clip is None  # no CLIP term for the first sentence
    assert result.usage.output_tokens <= FAST["max_new_tokens"] + 8
    assert result.usage.decoded_tokens > result.usage.output_tokens
    assert "align" in result.timings


def test_aligned_path_feeds_each_evaluator_what_design_says(eta, monkeypatch):
    """Decision: the vanilla answer under rm_decision_prompt. Search: the whole answer so far
    (prefix included) under rm_search_prompt, N at a time; CLIP sees only the new sentence."""
    rm_calls, clip_calls = [], []
    post, pre = eta.evaluator.post, eta.evaluator.pre
    score, similarity = post.score, pre.similarity

    def spy_score(responses, instruction):
        rm_calls.append((list(responses), instruction))
        return score(responses, instruction)

    def spy_similarity(image_embeds, texts):
        clip_calls.append(list(texts))
        return similarity(image_embeds, texts)

    from eta_guard.evaluators.reward_session import IncrementalRewardScorer

    session_score = IncrementalRewardScorer.score

    def spy_session(self, responses):  # the search's incremental scorer
        rm_calls.append((list(responses), self.instruction))
        return session_score(self, responses)

    monkeypatch.setattr(post, "score", spy_score)
    monkeypatch.setattr(IncrementalRewardScorer, "score", spy_session)
    monkeypatch.setattr(pre, "similarity", spy_similarity)
    result = eta.generate(_ask(make_test_image()), **FLAG_ALL)
    assert result.aligned and len(result.trace) >= 2
    (decision, instruction), *search = rm_calls
    assert decision == [result.vanilla_text] and instruction == eta.config.rm_decision_prompt
    assert len(search) == len(result.trace)
    answer = eta.config.prefix
    for (answers, instruction), step in zip(search, result.trace, strict=True):
        assert instruction == eta.config.rm_search_prompt
        assert answers == [answer + c.text for c in step.candidates]
        answer = answers[step.chosen]
    assert answer == result.text
    with_clip = [s for s in result.trace if s.candidates[0].clip is not None]
    assert with_clip and len(clip_calls) == len(with_clip)
    for texts, step in zip(clip_calls, with_clip, strict=True):
        assert texts == [c.text.strip() for c in step.candidates]


def test_shallow_alignment_only(eta):
    result = eta.generate(_ask(make_test_image()), deep_alignment=False, **FLAG_ALL)
    assert result.aligned and result.trace == []
    assert result.text.startswith("As an AI assistant")


def test_text_only_trust_policy_runs_no_evaluator(eta, monkeypatch):
    calls = _count_rm_calls(monkeypatch, eta)
    result = eta.generate(_ask(None), **FLAG_ALL)
    assert not result.aligned and calls == []
    assert result.verdict.pre_score is None and result.verdict.post_score is None
    assert "no image" in result.verdict.skipped["pre"]
    assert "text_only_policy" in result.verdict.skipped["post"]


def test_text_only_reward_only_policy_aligns_on_the_reward_alone(eta):
    result = eta.generate(_ask(None), text_only_policy="reward_only", **FLAG_ALL)
    assert result.aligned and result.verdict.pre_score is None
    assert all(c.clip is None for step in result.trace for c in step.candidates)


@pytest.mark.parametrize(
    ("image", "overrides"),
    [
        (True, {"pre_threshold": 1.01}),
        (True, FLAG_ALL),
        (True, {"pre_threshold": -1.0, "post_threshold": -1e9}),
        (False, {"text_only_policy": "reward_only", **FLAG_ALL}),
        (False, {"text_only_policy": "reward_only", "post_threshold": -1e9}),
    ],
    ids=["safe", "aligned", "flagged-image-safe-answer", "text-aligned", "text-checked-safe"],
)
def test_stream_yields_the_same_text_as_generate(eta, image, overrides):
    messages = _ask(make_test_image("gradient") if image else None)
    expected = eta.generate(messages, **overrides)
    chunks = list(eta.stream(messages, **overrides))
    assert chunks[-1].result is not None
    assert "".join(c.text for c in chunks) == expected.text == chunks[-1].result.text
    assert all(c.result is None for c in chunks[:-1])


def test_safe_path_streams_token_by_token(eta):
    chunks = [c for c in eta.stream(_ask(make_test_image()), pre_threshold=1.01) if c.text]
    result_tokens = eta.generate(_ask(make_test_image()), pre_threshold=1.01).usage.output_tokens
    if result_tokens > 3:
        assert len(chunks) > 1, "safe images must not be held back until the end"


async def test_async_variants_match_sync(eta):
    messages = _ask(make_test_image())
    sync = eta.generate(messages, **FLAG_ALL)
    result = await eta.agenerate(messages, **FLAG_ALL)
    assert result.text == sync.text
    chunks = [c async for c in eta.astream(messages, **FLAG_ALL)]
    assert "".join(c.text for c in chunks) == sync.text
    results = await eta.abatch([messages, _ask(None)], **FLAG_ALL)
    assert results[0].text == sync.text and len(results) == 2


def test_batch_matches_generate(eta):
    batch = [_ask(make_test_image("red")), _ask(None, "Hello there.")]
    assert [r.text for r in eta.batch(batch)] == [eta.generate(m).text for m in batch]


def test_concurrent_calls_are_serialised(eta):
    messages = _ask(make_test_image())
    expected = eta.generate(messages, **FLAG_ALL).text

    async def run_many():
        return await asyncio.gather(*(eta.agenerate(messages, **FLAG_ALL) for _ in range(3)))

    assert [r.text for r in asyncio.run(run_many())] == [expected] * 3


def test_stop_sequences_cut_the_answer(eta):
    messages = _ask(make_test_image())
    full = eta.generate(messages, **FLAG_ALL).text
    stop = full[len("As an AI assistant") :][:3]
    if stop.strip():
        cut = eta.generate(messages, stop=[stop], **FLAG_ALL)
        assert stop not in cut.text[len("As an AI") :]
        assert "".join(c.text for c in eta.stream(messages, stop=[stop], **FLAG_ALL)) == cut.text


def test_per_call_overrides_are_validated(eta):
    with pytest.raises(InvalidInputError, match="num_candidates"):
        eta.generate(_ask(None), num_candidates=0)
    with pytest.raises(InvalidInputError, match="not_a_knob"):
        eta.generate(_ask(None), not_a_knob=1)
    assert eta.config.num_candidates == FAST["num_candidates"]


@pytest.mark.parametrize(
    "messages",
    [[], "hello", [{"role": "user", "content": [{"type": "image", "image": b"not an image"}]}]],
    ids=["empty", "string", "bad-image"],
)
def test_bad_input_is_refused_before_any_model_runs(eta, messages):
    with pytest.raises(InvalidInputError):
        eta.generate(messages)


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _image_part(source):
    return [{"role": "user", "content": [{"type": "image", "image": source}, "What is it?"]}]


_PNG = image_to_bytes(make_test_image())
BAD_INPUTS = {
    "undecodable-bytes": (_image_part(b"\x00\x01 definitely not an image"), "not an image"),
    "truncated-bytes": (_image_part(_PNG[: len(_PNG) // 2]), "truncated"),
    "unsupported-format": (_image_part(b"%PDF-1.7 ..."), "PDF"),
    "decompression-bomb": (_image_part(_png_claiming(100_000, 100_000)), "too large"),
    "absurd-dimensions": (_image_part(_png_claiming(1, 50_000)), "aspect ratio"),
    "remote-url": (_image_part("https://example.com/cat.png"), "remote images are disabled"),
    "empty-messages": ([], "empty"),
    "content-wrong-type": ([{"role": "user", "content": 42}], "must be a str or a list"),
    "prompt-too-long": (_ask(make_test_image(), "word " * 5000), "context"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_of_issue_2_is_refused_within_a_second_by_no_model(eta, monkeypatch, case):
    def no_model(*args, **kwargs):
        raise AssertionError("a model ran on bad input")

    monkeypatch.setattr(eta.vlm.model, "forward", no_model)
    monkeypatch.setattr(eta.evaluator.pre.encoder, "embed_images", no_model)
    monkeypatch.setattr(eta.evaluator.post.model, "forward", no_model)
    messages, words = BAD_INPUTS[case]
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match=words):
        eta.generate(messages)
    assert time.perf_counter() - start < 1.0


def test_prompt_longer_than_the_context_is_refused_before_clip_runs(eta, monkeypatch):
    # Checking the length needs the tokenizer only; CLIP over many large images can take long.
    calls = []
    monkeypatch.setattr(eta.evaluator.pre, "score_images", lambda *a, **k: calls.append(a))
    too_long = "word " * (eta.vlm.context_length + 10)
    with pytest.raises(InvalidInputError, match="context"):
        eta.generate(_ask(make_test_image(), too_long))
    assert calls == []


def test_failed_clip_check_is_recorded_as_an_error_never_as_skipped_or_passed(eta, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("CLIP exploded")

    monkeypatch.setattr(eta.evaluator.pre, "score_images", boom)
    closed = eta.generate(
        _ask(make_test_image()), on_evaluator_error="fail_closed", post_threshold=-1e9
    )
    assert "pre" in closed.verdict.errors and "pre" not in closed.verdict.skipped
    opened = eta.generate(_ask(make_test_image()), on_evaluator_error="fail_open")
    assert "pre" in opened.verdict.errors and "pre" not in opened.verdict.skipped
    reason = opened.verdict.skipped["post"]
    assert "passed" not in reason and "fail_open" in reason


def test_failing_clip_raises_by_default_and_fail_closed_aligns(eta, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("CLIP exploded")

    monkeypatch.setattr(eta.evaluator.pre, "score_images", boom)
    with pytest.raises(EvaluatorError):
        eta.generate(_ask(make_test_image()))
    result = eta.generate(
        _ask(make_test_image()), on_evaluator_error="fail_closed", post_threshold=1e9
    )
    assert result.verdict.errors and result.aligned
    result = eta.generate(
        _ask(make_test_image()), on_evaluator_error="fail_open", post_threshold=1e9
    )
    assert result.verdict.errors and not result.aligned


@pytest.mark.parametrize(
    "bad", [RuntimeError("CLIP exploded"), float("nan")], ids=["raises", "nan"]
)
def test_clip_failing_during_the_search_is_an_evaluator_error(eta, monkeypatch, bad):
    def similarity(image_embeds, texts):
        if isinstance(bad, Exception):
            raise bad
        return torch.full((len(texts),), bad)

    monkeypatch.setattr(eta.evaluator.pre, "similarity", similarity)
    with pytest.raises(EvaluatorError, match="pre-generation"):
        eta.generate(_ask(make_test_image()), **FLAG_ALL)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_each_vlm_family_end_to_end(tiny_dir, family):
    ckpt = build_tiny_checkpoints(tiny_dir, vlm_family=family)
    eta = ETA.from_pretrained(
        ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model, config=ETAConfig(**FAST)
    )
    two_images = [
        {"role": "system", "content": "You are helpful."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": make_test_image("red")},
                {"type": "text", "text": "Compare"},
                {"type": "image", "image": make_test_image("checker")},
            ],
        },
    ]
    safe = eta.generate(two_images, pre_threshold=1.01)
    assert len(safe.verdict.image_scores) == 2 and not safe.aligned
    aligned = eta.generate(two_images, **FLAG_ALL)
    assert aligned.aligned and aligned.text.startswith("As an AI assistant") and aligned.trace
    follow_up = [
        *two_images,
        {"role": "assistant", "content": safe.text or "ok"},
        {"role": "user", "content": "And now?"},
    ]
    assert isinstance(eta.generate(follow_up, **FLAG_ALL).text, str)


def test_local_image_files_can_be_refused(eta, tmp_path):
    path = tmp_path / "pic.png"
    make_test_image().save(path)
    assert eta.generate(_ask(str(path)), pre_threshold=1.01).verdict.pre_score is not None
    with pytest.raises(InvalidInputError, match="local"):
        eta.generate(_ask(str(path)), allow_local_image_files=False)


def test_a_second_call_while_a_stream_is_open_in_the_same_thread_is_answered(eta):
    # One request path: model calls take the model's lock per call, never across a consumer's
    # pause, so an open stream in this thread cannot deadlock a second call (it used to be refused).
    expected = eta.generate(_ask(None)).text
    stream = eta.stream(_ask(None))
    first = next(stream).text
    assert eta.generate(_ask(None)).text == expected
    rest = [chunk for chunk in stream]
    assert first + "".join(c.text for c in rest) == expected == rest[-1].result.text
