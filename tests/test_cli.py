"""The ``eta-guard`` command, end to end on the session's random tiny checkpoints (offline)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eta_guard.cli import RANDOM_MODELS_LINE, app

ROOT = Path(__file__).resolve().parents[1]
FORCE_ALIGN = ["--set", "pre_threshold=-1.01", "--set", "post_threshold=1e9"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def tiny_args(tiny_checkpoints, tiny_dir: Path) -> list[str]:
    """``--tiny`` pointed at the session's checkpoint folder (already built, so reused)."""
    return ["--tiny", "--cache-dir", str(tiny_dir)]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from eta_guard.testing import make_test_image

    path = tmp_path_factory.mktemp("cli-images") / "noise.png"
    make_test_image("noise", (64, 64)).save(path)
    return str(path)


def _ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


# ----------------------------------------------------------------------------- light import


def test_cli_import_loads_neither_torch_nor_transformers() -> None:
    code = "import sys, eta_guard.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    _ok(result)
    for command in ("generate", "evaluate", "demo", "bench"):
        assert command in result.stdout


# ----------------------------------------------------------------------------- generate


def test_generate_json_safe_path(runner, tiny_args, image_path) -> None:
    args = ["generate", "What is in this picture?", "-i", image_path, *tiny_args]
    args += ["--max-new-tokens", "4", "--set", "pre_threshold=1.01", "--json"]
    result = runner.invoke(app, args)
    _ok(result)
    data = json.loads(result.stdout)  # stdout is pure JSON; notes and progress go to stderr
    assert data["aligned"] is False
    assert data["verdict"]["pre_score"] is not None
    assert data["verdict"]["post_score"] is None and "post" in data["verdict"]["skipped"]
    assert 1 <= data["usage"]["output_tokens"] <= 4
    assert RANDOM_MODELS_LINE.split(":")[0] in result.stderr


def test_generate_json_aligned_path(runner, tiny_args, image_path) -> None:
    args = ["generate", "What is in this picture?", "-i", image_path, *tiny_args, *FORCE_ALIGN]
    args += ["--set", "num_candidates=2", "--set", "seed=0", "--max-new-tokens", "6", "--json"]
    result = runner.invoke(app, args)
    _ok(result)
    data = json.loads(result.stdout)
    assert data["aligned"] is True and data["verdict"]["unsafe"] is True
    assert data["text"].startswith("As an AI assistant")
    assert data["trace"] and len(data["trace"][0]["candidates"]) == 2


def test_generate_prints_answer_and_verdict(runner, tiny_args, image_path) -> None:
    args = ["generate", "Describe it.", "-i", image_path, *tiny_args, "--max-new-tokens", "4"]
    result = runner.invoke(app, args)
    _ok(result)
    assert result.stdout.startswith("answer: ")
    assert "ETA verdict" in result.stdout and "image (CLIP)" in result.stdout


def test_generate_text_only_is_trusted_by_default(runner, tiny_args) -> None:
    result = runner.invoke(
        app, ["generate", "Hello?", *tiny_args, "--max-new-tokens", "3", "--json"]
    )
    _ok(result)
    verdict = json.loads(result.stdout)["verdict"]
    assert verdict["pre_score"] is None and verdict["post_score"] is None
    assert set(verdict["skipped"]) == {"pre", "post"}


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_image_and_response(runner, tiny_args, image_path) -> None:
    args = ["evaluate", "-i", image_path, "-r", "Sure, here is how.", *tiny_args, "--json"]
    result = runner.invoke(app, args)
    _ok(result)
    verdict = json.loads(result.stdout)
    assert verdict["pre_score"] is not None and verdict["post_score"] is not None
    assert verdict["unsafe"] == (verdict["input_unsafe"] and verdict["output_unsafe"])


def test_evaluate_response_only_skips_clip(runner, tiny_args) -> None:
    result = runner.invoke(app, ["evaluate", "-r", "-", *tiny_args, "--json"], input="A reply.\n")
    _ok(result)
    verdict = json.loads(result.stdout)
    assert verdict["pre_score"] is None and verdict["post_score"] is not None


def test_evaluate_table_and_exit_code(runner, tiny_args, image_path) -> None:
    args = ["evaluate", "-i", image_path, "-r", "x", *tiny_args, *FORCE_ALIGN]
    result = runner.invoke(app, [*args, "--exit-code"])
    assert result.exit_code == 1, result.output
    assert "UNSAFE" in result.stdout
    _ok(runner.invoke(app, args))  # without --exit-code an unsafe verdict is still exit 0


# ----------------------------------------------------------------------------- demo and bench


def test_demo_tiny_runs_every_branch(runner, tiny_args) -> None:
    result = runner.invoke(
        app, ["demo", *tiny_args, "--max-new-tokens", "8"], env={"COLUMNS": "200"}
    )
    _ok(result)
    out = result.stdout
    assert RANDOM_MODELS_LINE in out
    assert "answer returned as decoded" in out and "aligned answer" in out
    assert "best-of-N search" in out and "demo finished" in out


def test_bench_tiny_writes_figures(runner, tiny_args, tmp_path) -> None:
    path = tmp_path / "out" / "bench.json"
    args = ["bench", "--size", "tiny", "--cache-dir", tiny_args[-1], "--tokens", "4", "--reps", "1"]
    args += ["--warmup", "0", "--candidates", "2", "--sentence-tokens", "3", "--json", str(path)]
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    _ok(result)
    assert "safe_path_ratio" in result.stdout and "batched_speedup" in result.stdout
    data = json.loads(path.read_text())
    for key in ("safe_path_ratio", "batched_speedup", "batched_speedup_raw", "unsafe_path_ratio"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    assert set(data["best_figures"]) == {
        "safe_path_ratio",
        "batched_speedup",
        "unsafe_path_ratio",
        "unsafe_sequential_ratio",
        "cleared_speculation_ratio",
    }
    assert math.isfinite(data["unsafe_sequential_ratio"]) and data["unsafe_sequential_ratio"] > 0
    forwards = data["forwards"]
    assert forwards["plain"]["vlm"] >= 1 and forwards["plain"]["reward_model"] == 0
    for arm in ("unsafe_speculative", "unsafe_sequential"):
        # the unsafe path decodes more than plain generate and runs the RM at least twice
        assert forwards[arm]["vlm"] > forwards["plain"]["vlm"]
        assert forwards[arm]["reward_model"] >= 2 and forwards[arm]["critical_path_ratio"] > 1
    assert data["setup"]["size"] == "tiny" and data["setup"]["num_candidates"] == 2
    assert data["safe"]["eta_tokens"] == data["safe"]["baseline_tokens"]
    assert data["same_tokens"] is True  # the safe path returns plain greedy's answer


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "q", "-i", "/no/such/image.png", "--tiny"], "image path refused"),
        (["generate", "q", "--tiny", "--set", "no_such_field=1"], "no_such_field"),
        (["generate", "q", "--tiny", "--set", "seed"], "FIELD=VALUE"),
        (["generate", "q", "--tiny", "--set", "num_candidates=0"], "num_candidates"),
        (["generate", "q"], "--vlm"),
        (["generate", "q", "--tiny", "--vlm", "x"], "--tiny"),
        (["generate", "q", "--config", "/no/such/config.json"], "/no/such/config.json"),
        (["evaluate"], "nothing to evaluate"),
        (["demo"], "--tiny"),
        (["bench", "--size", "huge"], "--size"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(runner, tmp_path, args, message) -> None:
    result = runner.invoke(app, [*args, "--cache-dir", str(tmp_path)] if "--tiny" in args else args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_missing_model_is_a_clear_error(runner, tmp_path) -> None:
    result = runner.invoke(app, ["generate", "q", "--vlm", str(tmp_path / "no-such-model")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output


def test_typer_usage_errors_exit_2(runner) -> None:
    result = runner.invoke(app, ["bench", "--reps", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


# ----------------------------------------------------------------------------- README and CI


def test_ci_runs_the_readme_commands() -> None:
    """The README's first code block is exactly what .ci/run executes."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci, command


def test_moderation_example_runs_offline() -> None:
    script = ROOT / "examples" / "moderation.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RANDOM" in out.stdout and "Input filter" in out.stdout and "Output filter" in out.stdout
    assert "images passed" in out.stdout


def test_config_table_lists_every_field_with_its_default() -> None:
    from eta_guard.config import ETAConfig

    section = (ROOT / "docs" / "configuration.md").read_text()  # moved out of the README
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*?) \|", section, re.M))
    assert set(rows) == set(ETAConfig.model_fields)
    for name, field in ETAConfig.model_fields.items():
        default, cell = field.default, rows[name]
        if not cell.startswith("`"):  # the long prompts are described, not quoted
            continue
        if isinstance(default, str):
            expected = json.dumps(default)
        elif isinstance(default, tuple):
            one = "," if len(default) == 1 else ""  # Python's spelling of a 1-tuple: (".",)
            expected = "(" + ", ".join(json.dumps(v) for v in default) + one + ")"
        else:
            expected = str(default)
        assert cell.strip("`") == expected, name


def test_generate_over_an_engine_and_its_refusals(runner, tiny_args, image_path) -> None:
    """--generator-url: the VLM runs on the stub engine (tests/backend_stub.py); the helper
    `serve` shares refuses local-VLM options instead of ignoring them."""
    sys.path.insert(0, str(Path(__file__).parent))
    from backend_stub import StubServer

    with StubServer() as stub:
        engine = ["--generator-url", stub.url, "--generator-model", "tiny-vlm"]
        args = ["generate", "What is in this picture?", "-i", image_path, *tiny_args, *engine]
        result = runner.invoke(app, [*args, "--set", "pre_threshold=1.01", "--json"])
        _ok(result)
        data = json.loads(result.stdout)
        assert data["text"] == "Sure, here is how." and data["model_name"] == "tiny-vlm"
        assert stub.bodies("/v1/chat/completions")[0]["model"] == "tiny-vlm"
        sent = len(stub.requests)
        for extra, flag in (
            (["--preset", "paper"], "--preset"),
            (["--vlm-device", "cpu"], "--vlm-device"),
        ):
            refused = runner.invoke(app, [*args, *extra])
            assert refused.exit_code == 2 and flag in refused.stderr, refused.output
        assert len(stub.requests) == sent  # refused before any request
