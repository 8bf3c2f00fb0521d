"""Evaluator specs: the grammar, its typed errors, and every entry point that takes them.

Each entry-point test would fail if the spec were ignored: CLIP is told never to flag
(``pre_threshold=2``, above any cosine) and the gate the spec names is told to always flag
(``patch-clip?threshold=-1``, below any cosine), so only a gate that was built and run flips the
verdict. The models are random tiny ones: mechanics, not safety.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eta_guard import ETA, ETAConfig, ETAEvaluator
from eta_guard.cli import app
from eta_guard.evaluators.specs import KINDS, EvaluatorSpec, SpecError, build_guards, parse_spec
from eta_guard.testing import make_test_image

GATE = "patch-clip?grid=2,threshold=-1"
CLIP_NEVER = {"pre_threshold": 2.0}
KEY = "test-key-0123456789abcdef"


# ---------------------------------------------------------------- grammar
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("patch-clip", EvaluatorSpec("patch-clip", text="patch-clip")),
        (
            "patch-clip?grid=3,whole=false",
            EvaluatorSpec(
                "patch-clip",
                options={"grid": 3, "whole": False},
                text="patch-clip?grid=3,whole=false",
            ),
        ),
        (
            " Llama-Guard-Vision:meta-llama/Llama-Guard-3-11B-Vision?threshold=0.3,exclude=S6+S7 ",
            EvaluatorSpec(
                "llama-guard-vision",
                "meta-llama/Llama-Guard-3-11B-Vision",
                options={"threshold": 0.3, "exclude": ["S6", "S7"]},
                text="Llama-Guard-Vision:meta-llama/Llama-Guard-3-11B-Vision?threshold=0.3,exclude=S6+S7",
            ),
        ),
        (
            "remote-llama-guard:meta-llama/Llama-Guard-3-8B@http://guard:8000/v1?api_key_env=KEY",
            EvaluatorSpec(
                "remote-llama-guard",
                "meta-llama/Llama-Guard-3-8B",
                "http://guard:8000/v1",
                {"api_key_env": "KEY"},
                "remote-llama-guard:meta-llama/Llama-Guard-3-8B@http://guard:8000/v1?api_key_env=KEY",
            ),
        ),
        (
            "qwen3guard:/ckpt/q3g?controversial=safe",
            EvaluatorSpec(
                "qwen3guard",
                "/ckpt/q3g",
                options={"controversial": "safe"},
                text="qwen3guard:/ckpt/q3g?controversial=safe",
            ),
        ),
    ],
)
def test_specs_parse(text, expected):
    assert parse_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "role", "part", "says"),
    [
        ("", None, "", "empty"),
        ("llama-guard:/x", None, "llama-guard", "unknown kind"),
        ("patch-clip:/some/clip", None, "/some/clip", "takes no checkpoint"),
        ("shieldgemma2", None, "shieldgemma2", "needs a target"),
        ("shieldgemma2:/x?policy=dangerous", None, "policy", "has no option 'policy'"),
        ("patch-clip?grid=three", None, "grid=three", "option grid='three'"),
        ("patch-clip?threshold=nan", None, "threshold=nan", "not finite"),
        ("patch-clip?grid", None, "grid", "not KEY=VALUE"),
        ("patch-clip?grid=2,grid=3", None, "grid", "given twice"),
        ("remote-llama-guard:model-only", None, "model-only", "MODEL@URL"),
        ("remote-llama-guard:m@ftp://x", None, "m@ftp://x", "http(s) URL"),
        ("shieldgemma2:/x", "judge", "shieldgemma2", "cannot be used in --post-judge"),
        ("patch-clip", "judge", "patch-clip", "gate only"),
    ],
)
def test_bad_specs_name_the_bad_part(text, role, part, says):
    with pytest.raises(SpecError) as info:
        parse_spec(text, role=role)
    assert info.value.part == part
    assert says in str(info.value)


def test_every_kind_is_documented():
    doc = open("docs/evaluators.md", encoding="utf-8").read()
    missing = [k for k in KINDS if f"`{k}" not in doc]
    assert not missing


def test_a_non_string_spec_is_refused():
    with pytest.raises(SpecError.__mro__[1]):  # InvalidInputError
        parse_spec(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- Python entry points
@pytest.fixture(scope="module")
def base(tiny_checkpoints):
    return ETAEvaluator.from_pretrained(
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        config=ETAConfig(**CLIP_NEVER),
    )


def test_patch_clip_spec_needs_a_loaded_clip():
    with pytest.raises(SpecError, match="none is loaded"):
        build_guards([GATE])


def test_etaevaluator_takes_specs(base):
    plain = base.evaluate_input([make_test_image()])
    guarded = ETAEvaluator(base.pre, base.post, base.config, gates=[GATE])
    verdict = guarded.evaluate_input([make_test_image()])
    assert not plain.input_unsafe and verdict.input_unsafe
    assert verdict.fired == ["patch-clip"]
    assert guarded.gates[0].grid == 2


def test_from_pretrained_takes_specs(tiny_checkpoints):
    evaluator = ETAEvaluator.from_pretrained(
        clip=tiny_checkpoints.clip,
        reward_model=None,
        config=ETAConfig(**CLIP_NEVER),
        gates=[GATE, GATE],
    )
    verdict = evaluator.evaluate_input([make_test_image()])
    assert verdict.input_unsafe and verdict.fired == ["patch-clip", "patch-clip#2"]


def test_eta_from_pretrained_takes_specs(tiny_checkpoints):
    eta = ETA.from_pretrained(
        tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        config=ETAConfig(**CLIP_NEVER, max_new_tokens=4),
        gates=[GATE],
    )
    messages = [{"role": "user", "content": [{"type": "image", "image": make_test_image()}]}]
    result = eta.generate(messages)
    assert "patch-clip" in result.verdict.fired
    assert "post" not in result.verdict.skipped  # the gate sent it to the post-check


def test_eta_from_openai_compatible_takes_specs(tiny_checkpoints):
    # Built, not called: the engine is never contacted until a request is made.
    eta = ETA.from_openai_compatible(
        "http://127.0.0.1:9",
        "served-vlm",
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        tokenizer=tiny_checkpoints.vlm,
        config=ETAConfig(**CLIP_NEVER),
        gates=[GATE],
    )
    assert eta.evaluator.evaluate_input([make_test_image()]).fired == ["patch-clip"]


def test_a_bad_spec_fails_before_any_weight_loads(tiny_checkpoints, image_path, monkeypatch):
    from eta_guard.evaluators import clip as clip_module

    def boom(*a, **k):
        raise AssertionError("CLIP was loaded before the spec was checked")

    monkeypatch.setattr(clip_module.CLIPPreEvaluator, "from_pretrained", boom)
    runner = CliRunner()
    result = runner.invoke(
        app, ["evaluate", "-i", image_path, "--clip", tiny_checkpoints.clip, "--gate", "nope:x"]
    )
    assert result.exit_code != 0
    assert "unknown kind 'nope'" in result.output


# ---------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "gradient.png"
    make_test_image().save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_args(tiny_checkpoints, tiny_dir):
    return ["--tiny", "--cache-dir", str(tiny_dir), "--set", "pre_threshold=2"]


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


def test_cli_evaluate_takes_gate_specs(tiny_args, image_path):
    runner = CliRunner()
    args = ["evaluate", "-i", image_path, *tiny_args, "--json"]
    plain = _json(runner.invoke(app, args))
    gated = _json(runner.invoke(app, [*args, "--gate", GATE, "--text", "What is this?"]))
    assert not plain["input_unsafe"] and gated["input_unsafe"]
    assert gated["fired"] == ["patch-clip"]


def test_cli_generate_takes_gate_specs_and_the_rule(tiny_args, image_path):
    runner = CliRunner()
    args = ["generate", "Hi?", "-i", image_path, *tiny_args, "--max-new-tokens", "3", "--json"]
    gated = _json(runner.invoke(app, [*args, "--gate", GATE, "--decision-rule", "pre_only"]))
    assert "patch-clip" in gated["verdict"]["fired"]
    assert gated["verdict"]["rule"] == "pre_only" and gated["aligned"]  # the gate alone decided
    bad = runner.invoke(app, [*args, "--decision-rule", "maybe"])
    assert bad.exit_code != 0 and "decision_rule" in bad.output


def test_cli_eval_takes_gate_specs(tiny_args, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from eval_fixtures import make_figstep

    root = make_figstep(tmp_path / "figstep")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--dataset",
            "figstep",
            "--path",
            str(root),
            *tiny_args,
            "--judge",
            "refusal",
            "--gate",
            GATE,
            "--out",
            str(out),
            "--set",
            "max_new_tokens=4",
            "--set",
            "num_candidates=2",
        ],
    )
    assert result.exit_code == 0, result.output
    header, *rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert header["settings"]["gates"] == [GATE]
    items = [r for r in rows if r.get("type") == "item"]
    # CLIP never flags (pre_threshold 2): only the gate can have flagged the input
    assert items and all(r["verdict"]["input_unsafe"] for r in items)
    assert all(r["verdict"]["pre_score"] < 2 for r in items)


def test_cli_post_judge_refuses_a_gate_only_kind(tiny_args, image_path):
    result = CliRunner().invoke(
        app, ["evaluate", "-i", image_path, *tiny_args, "--post-judge", "patch-clip"]
    )
    assert result.exit_code != 0 and "cannot be used in --post-judge" in result.output


# ---------------------------------------------------------------- server
class _CategoryGate:
    """A gate that reads the text and names a category (the shape a Llama Guard answer gives)."""

    name = "stub-guard"
    threshold = 0.5
    applies_to = frozenset({"images", "text_only"})

    def check(self, requests):
        from eta_guard.evaluators.base import GuardScore

        return [
            GuardScore(0.9, ("S11",)) if "jump" in r.text else GuardScore(0.1) for r in requests
        ]


def _moderate(evaluator, body):
    import httpx

    from eta_guard.server import ServerSettings, create_app
    from eta_guard.server.runner import serve_in_thread

    app = create_app(evaluator=evaluator, settings=ServerSettings(api_keys={KEY}))
    with serve_in_thread(app) as url:
        resp = httpx.post(
            url + "/v1/moderations",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def _image_input(text):
    from eta_guard.testing import image_to_data_url

    return [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": image_to_data_url(make_test_image())}},
    ]


def test_moderation_reports_gate_specs(base):
    evaluator = ETAEvaluator(
        base.pre, base.post, base.config.with_overrides(decision_rule="pre_only"), gates=[GATE]
    )
    (result,) = _moderate(evaluator, {"input": _image_input("What is this?")})
    assert result["flagged"] and result["categories"]["unsafe/patch-clip"]
    assert not result["categories"]["unsafe/image"]  # CLIP alone would have passed it
    assert result["category_scores"]["unsafe/patch-clip"] > 0.5
    assert result["category_applied_input_types"]["unsafe/patch-clip"] == ["image", "text"]


def test_moderation_categories_come_from_the_guard(base):
    cfg = base.config.with_overrides(decision_rule="pre_only", text_only_policy="guard")
    evaluator = ETAEvaluator(base.pre, base.post, cfg, gates=[_CategoryGate()])
    (flagged,) = _moderate(evaluator, {"input": _image_input("I will jump from here")})
    (passed,) = _moderate(evaluator, {"input": _image_input("a cake")})
    (text_only,) = _moderate(evaluator, {"input": "I want to jump"})
    assert flagged["flagged"] and flagged["categories"]["stub-guard/S11"]
    assert flagged["category_scores"]["stub-guard/S11"] == pytest.approx(0.9)
    assert "stub-guard/S11" not in passed["categories"] and not passed["flagged"]
    assert passed["category_scores"]["unsafe/stub-guard"] == pytest.approx(0.1)
    assert text_only["flagged"] and text_only["categories"]["stub-guard/S11"]
    assert text_only["category_applied_input_types"]["stub-guard/S11"] == ["text"]


def test_cli_serve_takes_gate_specs(tiny_args, monkeypatch):
    """``serve --moderation-only --gate SPEC``: the app uvicorn would run moderates with the gate."""
    import time

    import httpx
    import uvicorn

    from eta_guard.server.runner import serve_in_thread

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setenv("ETA_GUARD_API_KEYS", KEY)
    result = CliRunner().invoke(
        app, ["serve", "--moderation-only", *tiny_args, "--gate", GATE, "--decision-rule", "or"]
    )
    assert result.exit_code == 0, result.output
    with serve_in_thread(apps[0]) as url:
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        body = {"input": _image_input("What is this?")}
        resp = httpx.post(
            url + "/v1/moderations",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
    (out,) = resp.json()["results"]
    assert out["categories"]["unsafe/patch-clip"] and not out["categories"]["unsafe/image"]
    assert out["eta"]["rule"] == "or"


# ---------------------------------------------------------------- preset and memory estimate
def test_cross_modal_preset_loads_one_guard_for_gate_and_judge(tiny_checkpoints, tmp_path):
    from dataclasses import replace

    from eta_guard.presets import CROSS_MODAL, get_preset
    from eta_guard.replicas.llama_guard_vision import build_llama_guard_vision_replica

    assert get_preset("Cross-Modal") is CROSS_MODAL
    (real,) = CROSS_MODAL.gates
    assert parse_spec(real, role="gate").target == "meta-llama/Llama-Guard-3-11B-Vision"
    guard = build_llama_guard_vision_replica(tmp_path / "lg3v")
    spec = f"llama-guard-vision:{guard}"
    preset = replace(CROSS_MODAL, gates=(spec,), judges=(spec,))  # the replica in its place
    common = {"clip": tiny_checkpoints.clip, "reward_model": tiny_checkpoints.reward_model}
    evaluator = ETAEvaluator.from_pretrained(**common, preset=preset)
    (gate,), (judge,) = evaluator.gates, evaluator.judges
    assert gate.model is judge.model and (gate.mode, judge.mode) == ("prompt", "response")
    assert evaluator.config.decision_rule == "and"
    explicit = ETAEvaluator.from_pretrained(**common, preset=preset, gates=[GATE])
    assert [g.name for g in explicit.gates] == ["patch-clip"]  # given gates win, judges stay
    assert [j.name for j in explicit.judges] == ["llama-guard-vision-response"]


def test_estimate_counts_each_guard_checkpoint_once(tmp_path):
    from transformers import AutoModelForCausalLM

    from eta_guard.memory import estimate_memory
    from eta_guard.replicas.shieldgemma2 import build_shieldgemma2_replica
    from eta_guard.replicas.text_guards import build_llama_guard_3_text_replica

    lg = build_llama_guard_3_text_replica(tmp_path / "lg")
    sg = tmp_path / "sg"
    build_shieldgemma2_replica(sg)
    estimate = estimate_memory(
        guards=[
            f"llama-guard-text:{lg}",
            f"llama-guard-text:{lg}",  # gate + judge: one copy
            f"shieldgemma2:{sg}?dtype=bfloat16",
            "patch-clip",  # shares CLIP
            "remote-llama-guard:m@http://guard:8000",  # on an engine
        ]
    )
    assert [m.role for m in estimate.models] == ["guard: llama-guard-text", "guard: shieldgemma2"]
    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(lg).parameters())
    assert estimate.models[0].parameters == real
    assert estimate.models[0].weight_bytes == 4 * real
    assert estimate.models[1].precision == "bfloat16"


def test_cli_estimate_takes_guard_specs(tiny_args, tmp_path):
    from eta_guard.replicas.text_guards import build_qwen3guard_replica

    q3 = build_qwen3guard_replica(tmp_path / "q3")
    result = CliRunner().invoke(
        app,
        ["estimate", *tiny_args[:3], "--gate", f"qwen3guard:{q3}", "--json"],
    )
    out = _json(result)
    assert [m["role"] for m in out["models"]][-1] == "guard: qwen3guard"
