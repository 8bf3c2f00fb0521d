"""``eta-guard estimate``, ``--preset`` and per-model placement flags (tiny checkpoints, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eta_guard.cli import app

REFERENCE = Path(__file__).parent / "fixtures" / "reference_configs"


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def tiny_args(tiny_checkpoints, tiny_dir: Path) -> list[str]:
    return ["--tiny", "--cache-dir", str(tiny_dir)]


def _ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


def test_estimate_tiny_json_matches_the_engine(runner, tiny_args, tiny_checkpoints) -> None:
    from eta_guard.memory import estimate_memory

    result = runner.invoke(app, ["estimate", *tiny_args, "--dtype", "bfloat16", "--json"])
    _ok(result)
    data = json.loads(result.stdout)
    ck = tiny_checkpoints
    expected = estimate_memory(ck.vlm, ck.clip, ck.reward_model, dtype="bfloat16").to_dict()
    assert [m["parameters"] for m in data["models"]] == [
        m["parameters"] for m in expected["models"]
    ]
    assert data["total_bytes"] == expected["total_bytes"]


def test_estimate_reference_paper_split_and_quantized(runner) -> None:
    args = [
        "estimate",
        str(REFERENCE / "llava-1.5-7b-hf"),
        "--clip",
        str(REFERENCE / "clip-vit-large-patch14-336"),
        "--reward-model",
        str(REFERENCE / "ArmoRM-Llama3-8B-v0.1"),
        "--preset",
        "paper",
        "--device",
        "cuda:0",
        "--reward-model-device",
        "cuda:1",
        "--quantize",
        "reward_model=4bit",
        "--json",
    ]
    result = runner.invoke(app, args)
    _ok(result)
    data = json.loads(result.stdout)
    by_role = {m["role"]: m for m in data["models"]}
    assert by_role["vlm"]["parameters"] == 7_063_427_072
    assert by_role["vlm"]["precision"] == "float16" and by_role["vlm"]["kv_cache_bytes"] > 0
    assert by_role["clip"]["precision"] == "float32"
    assert by_role["reward_model"]["precision"] == "4-bit linear + bfloat16"
    assert set(data["per_device"]) == {"cuda:0", "cuda:1"}


def test_estimate_table_is_printed(runner, tiny_args) -> None:
    result = runner.invoke(app, ["estimate", *tiny_args, "--preset", "paper"])
    _ok(result)
    assert "memory estimate" in result.stdout and "bfloat16" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["estimate", "--quantize", "reward_model=3bit"], "--quantize"),
        (["estimate", "--preset", "nope"], "preset='nope'"),
        (["estimate", "--vlm-dtype", "int8"], "vlm dtype"),
    ],
)
def test_estimate_bad_input_is_one_clear_line(runner, tiny_args, args, message) -> None:
    result = runner.invoke(app, [*args, *tiny_args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_generate_with_preset_and_split_dtypes(runner, tiny_args, tmp_path) -> None:
    """The estimate is printed before loading; --preset and a per-model dtype reach the models."""
    from eta_guard.testing import make_test_image

    args = ["generate", "What is it?", *tiny_args, "--preset", "paper", "--device", "cpu"]
    args += ["--reward-model-dtype", "float32", "--max-new-tokens", "3", "--json"]
    image = tmp_path / "tall.png"
    make_test_image("noise", (30, 60)).save(image)
    result = runner.invoke(app, [*args, "-i", str(image)])
    _ok(result)
    assert "memory estimate" in result.stderr
    rm_row = next(line for line in result.stderr.splitlines() if "reward_model " in line)
    assert "float32" in rm_row  # the per-model override, not the preset's bfloat16
    data = json.loads(result.stdout)
    assert data["verdict"]["pre_score"] is not None


def test_evaluate_with_preset_and_split_dtypes(runner, tiny_args) -> None:
    args = ["evaluate", "--response", "No.", *tiny_args, "--preset", "paper", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--reward-model-dtype", "float32", "--json"])
    _ok(result)
    assert json.loads(result.stdout)["post_score"] is not None
