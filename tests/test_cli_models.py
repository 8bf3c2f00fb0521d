"""The CLI's one model loader: every command takes the same model options, remote evaluators
and the engine reach the public constructors, options that cannot apply are refused."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import eta_guard.cli as cli_package
from eta_guard.cli import app
from eta_guard.cli.options import RULE_FIELDS, SPEC_FIELDS, VLM_FIELDS, ModelOptions

SPEC_FLAGS = {f"--{f.replace('_', '-')}" for f in SPEC_FIELDS}
RULE_FLAGS = {f"--{f.replace('_', '-')}" for f in RULE_FIELDS}
MODEL_FLAGS = (
    {f"--{f.replace('_', '-')}" for f in ModelOptions.__dataclass_fields__}
    - SPEC_FLAGS
    - RULE_FLAGS
)
VLM_FLAGS = {f"--{f.replace('_', '-')}" for f in VLM_FIELDS}
ENGINE = ["--generator-url", "http://127.0.0.1:9/v1", "--generator-model", "served-vlm"]


def _flags(command: str) -> set[str]:
    out = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
    return set(re.findall(r"(--[a-z][a-z-]+)", out))


@pytest.mark.parametrize("command", ["generate", "serve", "eval", "demo", "estimate"])
def test_every_vlm_command_takes_every_model_option(command):
    assert MODEL_FLAGS <= _flags(command), MODEL_FLAGS - _flags(command)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("generate", SPEC_FLAGS | RULE_FLAGS),
        ("evaluate", SPEC_FLAGS | RULE_FLAGS),
        ("serve", SPEC_FLAGS | RULE_FLAGS),
        ("eval", SPEC_FLAGS | RULE_FLAGS),
        ("estimate", SPEC_FLAGS),  # memory only: the rule changes nothing there
        ("demo", set()),
        ("calibrate", set()),
    ],
)
def test_evaluator_spec_options_where_they_apply(command, expected):
    assert _flags(command) & (SPEC_FLAGS | RULE_FLAGS) == expected


@pytest.mark.parametrize("command", ["evaluate", "calibrate"])
def test_evaluator_commands_take_every_evaluator_option(command):
    flags = _flags(command)
    assert MODEL_FLAGS - VLM_FLAGS <= flags and not VLM_FLAGS & flags


def test_every_cli_module_imports_alone():
    """No import cycle at run time: each module imports first in a fresh interpreter."""
    folder = Path(cli_package.__file__).parent
    names = sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "__main__"))
    code = "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)"
    for name in names:
        subprocess.run(
            [sys.executable, "-c", code, f"eta_guard.cli.{name}"], check=True, timeout=120
        )


@pytest.fixture
def captured(monkeypatch):
    """Replace the public constructors: record what the options turned into."""
    import eta_guard.backends.factory
    import eta_guard.pipeline

    seen: dict = {}

    def engine(cls, url, model, **kw):
        seen["engine"] = {"url": url, "model": model, **kw}
        raise SystemExit(0)  # stop here: only the wiring is under test

    def local(cls, vlm, **kw):
        seen["local"] = {"vlm": vlm, **kw}
        raise SystemExit(0)

    def evaluator(clip, reward_model, **kw):
        seen["evaluator"] = {"clip": clip, "reward_model": reward_model, **kw}
        raise SystemExit(0)

    monkeypatch.setattr(eta_guard.pipeline.ETA, "from_openai_compatible", classmethod(engine))
    monkeypatch.setattr(eta_guard.pipeline.ETA, "from_pretrained", classmethod(local))
    monkeypatch.setattr(eta_guard.backends.factory, "build_evaluator", evaluator)
    monkeypatch.setattr("eta_guard.cli.models.print_estimate", lambda *a, **k: None)
    monkeypatch.setenv("ETA_GUARD_GENERATOR_API_KEY", "gen-key")
    monkeypatch.setenv("ETA_GUARD_CLIP_API_KEY", "clip-key")
    monkeypatch.setenv("ETA_GUARD_REWARD_MODEL_API_KEY", "rm-key")
    return seen


REMOTE = [
    "--clip",
    "served-clip",
    "--clip-url",
    "http://clip:1/v1",
    "--reward-model",
    "served-rm",
    "--reward-model-url",
    "http://rm:2",
]


def test_evaluate_reaches_remote_evaluators(captured, tmp_path):
    from eta_guard.testing import make_test_image

    image = tmp_path / "a.png"
    make_test_image().save(image)
    result = CliRunner().invoke(app, ["evaluate", "-i", str(image), "-r", "hi", *REMOTE])
    assert result.exit_code == 0, result.output
    made = captured["evaluator"]
    assert (made["clip"], made["reward_model"]) == ("served-clip", "served-rm")
    assert made["clip_url"] == "http://clip:1/v1" and made["clip_api_key"] == "clip-key"
    assert made["reward_model_url"] == "http://rm:2" and made["reward_model_api_key"] == "rm-key"
    assert made["reward_model_tokenizer"] == "served-rm"  # breaks forged markers in answers


def _serve(monkeypatch, args):
    """``eta-guard serve ARGS`` without a server; then run the background loader."""
    import uvicorn

    import eta_guard.server.app

    made: dict = {}
    monkeypatch.setattr(eta_guard.server.app, "create_app", lambda **kw: made.update(kw))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 0, result.output
    with pytest.raises(SystemExit):
        made["loader"]()


@pytest.mark.parametrize("command", ["generate", "eval", "serve"])
def test_engine_commands_reach_remote_evaluators(captured, tmp_path, monkeypatch, command):
    (tmp_path / "d.jsonl").write_text('{"id": "1", "question": "q"}\n')
    options = ["--vlm", "tok/dir", *ENGINE, *REMOTE]
    if command == "serve":
        _serve(monkeypatch, options)
    else:
        args = {
            "generate": ["generate", "q"],
            "eval": ["eval", "--dataset", "jsonl", "--path", str(tmp_path / "d.jsonl")],
        }[command]
        result = CliRunner().invoke(app, [*args, *options])
        assert result.exit_code == 0, result.output
    made = captured["engine"]
    assert made["url"] == "http://127.0.0.1:9/v1" and made["model"] == "served-vlm"
    assert made["api_key"] == "gen-key" and made["tokenizer"] == "tok/dir"
    assert made["clip"] == "served-clip" and made["clip_url"] == "http://clip:1/v1"
    assert made["clip_api_key"] == "clip-key" and made["reward_model_api_key"] == "rm-key"


def test_a_preset_without_padding_reaches_the_engine_path(captured):
    """--preset cross-modal pads nothing, so it is allowed with --generator-url (paper is not)."""
    args = ["generate", "q", "--vlm", "tok/dir", *ENGINE, "--preset", "cross-modal"]
    result = CliRunner().invoke(app, [*args, "--gate", "patch-clip"])
    assert result.exit_code == 0, result.output
    assert captured["engine"]["preset"] == "cross-modal"
    assert [s.kind for s in captured["engine"]["gates"]] == ["patch-clip"]


def test_serve_moderation_only_reaches_remote_evaluators(captured, monkeypatch):
    _serve(monkeypatch, ["--moderation-only", *REMOTE])
    assert captured["evaluator"]["reward_model_url"] == "http://rm:2"
    assert captured["evaluator"]["clip_api_key"] == "clip-key"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "q", "--vlm", "v", "--clip-url", "http://c"], "with a local VLM"),
        (
            ["evaluate", "-r", "x", "--reward-model-url", "http://r", "--reward-model-dtype", "x"],
            "--reward-model-dtype",
        ),
        (["generate", "q", "--vlm", "v", *ENGINE, "--preset", "paper"], "pads images"),
        (["generate", "q", *ENGINE], "needs --vlm"),
        (["serve", "a", "--vlm", "b"], "named twice"),
    ],
    ids=["local-vlm-remote-clip", "remote-rm-placement", "preset-engine", "no-tokenizer", "twice"],
)
def test_options_that_cannot_apply_are_refused(captured, args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not captured  # refused before anything loads


@pytest.mark.parametrize("form", [["serve", "some/vlm"], ["serve", "--vlm", "some/vlm"]])
def test_the_vlm_is_named_either_way(captured, monkeypatch, form):
    _serve(monkeypatch, form[1:])
    assert captured["local"]["vlm"] == "some/vlm"


def test_threads_option_sets_torch_threads_on_the_model_thread(tmp_path):
    import torch

    from eta_guard.model_thread import model_thread

    worker = model_thread("cpu")
    before_here, before_there = torch.get_num_threads(), worker.call(torch.get_num_threads)
    # A count neither thread has now, so the assertions cannot pass by default.
    wanted = max(before_here, before_there) + 1
    try:
        result = CliRunner().invoke(
            app,
            ["generate", "--tiny", "--cache-dir", str(tmp_path), "--threads", str(wanted),
             "--max-new-tokens", "2", "Hello"],
        )
        assert result.exit_code == 0, result.output
        assert worker.call(torch.get_num_threads) == wanted
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before_here)
        worker.call(torch.set_num_threads, before_there)


def test_threads_option_refuses_zero():
    result = CliRunner().invoke(app, ["generate", "--tiny", "--threads", "0", "Hello"])
    assert result.exit_code != 0 and "--threads" in result.output
