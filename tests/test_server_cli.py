"""``eta-guard serve`` as a real process: moderation-only on tiny checkpoints, and its refusals."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(
        [str(ROOT), str(ROOT / "integrations"), os.environ.get("PYTHONPATH", "")]
    )
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a fresh process imports torch and loads models: ~10-30 s here
def test_serve_moderation_only_process(tiny_checkpoints, tiny_dir):
    key = secrets.token_urlsafe(24)
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "eta_guard.cli",
        "serve",
        "--moderation-only",
        "--tiny",
        "--cache-dir",
        str(tiny_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd,
        env=_env(ETA_GUARD_API_KEYS=key),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(base + "/health", timeout=2).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, proc.stdout.read().decode() if proc.poll() is not None else status
        auth = {"Authorization": f"Bearer {key}"}
        resp = httpx.post(base + "/v1/moderations", json={"input": ["a", "b"]}, headers=auth)
        assert resp.status_code == 200 and len(resp.json()["results"]) == 2
        assert httpx.post(base + "/v1/moderations", json={"input": "a"}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_keyless_public_bind_and_vlm_with_moderation_only():
    env = _env()
    env.pop("ETA_GUARD_API_KEYS", None)
    public = subprocess.run(
        [sys.executable, "-m", "eta_guard.cli", "serve", "some-vlm", "--host", "0.0.0.0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert public.returncode == 2 and "--api-key-file" in public.stderr
    both = subprocess.run(
        [sys.executable, "-m", "eta_guard.cli", "serve", "some-vlm", "--moderation-only"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert both.returncode == 2 and "drop the VLM" in both.stderr


def test_cli_and_server_package_import_light():
    code = (
        "import sys, eta_guard, eta_guard.cli, eta_guard.server;"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'starlette',"
        " 'prometheus_client') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_serve_wires_options_to_the_loader_and_uvicorn(monkeypatch, tmp_path):
    """No process, no server: the command's options reach the app, uvicorn and the model loader."""
    import uvicorn
    from typer.testing import CliRunner

    import eta_guard.pipeline
    import eta_guard.server.app
    from eta_guard.cli import app

    seen: dict = {}
    monkeypatch.setattr(eta_guard.server.app, "create_app", lambda **kw: seen.setdefault("app", kw))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("uvicorn", kw))

    def fake_load(cls, vlm, **kw):
        seen["load"] = (vlm, kw)
        return mock.Mock(evaluator="the evaluator")

    monkeypatch.setattr(eta_guard.pipeline.ETA, "from_pretrained", classmethod(fake_load))
    monkeypatch.setattr("eta_guard.cli._print_estimate", lambda *a, **k: None)
    keys = tmp_path / "keys"
    keys.write_text(secrets.token_urlsafe(24) + "\n")
    result = CliRunner().invoke(
        app,
        [
            "serve",
            "some/vlm",
            "--api-key-file",
            str(keys),
            "--port",
            "9",
            "--max-queue",
            "3",
            "--preset",
            "paper",
            "--reward-model-device",
            "cuda:1",
            "--set",
            "seed=5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen["uvicorn"]["host"] == "127.0.0.1" and seen["uvicorn"]["port"] == 9
    settings = seen["app"]["settings"]
    assert settings.max_queue == 3 and len(settings.api_keys) == 1
    assert seen["app"]["moderation_only"] is False
    assert seen["app"]["loader"]()[1] == "the evaluator"  # what the server runs in the background
    vlm, kwargs = seen["load"]
    assert vlm == "some/vlm" and kwargs["preset"] == "paper"
    assert kwargs["reward_model_kwargs"] == {"device": "cuda:1"}
    assert kwargs["config"].seed == 5
