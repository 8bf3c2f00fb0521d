"""Reward post-evaluator: safety format, scalar extraction, padding and truncation."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch

from eta_guard.config import DEFAULT_RM_DECISION_PROMPT, DEFAULT_RM_SEARCH_PROMPT, ETAConfig
from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.eta_evaluator import ETAEvaluator
from eta_guard.evaluators.reward import RewardPostEvaluator

USER_QUESTION = "How do I build a dangerous device at home?"
RESPONSES = [
    "I cannot help with that.",
    "Sure. First you gather the parts, then you assemble them carefully and test the result "
    "outside, far away from people, and you repeat the process until it works well.",
    "No.",
]
TEMPLATE_WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
)
TEMPLATE_WITHOUT_BOS = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def rm(tiny_checkpoints):
    return RewardPostEvaluator.from_pretrained(tiny_checkpoints.reward_model, device="cpu")


class _Capture:
    """Records the ``input_ids`` of every forward of a model."""

    def __init__(self, model):
        self.calls: list[torch.Tensor] = []
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append(kwargs.get("input_ids", args[0] if args else None).clone())

    def close(self):
        self._handle.remove()


def test_format_is_the_rm_chat_template(rm):
    expected = rm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "INSTR"}, {"role": "assistant", "content": "RESP"}],
        tokenize=False,
    )
    assert rm.format("INSTR", "RESP") == expected
    assert "INSTR" in expected and "RESP" in expected


def test_rm_sees_only_the_safety_conversation(rm, monkeypatch):
    seen = []
    original = rm.tokenizer.apply_chat_template

    def spy(conversation, **kwargs):
        rendered = original(conversation, **kwargs)
        seen.append((conversation, rendered))
        return rendered

    monkeypatch.setattr(rm.tokenizer, "apply_chat_template", spy)
    evaluator = ETAEvaluator(post=rm)
    # The user's question exists in the application, but nothing hands it to the RM.
    evaluator.evaluate_output(RESPONSES[1])
    evaluator.score_responses(RESPONSES[:2], search=True)
    # Renders of the template's skeleton (placeholder contents) carry no user text either.
    placeholders = [(c, r) for c, r in seen if "\ue000" in c[-1]["content"]]
    assert placeholders and all(USER_QUESTION not in r for _, r in placeholders)
    seen = [(c, r) for c, r in seen if "\ue000" not in c[-1]["content"]]
    # Counting the windows for the verdict renders a response once more.
    seen = [item for i, item in enumerate(seen) if item not in seen[:i]]
    assert [c for c, _ in seen] == [
        [
            {"role": "user", "content": DEFAULT_RM_DECISION_PROMPT},
            {"role": "assistant", "content": RESPONSES[1]},
        ],
        [
            {"role": "user", "content": DEFAULT_RM_SEARCH_PROMPT},
            {"role": "assistant", "content": RESPONSES[0]},
        ],
        [
            {"role": "user", "content": DEFAULT_RM_SEARCH_PROMPT},
            {"role": "assistant", "content": RESPONSES[1]},
        ],
    ]
    for conversation, rendered in seen:
        assert conversation[0]["content"] in rendered
        assert conversation[1]["content"] in rendered
        assert USER_QUESTION not in rendered


def test_padded_batch_equals_one_by_one(rm, monkeypatch):
    # The plain padded path (custom heads, short common prefixes): shared-prefix reuse off.
    monkeypatch.setattr("eta_guard.evaluators.reward._MIN_SHARED_PREFIX", 10**9)
    capture = _Capture(rm.model)
    try:
        batched = rm.score(RESPONSES, "be safe")
    finally:
        capture.close()
    assert len(capture.calls) == 1 and capture.calls[0].shape[0] == len(RESPONSES)
    lengths = {int((row != rm.pad_token_id).sum()) for row in capture.calls[0]}
    assert len(lengths) > 1  # the batch really was padded
    single = [rm.score([r], "be safe")[0] for r in RESPONSES]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-5, rtol=0)
    assert rm.model.config.pad_token_id == rm.pad_token_id


@pytest.mark.parametrize("template", [TEMPLATE_WITH_BOS, TEMPLATE_WITHOUT_BOS])
def test_bos_is_never_doubled(tiny_checkpoints, template):
    rm = RewardPostEvaluator.from_pretrained(
        tiny_checkpoints.reward_model, device="cpu", chat_template=template
    )
    bos = rm.tokenizer.bos_token_id
    capture = _Capture(rm.model)
    try:
        rm.score(["hello"], "be safe")
    finally:
        capture.close()
    ids = capture.calls[0][0].tolist()
    if bos is not None:
        assert ids[:2].count(bos) <= 1
        if template is TEMPLATE_WITH_BOS:
            assert ids[0] == bos


class _WithScore(torch.nn.Module):
    """ArmoRM-like: ``.score`` of shape [B, 1] next to multi-objective ``.logits``."""

    def __init__(self, base):
        super().__init__()
        self.base, self.config = base, base.config

    def forward(self, input_ids=None, attention_mask=None):
        logits = self.base(input_ids=input_ids, attention_mask=attention_mask).logits[:, :1]
        return SimpleNamespace(score=2.0 * logits + 1.0, logits=torch.zeros(len(logits), 19))


class _TwoLogits(torch.nn.Module):
    """A classifier head with two columns: the reward is column 0."""

    def __init__(self, base):
        super().__init__()
        self.base, self.config = base, base.config

    def forward(self, input_ids=None, attention_mask=None):
        logits = self.base(input_ids=input_ids, attention_mask=attention_mask).logits[:, :1]
        return SimpleNamespace(logits=torch.cat([logits, logits - 100.0], dim=1))


def test_score_attribute_wins_over_logits(rm):
    base = rm.score(RESPONSES, "be safe")
    wrapped = RewardPostEvaluator(_WithScore(rm.model), rm.tokenizer)
    torch.testing.assert_close(
        torch.tensor(wrapped.score(RESPONSES, "be safe")),
        2.0 * torch.tensor(base) + 1.0,
        atol=1e-5,
        rtol=0,
    )
    two = RewardPostEvaluator(_TwoLogits(rm.model), rm.tokenizer)
    torch.testing.assert_close(
        torch.tensor(two.score(RESPONSES, "be safe")), torch.tensor(base), atol=1e-5, rtol=0
    )


def test_long_response_is_scored_in_windows_that_keep_the_instruction(rm, caplog, monkeypatch):
    short = RewardPostEvaluator(rm.model, rm.tokenizer, max_length=48, max_windows=64)
    rendered = []
    original = short.tokenizer.apply_chat_template

    def spy(conversation, **kwargs):
        rendered.append((conversation[-1]["content"], original(conversation, **kwargs)))
        return rendered[-1][1]

    monkeypatch.setattr(short.tokenizer, "apply_chat_template", spy)
    long_response = " ".join(["the answer is safe and helpful"] * 80)
    capture = _Capture(short.model)
    try:
        with caplog.at_level(logging.INFO, logger="eta_guard.evaluators.reward"):
            scores = short.score([long_response, "ok"], "please be safe")
    finally:
        capture.close()
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert all(call.shape[1] <= 48 for call in capture.calls)
    rows = sum(call.shape[0] for call in capture.calls)
    windows = short.window_counts([long_response, "ok"], "please be safe")
    assert windows[1] == 1 and windows[0] > 1 and rows == sum(windows)
    assert "windows" in caplog.text and "max_length=48" in caplog.text
    # Every window is the whole safety conversation around a piece of the response.
    pieces = [c for c, r in rendered if "\ue000" not in c and c not in (long_response, "", "ok")]
    assert len(pieces) >= windows[0]
    assert all("please be safe" in r for c, r in rendered if "\ue000" not in c)
    assert "".join(pieces).replace(" ", "") != "" and all(p in long_response for p in pieces)
    with pytest.raises(InvalidInputError, match="instruction alone"):
        short.score(["x"], "please " * 200)
    with pytest.raises(InvalidInputError, match="max_windows=2"):
        RewardPostEvaluator(rm.model, rm.tokenizer, max_length=48, max_windows=2).score(
            [long_response], "please be safe"
        )


def test_missing_chat_template_is_an_error_at_load(tiny_checkpoints, tmp_path):
    ckpt = tmp_path / "rm"
    shutil.copytree(tiny_checkpoints.reward_model, ckpt)
    (ckpt / "chat_template.jinja").unlink(missing_ok=True)
    config_path = ckpt / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="chat_template="):
        RewardPostEvaluator.from_pretrained(str(ckpt), device="cpu")
    rm = RewardPostEvaluator.from_pretrained(
        str(ckpt), device="cpu", chat_template=TEMPLATE_WITHOUT_BOS
    )
    assert rm.format("I", "R") == "<user> I\n<assistant> R\n"


def test_custom_code_checkpoint_asks_for_trust_remote_code(tiny_checkpoints, tmp_path):
    ckpt = tmp_path / "custom"
    shutil.copytree(tiny_checkpoints.reward_model, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "armo_like_custom"
    config["auto_map"] = {
        "AutoConfig": "modeling_custom.CustomConfig",
        "AutoModelForSequenceClassification": "modeling_custom.CustomRM",
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="trust_remote_code=True"):
        RewardPostEvaluator.from_pretrained(str(ckpt), device="cpu")


def test_bad_inputs(rm, tmp_path):
    with pytest.raises(InvalidInputError, match="list of strings"):
        rm.score("one string", "be safe")
    with pytest.raises(InvalidInputError, match=r"responses\[1\]"):
        rm.score(["ok", 3], "be safe")
    with pytest.raises(InvalidInputError, match="instruction"):
        rm.score(["ok"], "")
    assert rm.score([], "be safe") == []
    with pytest.raises(InvalidInputError, match="cannot load the reward model"):
        RewardPostEvaluator.from_pretrained(str(tmp_path / "nope"), local_files_only=True)


def test_search_prompt_changes_scores(rm):
    evaluator = ETAEvaluator(post=rm, config=ETAConfig())
    decision = evaluator.score_responses(RESPONSES)
    search = evaluator.score_responses(RESPONSES, search=True)
    torch.testing.assert_close(
        torch.tensor(search),
        torch.tensor(rm.score(RESPONSES, DEFAULT_RM_SEARCH_PROMPT)),
        atol=1e-5,
        rtol=0,
    )
    assert decision != search


def test_shared_prefix_forward_equals_full_forwards(rm, monkeypatch):
    """Best-of-N answers share the instruction and the accepted text: that prefix runs once."""
    accepted = "As an AI assistant I cannot help with that request. Here is some advice instead. "
    answers = [
        accepted + tail for tail in ("Stay safe.", "Ask a doctor!", "Please be careful", "No.")
    ]
    instruction = "Be safe and helpful."
    seen: list[tuple[int, ...]] = []
    original = rm.model.forward

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(rm.model, "forward", spy)
    shared = rm.score(answers, instruction)
    assert len(seen) == 1 and seen[0][1] < 20, "only the differing suffixes run batched"
    monkeypatch.setattr(rm, "_forward_shared_prefix", None)  # would fail if called
    one_by_one = [rm.score([a], instruction)[0] for a in answers]
    assert shared == pytest.approx(one_by_one, abs=1e-5)


def test_shared_prefix_with_pad_equal_to_the_end_of_turn_token(rm, monkeypatch):
    """A pad id equal to the template's end-of-turn token (Llama-3 RMs without a pad token fall
    back to EOS = <|eot_id|>) must not shift the pooled position of an answer that is a token
    prefix of the others (e.g. a best-of-N candidate that ended at once)."""
    eot = rm.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert rm.format("x", "y").endswith("<|eot_id|>")
    monkeypatch.setattr(rm, "pad_token_id", eot)
    monkeypatch.setattr(rm.model.config, "pad_token_id", eot)
    accepted = "As an AI assistant I cannot help with that request. Here is some advice instead."
    answers = [accepted, accepted + " Stay safe.", accepted + " Ask a doctor!"]
    instruction = "Be safe and helpful."
    shared = rm.score(answers, instruction)
    one_by_one = [rm.score([a], instruction)[0] for a in answers]
    assert shared == pytest.approx(one_by_one, abs=1e-5)
