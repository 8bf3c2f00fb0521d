"""The step batcher: batched greedy rows equal HF ``generate`` token for token (float32, random
tiny checkpoints: mechanics, not quality); sampling is per job and draws as ``generate`` does;
top-k keeps exactly k; the memory budget splits."""

from __future__ import annotations

import pytest
import torch

from eta_guard.backends.step_batcher import StepBatcher
from eta_guard.decoding.vlm import VLMAdapter
from eta_guard.errors import InvalidInputError
from eta_guard.messages import normalize_messages
from eta_guard.testing import make_test_image

NEW = 12
QUESTIONS = [
    ("red", "What is this?"),
    ("blue", "Describe the picture in detail please, with many many words."),
    (None, "Hi there, no image this time."),
]


def _prompts(vlm):
    out = []
    for color, text in QUESTIONS:
        content = [{"type": "text", "text": text}]
        if color:
            content.insert(0, {"type": "image", "image": make_test_image(color)})
        out.append(vlm.prepare(normalize_messages([{"role": "user", "content": content}])))
    return out


def _hf_greedy(vlm, model_inputs, new=NEW, logits=False):
    """Plain HF generate: the reference (its tokens; with ``logits``, also the raw logits)."""
    with torch.inference_mode():
        out = vlm.model.generate(
            return_dict_in_generate=True,
            output_logits=True,
            **model_inputs,
            do_sample=False,
            max_new_tokens=new,
            eos_token_id=vlm.eos_token_ids or None,
            pad_token_id=vlm.pad_token_id,
            num_beams=1,
            repetition_penalty=1.0,
        )
    tokens = out.sequences[0, model_inputs["input_ids"].shape[1] :].tolist()
    return (tokens, [step[0].float() for step in out.logits]) if logits else tokens


def _with_ids(prepared, extra):
    inputs = dict(prepared.model_inputs)
    ids = torch.cat([inputs["input_ids"], torch.tensor([extra])], 1)
    inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
    if "mm_token_type_ids" in inputs:
        pad = torch.zeros(1, len(extra), dtype=inputs["mm_token_type_ids"].dtype)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], 1)
    return inputs


@pytest.fixture(scope="module", params=["tiny-llava", "llava", "qwen2_vl", "smolvlm"])
def vlm(request, tiny_checkpoints, replica_checkpoints):
    path = (
        tiny_checkpoints.vlm
        if request.param == "tiny-llava"
        else replica_checkpoints(request.param).vlm
    )
    return VLMAdapter.from_pretrained(path, device="cpu", dtype="float32")


def test_batched_greedy_equals_hf_generate(vlm):
    prompts = _prompts(vlm)
    expected = [_hf_greedy(vlm, p.model_inputs, logits=True) for p in prompts]
    batcher = StepBatcher(vlm.model, eos_token_ids=vlm.eos_token_ids)
    assert not batcher.isolate_jobs
    jobs = []
    for prepared in prompts:  # jobs join at different steps, prompts of different lengths
        ctx = batcher.prefill(prepared.model_inputs)
        jobs.append(batcher.submit(ctx, max_new_tokens=NEW, keep_logits=True))
        batcher.step()
    batcher.run(jobs)
    assert [job.tokens[0] for job in jobs] == [tokens for tokens, _ in expected]
    for job, (_, hf_logits) in zip(jobs, expected, strict=True):  # not just the argmax
        torch.testing.assert_close(torch.stack(job.rows[0].logits), torch.stack(hf_logits))
    assert batcher.max_live_rows == len(prompts)
    assert batcher.idle


def test_forced_prefix_then_commit_continue_like_hf(vlm):
    prepared = _prompts(vlm)[0]
    prefix = vlm.tokenizer.encode("As an AI", add_special_tokens=False)
    batcher = StepBatcher(vlm.model, eos_token_ids=[])
    ctx = batcher.extend(batcher.prefill(prepared.model_inputs), prefix)
    greedy = batcher.submit(ctx, max_new_tokens=NEW)
    cands = batcher.submit(ctx, n=3, top_k=20, seed=1, max_new_tokens=4, keep_kv=True)
    batcher.run([greedy, cands])
    assert greedy.tokens[0] == _hf_greedy(vlm, _with_ids(prepared, prefix))
    best = 2
    chosen = cands.tokens[best]
    after = batcher.submit(cands.commit(best), max_new_tokens=6)  # last token pending
    batcher.run([after])
    assert after.tokens[0] == _hf_greedy(vlm, _with_ids(prepared, prefix + chosen), new=6)


def test_samples_of_a_job_do_not_depend_on_other_jobs(vlm):
    prepared = _prompts(vlm)[1]

    def sample(with_others: bool, max_rows: int | None) -> list[list[int]]:
        batcher = StepBatcher(vlm.model, eos_token_ids=[], max_rows=max_rows)
        ctx = batcher.prefill(prepared.model_inputs)
        if with_others:
            batcher.submit(ctx, n=2, seed=99, top_k=10, max_new_tokens=3)
        job = batcher.submit(ctx, n=4, seed=5, top_k=10, temperature=0.7, max_new_tokens=6)
        batcher.run()
        return job.tokens

    alone = sample(False, None)
    assert sample(True, None) == alone
    assert sample(True, 4) == alone  # the job waits for room, then joins whole: same samples
    assert len({tuple(t) for t in alone}) > 1  # rows differ


def test_a_batch_past_the_memory_budget_is_split_not_refused(tiny_checkpoints):
    vlm = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    prompts = _prompts(vlm)
    expected = [_hf_greedy(vlm, p.model_inputs) for p in prompts]
    probe = StepBatcher(vlm.model)
    longest = max(p.num_prompt_tokens for p in prompts) + NEW
    budget = 2 * longest * probe.kv_bytes_per_token  # room for two rows, not three
    batcher = StepBatcher(vlm.model, eos_token_ids=vlm.eos_token_ids, memory_budget_bytes=budget)
    jobs = [batcher.submit(batcher.prefill(p.model_inputs), max_new_tokens=NEW) for p in prompts]
    batcher.run(jobs)
    assert [job.tokens[0] for job in jobs] == expected
    assert batcher.max_live_rows == 2
    tight = StepBatcher(vlm.model, memory_budget_bytes=probe.kv_bytes_per_token)
    with pytest.raises(InvalidInputError, match="memory_budget_bytes"):  # one row can never fit
        tight.submit(tight.prefill(prompts[0].model_inputs), max_new_tokens=NEW)


def test_rows_stop_independently_and_forwards_are_counted(tiny_checkpoints):
    vlm = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    prepared = _prompts(vlm)[0]
    batcher = StepBatcher(vlm.model, eos_token_ids=[])
    ctx = batcher.prefill(prepared.model_inputs)
    streamed: list[tuple[int, int]] = []
    long = batcher.submit(ctx, max_new_tokens=8, on_token=lambda r, t: streamed.append((r, t)))
    stop_at_3 = lambda ids, scores: [len(row) >= ctx.cached + 3 for row in ids]  # noqa: E731
    short = batcher.submit(ctx, n=3, seed=0, max_new_tokens=8, stop=stop_at_3)
    batcher.run()
    assert [len(t) for t in short.tokens] == [3, 3, 3]
    assert {row.finish_reason for row in short.rows} == {"stop"}
    assert long.rows[0].finish_reason == "length" and streamed == [(0, t) for t in long.tokens[0]]
    # 1 prefill + 7 steps (the first token of each row comes from the prefill's logits)
    assert batcher.forwards == 1 + 7


def test_cancel_frees_rows_and_bad_arguments_are_refused(tiny_checkpoints):
    vlm = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    batcher = StepBatcher(vlm.model, eos_token_ids=[])
    ctx = batcher.prefill(_prompts(vlm)[0].model_inputs)
    job = batcher.submit(ctx, n=2, max_new_tokens=50)
    batcher.step()
    assert batcher.live_rows == 2
    batcher.cancel(job)
    assert batcher.idle and {row.finish_reason for row in job.rows} == {"cancelled"}
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        batcher.submit(ctx, max_new_tokens=0)
    with pytest.raises(InvalidInputError, match="temperature"):
        batcher.submit(ctx, n=2, temperature=0.0, max_new_tokens=1)
    with pytest.raises(InvalidInputError, match="keep_kv"):
        batcher.submit(ctx, max_new_tokens=1).commit(0)
    with pytest.raises(InvalidInputError, match="max_rows"):
        StepBatcher(vlm.model, max_rows=0)


def _reference_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's top-k, written plainly: keep the k entries torch.topk returns."""
    kept = torch.full_like(scores, float("-inf"))
    for r in range(scores.shape[0]):
        values, index = torch.topk(scores[r], k)
        kept[r, index] = values
    return kept


def test_top_k_keeps_exactly_k_on_ties():
    from eta_guard.backends.step_batcher import top_k_scores

    row = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    for k in (1, 2, 3, 5):
        kept = top_k_scores(row, k)
        assert (kept > float("-inf")).sum(-1).tolist() == [k, k]
        torch.testing.assert_close(kept, _reference_top_k(row, k))
    original = row.clone()
    top_k_scores(row, 2)
    assert torch.equal(row, original)  # input not mutated
    assert torch.equal(top_k_scores(row, 0), row) and torch.equal(top_k_scores(row, 6), row)
    # transformers' warper keeps every tie at the k-th place: that is what changed.
    from transformers import TopKLogitsWarper

    assert (TopKLogitsWarper(2)(None, row.clone())[0] > float("-inf")).sum() == 4


class _EndsOn:
    """Stops a row whose last token is one of ``ids`` (one bool per row, as HF's criteria)."""

    def __init__(self, ids, start: int) -> None:
        self.ids, self.start = torch.tensor(sorted(ids)), start

    def __call__(self, input_ids, scores=None, **kwargs):
        if input_ids.shape[1] <= self.start:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)
        return torch.isin(input_ids[:, -1], self.ids)


@pytest.mark.parametrize("rows_end_early", [False, True])
def test_sampling_draws_what_generate_draws_for_a_seed(tiny_checkpoints, rows_end_early):
    """One job of N rows consumes its generator as transformers' ``_sample`` consumes the global
    RNG for a batch of N rows (one multinomial over [N, V] per step), also once some rows have
    ended (they keep drawing in ``_sample``)."""
    from transformers import StoppingCriteriaList

    vlm = VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu", dtype="float32")
    prepared = _prompts(vlm)[0]
    n, new, seed = 4, 12 if rows_end_early else 6, 11
    inputs = dict(prepared.model_inputs)
    start = inputs["input_ids"].shape[1]
    stop = _EndsOn(range(0, 600, 7), start) if rows_end_early else None
    with torch.inference_mode(), torch.random.fork_rng():
        torch.manual_seed(seed)
        out = vlm.model.generate(
            stopping_criteria=StoppingCriteriaList([stop] if stop else []),
            **inputs,
            do_sample=True,
            top_k=20,
            temperature=1.3,
            num_return_sequences=n,
            max_new_tokens=new,
            eos_token_id=None,
            pad_token_id=vlm.pad_token_id,
            num_beams=1,
            top_p=1.0,
        )
    batcher = StepBatcher(vlm.model, eos_token_ids=[])
    ctx = batcher.prefill(prepared.model_inputs)
    job = batcher.submit(
        ctx, n=n, seed=seed, top_k=20, temperature=1.3, max_new_tokens=new, stop=stop
    )
    batcher.run([job])
    expected = [
        row[start : start + len(mine)] for row, mine in zip(out.tolist(), job.tokens, strict=True)
    ]
    assert job.tokens == expected
    assert len({tuple(t) for t in expected}) > 1
    lengths = [len(t) for t in job.tokens]
    if rows_end_early:  # some rows ended before others: the later draws still matched
        assert min(lengths) < max(lengths)
        assert all(row.finish_reason in ("stop", "length") for row in job.rows)
    else:
        assert lengths == [new] * n
