"""Sentence-level best-of-N: exactness of the batched, cache-sharing decode; scoring; costs; seeds."""

from __future__ import annotations

import pytest
import torch

from eta_guard.backends.local_search import SentenceBestOfN
from eta_guard.config import ETAConfig
from eta_guard.decoding.best_of_n import score_candidates, use_clip_term
from eta_guard.decoding.vlm import VLMAdapter
from eta_guard.errors import InvalidInputError
from eta_guard.messages import Conversation

PREFIX = "As an AI assistant"
#: Short sentences on random tiny models: frequent characters end them.
TERMINATORS = (".", "e", "a", "o")


@pytest.fixture(scope="module")
def qwen(vlm_paths) -> VLMAdapter:
    return VLMAdapter.from_pretrained(vlm_paths("qwen2_vl"), local_files_only=True)


def conversation(images) -> Conversation:
    content = [{"type": "image"} for _ in images] + [
        {"type": "text", "text": "What is in the picture?"}
    ]
    return Conversation(messages=[{"role": "user", "content": content}], images=list(images))


def config(**overrides) -> ETAConfig:
    values = {
        "seed": 0,
        "num_candidates": 3,
        "max_new_tokens": 24,
        "max_sentence_tokens": 6,
        "sentence_terminators": TERMINATORS,
    }
    return ETAConfig(**{**values, **overrides})


def length_reward(answers: list[str]) -> list[float]:
    return [len(a) / 100 for a in answers]


def constant_clip(sentences: list[str]) -> list[float]:
    return [0.5] * len(sentences)


class SearchRecorder:
    """Records every sampling job the search submits to the step batcher (its context, rows and
    the raw logits each token was chosen from) and every prefill that encodes pixels."""

    def __init__(self, monkeypatch) -> None:
        from eta_guard.backends.step_batcher import StepBatcher

        self.jobs: list = []
        self.pixel_calls = 0
        submit, prefill = StepBatcher.submit, StepBatcher.prefill

        def record_submit(batcher, context, **kwargs):
            if kwargs.get("do_sample"):
                kwargs["keep_logits"] = True
                job = submit(batcher, context, **kwargs)
                self.jobs.append(job)
                return job
            return submit(batcher, context, **kwargs)

        def record_prefill(batcher, model_inputs):
            self.pixel_calls += "pixel_values" in model_inputs
            return prefill(batcher, model_inputs)

        monkeypatch.setattr(StepBatcher, "submit", record_submit)
        monkeypatch.setattr(StepBatcher, "prefill", record_prefill)

    @property
    def samples(self) -> list[dict]:
        """One record per sampling job: start length, rows, cache length, ids and logits per row."""
        return [
            {
                "start": len(job.context.ids),
                "rows": len(job.rows),
                "cache_before": job.context.cached,
                "ids": [list(row.ids) for row in job.rows],
                "logits": [list(row.logits) for row in job.rows],
            }
            for job in self.jobs
        ]


@pytest.fixture
def recorder(monkeypatch):
    return lambda adapter: SearchRecorder(monkeypatch)


def full_forward_logits(adapter: VLMAdapter, prepared, ids: torch.Tensor) -> torch.Tensor:
    """``[len, vocab]`` logits of a plain forward over ``ids`` ``[1, len]`` with the image, no cache."""
    inputs = dict(prepared.model_inputs)
    inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
    if "mm_token_type_ids" in inputs:
        mm = prepared.model_inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat(
            [mm, mm.new_zeros(1, ids.shape[1] - mm.shape[1])], 1
        )
    with torch.inference_mode():
        return adapter.model(**inputs).logits[0]


# ----- exactness of the batched decode over the carried cache -----
@pytest.mark.parametrize("reuse_vanilla_cache", [False, True])
def test_batched_candidates_match_uncached_decoding(
    vlm, test_images, recorder, reuse_vanilla_cache
):
    conv = conversation(test_images[:2])
    prepared = vlm.prepare(conv, assistant_prefix=PREFIX)
    kwargs = {}
    if reuse_vanilla_cache:
        vanilla = vlm.generate_greedy(vlm.prepare(conv), max_new_tokens=4)
        kwargs = {"cache": vanilla.cache, "cache_ids": vanilla.sequence_ids}
    rec = recorder(vlm)
    out = SentenceBestOfN(vlm, config()).run(
        prepared, reward_fn=length_reward, clip_fn=constant_clip, **kwargs
    )
    assert len(out.trace) >= 2, "need several sentences to check the carried cache"
    assert rec.pixel_calls == (0 if reuse_vanilla_cache else 1)  # the image is encoded once
    assert max_logit_gap(vlm, prepared, out, rec, rows=3) < 1e-4


def test_batched_candidates_match_uncached_decoding_multi_turn(vlm, test_images, recorder):
    """A system turn, an image per user turn and an assistant turn between: same exactness."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
    ]
    conv = Conversation(messages=messages, images=list(test_images[:2]))
    prepared = vlm.prepare(conv, assistant_prefix=PREFIX)
    vanilla = vlm.generate_greedy(vlm.prepare(conv), max_new_tokens=4)
    rec = recorder(vlm)
    out = SentenceBestOfN(vlm, config()).run(
        prepared,
        reward_fn=length_reward,
        clip_fn=constant_clip,
        cache=vanilla.cache,
        cache_ids=vanilla.sequence_ids,
    )
    assert len(out.trace) >= 2
    assert rec.pixel_calls == 0  # the vanilla answer's cache holds both images
    assert max_logit_gap(vlm, prepared, out, rec, rows=3) < 1e-4


def max_logit_gap(adapter, prepared, out, rec, *, rows: int, steps: int = 3) -> float:
    """Largest gap between the batched search's raw logits and uncached full forwards."""
    worst = 0.0
    for i, (step, sample) in enumerate(list(zip(out.trace, rec.samples, strict=True))[:steps]):
        start = sample["start"]
        # cache invariant: the context minus its last token (fed at batch N), except a first step
        # straight from a prefill, whose logits for the next token are at hand
        assert sample["cache_before"] in ((start - 1, start) if i == 0 else (start - 1,))
        assert sample["rows"] == rows
        for row, candidate in enumerate(step.candidates):
            n = candidate.num_tokens
            ids = torch.tensor([sample["ids"][row][: start + n - 1]])
            reference = full_forward_logits(adapter, prepared, ids)
            for t in range(n):
                gap = (reference[start - 1 + t] - sample["logits"][row][t]).abs().max().item()
                worst = max(worst, gap)
    return worst


def test_sliding_window_layers_are_cropped_exactly(vlm_paths, test_images, recorder):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = vlm_paths("qwen2_vl")
    cfg = AutoConfig.from_pretrained(path)
    text = cfg.text_config
    text.sliding_window = 8  # far shorter than the prompt: the window is full from the start
    text.layer_types = ["full_attention"] + ["sliding_attention"] * (text.num_hidden_layers - 1)
    model = AutoModelForImageTextToText.from_pretrained(path, config=cfg)
    adapter = VLMAdapter(model, AutoProcessor.from_pretrained(path))
    assert any(adapter.new_cache().is_sliding)
    prepared = adapter.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    assert prepared.num_prompt_tokens > 2 * text.sliding_window
    rec = recorder(adapter)
    out = SentenceBestOfN(adapter, config()).run(prepared, reward_fn=length_reward)
    assert len(out.trace) >= 2
    assert max_logit_gap(adapter, prepared, out, rec, rows=3) < 1e-4


def test_cache_covers_accepted_context_after_each_step(llava, test_images, recorder):
    prepared = llava.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    rec = recorder(llava)
    out = SentenceBestOfN(llava, config()).run(prepared, reward_fn=length_reward)
    accepted = 0
    for step, sample in zip(out.trace, rec.samples, strict=True):
        # each step starts from prompt + the tokens accepted so far, the cache one token behind
        assert sample["start"] == prepared.num_prompt_tokens + accepted
        assert sample["cache_before"] == sample["start"] - (0 if accepted == 0 else 1)
        kept = sample["ids"][step.chosen][
            sample["start"] : sample["start"] + step.candidates[step.chosen].num_tokens
        ]
        assert kept == out.token_ids[accepted : accepted + len(kept)]
        accepted += step.candidates[step.chosen].num_tokens
    assert accepted == len(out.token_ids)


def test_foreign_cache_is_not_trusted(llava, test_images, recorder):
    conv = conversation(test_images[:1])
    prepared = llava.prepare(conv, assistant_prefix=PREFIX)
    fresh = SentenceBestOfN(llava, config()).run(prepared, reward_fn=length_reward)
    other = llava.generate_greedy(llava.prepare(conversation(test_images[1:2])), max_new_tokens=3)
    rec = recorder(llava)
    reused = SentenceBestOfN(llava, config()).run(
        prepared, reward_fn=length_reward, cache=other.cache, cache_ids=other.sequence_ids
    )
    assert rec.pixel_calls == 1  # different image tokens: re-prefilled from scratch
    assert reused.token_ids == fresh.token_ids


def test_cache_without_ids_is_refused(llava, test_images):
    prepared = llava.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    vanilla = llava.generate_greedy(llava.prepare(conversation(test_images[:1])), max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="cache_ids"):
        SentenceBestOfN(llava, config()).run(prepared, reward_fn=length_reward, cache=vanilla.cache)


# ----- scoring rule -----
@pytest.mark.parametrize(
    ("index", "ended", "has_clip", "expected"),
    [
        (1, [False, False], True, False),  # first sentence: reward only
        (2, [False, False], True, True),
        (2, [False, True], True, False),  # a candidate ends the answer: reward only
        (3, [False, False], False, False),  # text-only
    ],
)
def test_use_clip_term_table(index, ended, has_clip, expected):
    assert use_clip_term(index, ended, has_clip) is expected


@pytest.mark.parametrize(
    ("rewards", "clips", "index", "alpha", "expected"),
    [
        ([0.1, 0.2], None, 1, 1.0, [0.1, 0.2]),
        ([0.1, 0.2], [0.5, 0.1], 2, 1.0, [0.35, 0.25]),
        ([0.1, 0.2], [0.5, 0.1], 4, 2.0, [0.35, 0.25]),
        ([0.0], [0.3], 3, 0.0, [0.0]),
    ],
)
def test_score_table(rewards, clips, index, alpha, expected):
    assert score_candidates(rewards, clips, index=index, alpha=alpha) == pytest.approx(expected)


def test_run_applies_the_rule_and_takes_the_argmax(llava, test_images):
    prepared = llava.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    calls = {"reward": [], "clip": []}

    def reward(answers):
        calls["reward"].append(list(answers))
        return [((len(a) * 7) % 11) / 10 for a in answers]

    def clip(sentences):
        calls["clip"].append(list(sentences))
        return [((len(s) * 3) % 5) / 4 for s in sentences]

    cfg = config(alpha=2.0, num_candidates=4)
    out = SentenceBestOfN(llava, cfg).run(prepared, reward_fn=reward, clip_fn=clip)
    assert len(calls["reward"]) == len(out.trace)  # one batched reward call per sentence
    for step in out.trace:
        i = step.index
        uses_clip = i > 1 and not any(c.ended for c in step.candidates)
        for c in step.candidates:
            assert (c.clip is not None) == uses_clip
            expected = c.reward + (cfg.alpha / i) * c.clip if uses_clip else c.reward
            assert c.score == pytest.approx(expected)
        scores = [c.score for c in step.candidates]
        assert step.chosen == scores.index(max(scores))
    assert len(calls["clip"]) == sum(1 for s in out.trace if s.candidates[0].clip is not None)
    assert all(len(batch) == 4 for batch in calls["clip"])
    # reward sees the whole answer so far: prefix + accepted text + candidate
    chosen_answer = PREFIX
    for step, answers in zip(out.trace, calls["reward"], strict=True):
        settled = chosen_answer.rstrip("\ufffd")  # a character split at the cut completes later
        for answer, candidate in zip(answers, step.candidates, strict=True):
            # a candidate adds text unless it is the EOS alone (it ends the answer)
            assert answer.startswith(settled)
            assert len(answer) > len(settled) or candidate.ended
        chosen_answer = answers[step.chosen]
    assert PREFIX + out.text == chosen_answer


def test_step_with_an_eos_candidate_has_no_clip_term(llava, test_images, monkeypatch):
    prepared = llava.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    # make a third of the vocabulary end the answer so that EOS candidates show up
    vocab = llava.model.config.get_text_config(decoder=True).vocab_size
    monkeypatch.setattr(llava, "eos_token_ids", list(range(0, vocab, 3)))
    seen = False
    for seed in range(20):
        cfg = config(seed=seed, num_candidates=4, max_sentence_tokens=4)
        # prefer long answers so the search keeps going past EOS candidates
        out = SentenceBestOfN(llava, cfg).run(
            prepared, reward_fn=length_reward, clip_fn=constant_clip
        )
        for step in out.trace[1:]:
            if any(c.ended for c in step.candidates):
                seen = True
                assert all(c.clip is None for c in step.candidates)
                assert [c.score for c in step.candidates] == [c.reward for c in step.candidates]
            else:
                assert all(c.clip == 0.5 for c in step.candidates)
        if out.finish_reason == "stop":
            assert out.trace[-1].candidates[out.trace[-1].chosen].ended
        if seen:
            break
    assert seen


def test_text_only_scores_reward_alone(llava):
    prepared = llava.prepare(conversation([]), assistant_prefix=PREFIX)
    out = SentenceBestOfN(llava, config()).run(prepared, reward_fn=length_reward, clip_fn=None)
    assert out.trace and all(c.clip is None for s in out.trace for c in s.candidates)


def test_reward_fn_must_return_one_score_per_answer(llava, test_images):
    prepared = llava.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    with pytest.raises(InvalidInputError, match="reward_fn returned 1 scores for 3"):
        SentenceBestOfN(llava, config()).run(prepared, reward_fn=lambda answers: [0.0])


# ----- budgets, streaming, reproducibility -----
def test_budgets_and_sentence_callback(vlm, test_images):
    prepared = vlm.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    deltas = []
    cfg = config(max_new_tokens=17, max_sentence_tokens=5)
    out = SentenceBestOfN(vlm, cfg).run(
        prepared, reward_fn=length_reward, on_sentence=deltas.append
    )
    assert len(out.token_ids) <= 17
    assert all(c.num_tokens <= 5 for s in out.trace for c in s.candidates)
    assert out.finish_reason == ("stop" if out.token_ids[-1] in vlm.eos_token_ids else "length")
    if out.finish_reason == "length":
        assert len(out.token_ids) == 17
    assert "".join(deltas) == out.text
    assert out.text == vlm.decode_continuation(prepared.input_ids[0], out.token_ids)
    assert out.decoded_tokens == sum(c.num_tokens for s in out.trace for c in s.candidates)
    assert set(out.timings) == {"decode", "reward", "clip"}


def test_seed_reproducible_and_global_rng_untouched(qwen, test_images):
    prepared = qwen.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    state = torch.get_rng_state()
    first = SentenceBestOfN(qwen, config(seed=7)).run(
        prepared, reward_fn=length_reward, clip_fn=constant_clip
    )
    assert torch.equal(torch.get_rng_state(), state)
    again = SentenceBestOfN(qwen, config(seed=7)).run(
        prepared, reward_fn=length_reward, clip_fn=constant_clip
    )
    assert again.token_ids == first.token_ids
    assert [s.model_dump() for s in again.trace] == [s.model_dump() for s in first.trace]
    others = [
        SentenceBestOfN(qwen, config(seed=s)).run(prepared, reward_fn=length_reward).token_ids
        for s in (8, 9)
    ]
    assert any(o != first.token_ids for o in others)


def test_top_k_one_reproduces_greedy_decoding(vlm, test_images):
    prepared = vlm.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    greedy = vlm.generate_greedy(prepared, max_new_tokens=20)
    out = SentenceBestOfN(vlm, config(top_k=1, max_new_tokens=20)).run(
        prepared, reward_fn=length_reward
    )
    assert out.token_ids == greedy.token_ids
    assert out.finish_reason == greedy.finish_reason


def test_sequential_mode_matches_batched_and_costs_like_the_reference(llava, test_images, recorder):
    prepared = llava.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    calls = {True: [], False: []}
    outputs = {}
    for batched in (True, False):
        rec = recorder(llava)

        def reward(answers, batched=batched):
            calls[batched].append(len(answers))
            return length_reward(answers)

        # top_k=1: every candidate is the same argmax path, so both modes must agree exactly
        outputs[batched] = SentenceBestOfN(llava, config(top_k=1), batched=batched).run(
            prepared, reward_fn=reward, clip_fn=constant_clip
        )
        sample_rows = [s["rows"] for s in rec.samples]
        steps = len(outputs[batched].trace)
        assert sample_rows == ([3] * steps if batched else [1] * (3 * steps))
    assert outputs[True].token_ids == outputs[False].token_ids
    assert [s.chosen for s in outputs[True].trace] == [s.chosen for s in outputs[False].trace]
    assert calls[True] == [3] * len(outputs[True].trace)  # one reward call per sentence
    assert calls[False] == [1] * (3 * len(outputs[False].trace))  # one per candidate


def test_sequential_mode_with_sampling_keeps_the_rule(llava, test_images):
    prepared = llava.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    cfg = config(num_candidates=3)
    out = SentenceBestOfN(llava, cfg, batched=False).run(
        prepared, reward_fn=length_reward, clip_fn=constant_clip
    )
    for step in out.trace:
        assert len(step.candidates) == 3
        scores = [c.score for c in step.candidates]
        assert step.chosen == scores.index(max(scores))
    assert "".join(s.candidates[s.chosen].text for s in out.trace) == out.text


def test_stop_string_ends_the_search(llava, test_images):
    prepared = llava.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    cfg = config(max_new_tokens=30)
    full = SentenceBestOfN(llava, cfg).run(prepared, reward_fn=length_reward)
    assert len(full.trace) >= 3
    second = full.trace[1].candidates[full.trace[1].chosen].text
    stop = next(second[i : i + 2] for i in range(len(second) - 1) if second[i : i + 2].strip())
    deltas = []
    out = SentenceBestOfN(llava, cfg).run(
        prepared, reward_fn=length_reward, stop=[stop], on_sentence=deltas.append
    )
    assert out.text == full.text[: full.text.find(stop)]
    assert out.finish_reason == "stop"
    assert len(out.trace) <= 2 and out.trace == full.trace[: len(out.trace)]
    assert "".join(deltas) == out.text


def test_reused_cache_survives_a_call_with_other_images(qwen, test_images, recorder):
    # Qwen2-VL keeps rope deltas between calls: a call with another image in between must not
    # shift the positions of the continued cache.
    conv = conversation(test_images[:1])
    prepared = qwen.prepare(conv, assistant_prefix=PREFIX)
    vanilla = qwen.generate_greedy(qwen.prepare(conv), max_new_tokens=3)
    qwen.generate_greedy(qwen.prepare(conversation([test_images[1]] * 2)), max_new_tokens=2)
    rec = recorder(qwen)
    out = SentenceBestOfN(qwen, config()).run(
        prepared, reward_fn=length_reward, cache=vanilla.cache, cache_ids=vanilla.sequence_ids
    )
    assert rec.pixel_calls == 0
    assert max_logit_gap(qwen, prepared, out, rec, rows=3) < 1e-4


def test_search_top_k_keeps_exactly_k_on_ties(llava, test_images, monkeypatch):
    """Issue 18 item 4: every logits row has four tokens tied at the top and top_k=2; the
    reference's torch.topk keeps two of them, so the search never samples the other two
    (transformers' TopKLogitsWarper keeps all four ties)."""
    import asyncio

    from eta_guard.backends.local_search import LocalSearch
    from eta_guard.decoding.protocol import SamplingStep

    vocab = llava.model.get_output_embeddings().weight.shape[0]
    tied = [t for t in range(20, 40) if t not in llava.eos_token_ids][:4]
    row = torch.zeros(vocab)
    row[tied] = 5.0
    reference = set(torch.topk(row, 2).indices.tolist())  # the reference's construction
    assert len(reference) == 2 and reference < set(tied)
    real = llava.model.forward

    def tied_forward(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits = row.expand(*out.logits.shape[:-1], vocab).clone()
        return out

    monkeypatch.setattr(llava.model, "forward", tied_forward)
    prepared = llava.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    step = SamplingStep(n=5, max_tokens=6, top_k=2, temperature=1.5, terminators=("\u2603",))

    async def sample_twice() -> list[int]:
        search = LocalSearch(llava, prepared, seed=0)
        try:
            first = await search.sample(step)
            await search.commit(0)
            second = await search.sample(step)
        finally:
            await search.aclose()
        return [t for c in first + second for t in c.token_ids]

    tokens = asyncio.run(asyncio.wait_for(sample_twice(), 120))
    assert len(tokens) == 60
    assert set(tokens) == reference  # both kept tokens drawn, never a third tie


def test_a_search_closed_while_its_context_is_built_keeps_no_kv(llava, test_images):
    """aclose() while sample() awaits the start context (a speculative search waiting for the
    vanilla's prefill): the context that arrives afterwards is dropped, not kept past the close
    (the held-back-stream test in test_engine_schedule.py saw ``_state`` set after close)."""
    import asyncio

    from eta_guard.backends.local_search import LocalSearch
    from eta_guard.decoding.protocol import SamplingStep
    from eta_guard.errors import RequestCancelled

    prepared = llava.prepare(conversation(test_images[:1]), assistant_prefix=PREFIX)
    step = SamplingStep(n=2, max_tokens=4, top_k=5, temperature=1.0, terminators=(".",))

    async def scenario() -> LocalSearch:
        release = asyncio.Event()
        made: list[object] = []

        async def context():
            await release.wait()
            made.append(object())
            return made[-1]

        search = LocalSearch(llava, prepared, seed=0, context=context)
        sampling = asyncio.ensure_future(search.sample(step))
        await asyncio.sleep(0.05)  # sample() now waits for the context
        await search.aclose()
        release.set()
        with pytest.raises(RequestCancelled):
            await sampling
        assert made  # the context did arrive after the close
        return search

    search = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert search._state is None
