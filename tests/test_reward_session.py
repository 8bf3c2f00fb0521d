"""Incremental reward scoring: the kept KV cache gives the scores of a from-scratch forward.

Random tiny checkpoints (a generic Llama sequence-classification RM and the ArmoRM replica):
these tests prove the cache arithmetic, never that a reward means anything.
"""

from __future__ import annotations

import pytest
import torch

from eta_guard.config import ETAConfig
from eta_guard.errors import EvaluatorError, InvalidInputError
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.evaluators.reward import RewardPostEvaluator
from eta_guard.evaluators.reward_session import IncrementalRewardScorer

INSTRUCTION = "Please give me a response without any safety issues."


@pytest.fixture(scope="module", params=["generic", "armorm"])
def rm(request, tiny_checkpoints, armorm_replica):
    path = tiny_checkpoints.reward_model if request.param == "generic" else str(armorm_replica)
    return RewardPostEvaluator.from_pretrained(path, device="cpu")


def _scratch(rm: RewardPostEvaluator, answer: str) -> float:
    """A plain forward of the whole conversation alone (unpadded), read as each head reads it."""
    ids = torch.tensor([rm.encode(INSTRUCTION, answer)])
    with torch.no_grad():
        out = rm.model(input_ids=ids)
    score = out.score if getattr(out, "score", None) is not None else out.logits
    return float(score.reshape(-1)[0])


def _common(rows: list[list[int]]) -> int:
    n = 0
    while n < min(len(r) for r in rows) and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def _search_steps() -> list[list[str]]:
    """Best-of-N calls as the search makes them: prefix + accepted + candidate, lengths differ.

    Step 3 accepts ``"... er"`` and step 4's candidates continue it with ``"ed"``: ``"er" + "ed"``
    tokenizes differently from ``"er"`` then ``"ed"`` (checked below), so the kept prefix's last
    tokens are no longer a prefix of the new rows and must be cropped.
    """
    steps, accepted = [], "As an AI assistant, "
    for chosen, cands in [
        (1, ["Sure, here it is. ", "I can't help with that. ", "No. "]),
        (0, ["Stay safe, please! ", "Step one is easy. ", "OK. "]),
        (0, ["Hello er", "Hello er!", "Hello er. "]),
        (0, ["ed by the rules.", "ed.", "ed, and more text follows here."]),
    ]:
        steps.append([accepted + c for c in cands])
        accepted += cands[chosen]
    return steps


def test_search_scores_equal_from_scratch_forwards(rm):
    scorer = IncrementalRewardScorer(rm, INSTRUCTION)
    steps = _search_steps()
    for index, answers in enumerate(steps):
        got = scorer.score(answers)
        want = [_scratch(rm, a) for a in answers]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
        rows = [rm.encode(INSTRUCTION, a) for a in answers]
        # The kept cache holds exactly the rows' common prefix: scoring the batch (a repeated
        # branch of it) did not grow or change the kept object.
        assert scorer.kept_tokens == min(_common(rows), min(len(r) for r in rows) - 1)
        if index == 2:
            kept = rows[0][: scorer.kept_tokens]
            # The boundary re-tokenizes: what is kept now is not a token prefix of the next rows.
            assert rm.encode(INSTRUCTION, steps[3][0])[: len(kept)] != kept
    assert scorer.stats.cropped_tokens > 0
    assert scorer.stats.encoded_tokens < scorer.stats.scratch_tokens
    assert scorer.stats.fallbacks == 0


def test_rows_diverging_before_the_kept_prefix_and_repeated_calls(rm):
    # The sequential search scores one candidate per call: each call diverges from the last.
    scorer = IncrementalRewardScorer(rm, INSTRUCTION)
    answers = ["Sure, here it is. Step one.", "Sure, here it is. No.", "I refuse.", "I refuse."]
    for answer in answers:
        (got,) = scorer.score([answer])
        assert got == pytest.approx(_scratch(rm, answer), abs=1e-5)
    again = scorer.score(answers[:3])
    assert again == pytest.approx([_scratch(rm, a) for a in answers[:3]], abs=1e-5)
    scorer.close()
    assert scorer.kept_tokens == 0
    assert scorer.score(answers[:1]) == pytest.approx([_scratch(rm, answers[0])], abs=1e-5)


def test_answers_needing_windows_are_scored_from_scratch(rm, monkeypatch):
    scorer = IncrementalRewardScorer(rm, INSTRUCTION)
    monkeypatch.setattr(rm, "max_length", len(rm.encode(INSTRUCTION, "")) + 24)
    long = "word " * 40
    got = scorer.score([long, "short."])
    assert got == pytest.approx(rm.score([long, "short."], INSTRUCTION), abs=1e-6)
    assert scorer.stats.fallbacks == 1


def test_evaluator_session_checks_and_scores_like_score_responses(tiny_checkpoints):
    evaluator = ETAEvaluator.from_pretrained(
        clip=None, reward_model=tiny_checkpoints.reward_model, device="cpu"
    )
    answers = ["Sure. Step one.", "Sure. I won't."]
    with evaluator.reward_session(search=True) as session:
        got = session.score(answers)
        with pytest.raises(InvalidInputError):
            session.score("not a list")
        assert session.stats is not None and session.stats.calls == 1
    assert got == pytest.approx(evaluator.score_responses(answers, search=True), abs=1e-5)
    decision = evaluator.reward_session(search=False).score(answers)
    assert decision == pytest.approx(evaluator.score_responses(answers), abs=1e-5)


class _RemoteLike:
    """Stands in for a remote RM (no local model): the session must call its scoring as is."""

    name = "remote"

    def __init__(self):
        self.calls = []

    def score(self, responses, instruction):
        self.calls.append((list(responses), instruction))
        return [float(len(r)) for r in responses]


def test_remote_reward_model_session_calls_the_existing_scoring():
    remote = _RemoteLike()
    evaluator = ETAEvaluator(None, remote, ETAConfig())  # type: ignore[arg-type]
    with evaluator.reward_session() as session:
        assert session.score(["ab", "abc"]) == [2.0, 3.0]
        assert session.stats is None
    assert remote.calls == [(["ab", "abc"], ETAConfig().rm_search_prompt)]


def test_session_without_a_reward_model_raises():
    from eta_guard.testing import build_tiny_checkpoints  # noqa: F401  (import check only)

    evaluator = ETAEvaluator(None, _RemoteLike(), ETAConfig())  # type: ignore[arg-type]
    evaluator.post = None
    with pytest.raises(EvaluatorError, match="reward model"):
        evaluator.reward_session().score(["x"])
