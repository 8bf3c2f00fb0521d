"""ETAConfig: reference defaults, validation, overrides and JSON round trip."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from eta_guard import ETAConfig, InvalidInputError
from eta_guard.config import DEFAULT_RM_DECISION_PROMPT, DEFAULT_RM_SEARCH_PROMPT


def test_defaults_are_the_papers_values():
    cfg = ETAConfig()
    assert (cfg.pre_threshold, cfg.post_threshold) == (0.16, 0.06)
    assert cfg.safety_prompt == (
        "The image contains unsafe/porn/violent/politic/physical harmful/illegal/privacy contents."
    )
    assert cfg.prefix == "As an AI assistant"
    assert (cfg.num_candidates, cfg.top_k, cfg.temperature, cfg.alpha) == (5, 5, 1.5, 1.0)
    assert cfg.max_sentence_tokens == 70
    assert cfg.text_only_policy == "trust"
    assert cfg.on_evaluator_error == "raise"
    assert cfg.allow_remote_images is False


def test_reference_prompts_kept_verbatim_typos_included():
    assert "pricacy" in DEFAULT_RM_DECISION_PROMPT and "pricacy" in DEFAULT_RM_SEARCH_PROMPT
    assert "one word or phrase or number is good" in DEFAULT_RM_DECISION_PROMPT
    assert "one word" not in DEFAULT_RM_SEARCH_PROMPT
    assert "directly reject to the question" in DEFAULT_RM_DECISION_PROMPT
    assert "directly reject the question" in DEFAULT_RM_SEARCH_PROMPT


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("num_candidates", 0, "num_candidates"),
        ("top_k", 0, "top_k"),
        ("temperature", 0.0, "temperature"),
        ("temperature", -1.0, "temperature"),
        ("alpha", -0.5, "alpha"),
        ("max_sentence_tokens", 0, "max_sentence_tokens"),
        ("max_new_tokens", 0, "max_new_tokens"),
        ("text_only_policy", "maybe", "text_only_policy"),
        ("on_evaluator_error", "ignore", "on_evaluator_error"),
        ("sentence_terminators", (), "sentence_terminators"),
        ("sentence_terminators", ("",), "sentence_terminators"),
        ("seed", -1, "seed"),
        ("pre_threshold", float("nan"), "pre_threshold"),
        ("post_threshold", float("nan"), "post_threshold"),
        ("temperature", float("inf"), "temperature"),
        ("alpha", float("inf"), "alpha"),
        ("prefix_typo", "x", "prefix_typo"),
    ],
)
def test_invalid_values_are_refused_with_the_field_named(field, value, words):
    with pytest.raises(InvalidInputError, match=words) as info:
        ETAConfig(**{field: value})
    assert isinstance(info.value, ValueError)
    assert repr(value) in str(info.value) or field == "prefix_typo"


def test_config_is_immutable():
    cfg = ETAConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.num_candidates = 3  # type: ignore[misc]


def test_with_overrides_validates_and_leaves_original():
    cfg = ETAConfig()
    new = cfg.with_overrides(num_candidates=3, seed=7)
    assert (new.num_candidates, new.seed) == (3, 7)
    assert (cfg.num_candidates, cfg.seed) == (5, None)
    assert cfg.with_overrides() is cfg
    with pytest.raises(InvalidInputError, match="num_candidates"):
        cfg.with_overrides(num_candidates=-2)
    with pytest.raises(InvalidInputError, match="not_a_knob"):
        cfg.with_overrides(not_a_knob=1)


def test_json_round_trip(tmp_path):
    cfg = ETAConfig(pre_threshold=0.2, sentence_terminators=(".", "\u3002"), seed=3)
    path = tmp_path / "eta.json"
    cfg.save(path)
    assert ETAConfig.load(path) == cfg


def test_load_reports_bad_files(tmp_path):
    with pytest.raises(InvalidInputError, match="cannot read"):
        ETAConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"top_k": 0}')
    with pytest.raises(InvalidInputError, match="top_k"):
        ETAConfig.load(bad)
