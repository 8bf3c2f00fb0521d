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
    monkeypatch.setattr("eta_guard.cli.models.print_estimate", lambda *a, **k: None)
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


def _invoke_serve(monkeypatch, args, *, run=None):
    """Run ``eta-guard serve ARGS`` in-process with uvicorn.run replaced; returns (result, seen)."""
    import uvicorn
    from typer.testing import CliRunner

    from eta_guard.cli import app

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", run or (lambda app, **kw: seen.update(app=app, uvicorn=kw)))
    monkeypatch.delenv("ETA_GUARD_API_KEYS", raising=False)
    return CliRunner().invoke(app, ["serve", *args]), seen


def test_serve_generator_url_wires_the_engine_and_concurrency(monkeypatch):
    """--generator-url: the VLM argument is the tokenizer, the engine ETA is built by the helper
    `generate` uses, and max_concurrent_calls defaults to 8 (the engine batches)."""
    import eta_guard.pipeline
    import eta_guard.server.app

    loaded: dict = {}

    def fake_engine(cls, url, model, **kw):
        loaded.update(url=url, model=model, **kw)
        return mock.Mock(evaluator="the evaluator")

    monkeypatch.setattr(eta_guard.pipeline.ETA, "from_openai_compatible", classmethod(fake_engine))
    monkeypatch.setattr(eta_guard.server.app, "create_app", lambda **kw: kw)
    monkeypatch.setattr("eta_guard.cli.models.print_estimate", lambda *a, **k: None)
    base = ["--generator-url", "http://127.0.0.1:9/v1", "--generator-model", "served-vlm"]
    monkeypatch.setenv("ETA_GUARD_GENERATOR_API_KEY", "engine-key")
    result, seen = _invoke_serve(
        monkeypatch, ["tok/dir", *base, "--clip-dtype", "float16", "--set", "seed=3"]
    )
    assert result.exit_code == 0, result.output
    made = seen["app"]
    assert made["settings"].max_concurrent_calls == 8 and made["moderation_only"] is False
    assert made["loader"]()[1] == "the evaluator"
    assert loaded["url"] == "http://127.0.0.1:9/v1" and loaded["model"] == "served-vlm"
    assert loaded["tokenizer"] == "tok/dir" and loaded["config"].seed == 3
    assert loaded["clip_kwargs"] == {"dtype": "float16"} and loaded["api_key"] == "engine-key"
    result, seen = _invoke_serve(monkeypatch, ["tok/dir", *base, "--max-concurrent-calls", "32"])
    assert result.exit_code == 0, result.output
    assert seen["app"]["settings"].max_concurrent_calls == 32


@pytest.mark.parametrize(("extra", "calls"), [([], 4), (["--max-concurrent-calls", "6"], 6)])
def test_serve_local_vlm_runs_several_calls_at_once(monkeypatch, extra, calls):
    """A local VLM is no longer limited to one call: 4 by default, more when asked."""
    import eta_guard.server.app

    monkeypatch.setattr(eta_guard.server.app, "create_app", lambda **kw: kw)
    monkeypatch.setattr("eta_guard.cli.models.print_estimate", lambda *a, **k: None)
    result, seen = _invoke_serve(monkeypatch, ["some/vlm", *extra])
    assert result.exit_code == 0, result.output
    assert seen["app"]["settings"].max_concurrent_calls == calls


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--generator-url", "http://127.0.0.1:9"], "go together"),
        # no tokenizer: markers in message text would reach the engine as control tokens
        (["--generator-url", "http://x", "--generator-model", "m"], "needs --vlm"),
        (["--generator-model", "m"], "go together"),
        (
            ["--generator-url", "http://x", "--generator-model", "m", "--preset", "paper"],
            "--preset",
        ),
        (
            ["--generator-url", "http://x", "--generator-model", "m", "--vlm-dtype", "float16"],
            "--vlm-dtype",
        ),
        (
            ["--moderation-only", "--generator-url", "http://x", "--generator-model", "m"],
            "drop --generator-url",
        ),
    ],
)
def test_serve_refuses_options_that_cannot_apply(monkeypatch, args, message):
    result, seen = _invoke_serve(monkeypatch, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "uvicorn" not in seen  # refused before serving anything


def test_serve_generator_url_end_to_end_over_the_stub_engine(
    monkeypatch, tiny_checkpoints, tiny_dir
):
    """The real command, app and HTTP path in front of the stub engine (tests/backend_stub.py):
    a flagged image's answer is aligned by best-of-N requests (n=2) sent to the engine.
    Random local CLIP / RM: mechanics only."""
    sys.path.insert(0, str(Path(__file__).parent))
    import base64
    import io

    from backend_stub import StubServer

    from eta_guard.server.runner import serve_in_thread
    from eta_guard.testing import make_test_image

    buf = io.BytesIO()
    make_test_image("gradient").save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    got: dict = {}

    def run_for_real(app, host, port, **kw):
        with serve_in_thread(app) as url:
            deadline = time.monotonic() + 60
            while httpx.get(url + "/health").status_code != 200:
                assert time.monotonic() < deadline, httpx.get(url + "/health").text
                time.sleep(0.05)
            body = {
                "model": "eta-guard",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is in this picture?"},
                            {"type": "image_url", "image_url": {"url": image}},
                        ],
                    }
                ],
                "max_tokens": 32,
            }
            got["reply"] = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)

    with StubServer() as stub:
        args = ["--tiny", "--cache-dir", str(tiny_dir), "--generator-url", stub.url]
        args += ["--generator-model", "tiny-vlm", "--set", "pre_threshold=-1.01"]
        args += ["--set", "post_threshold=1e9", "--set", "num_candidates=2"]
        result, _ = _invoke_serve(monkeypatch, args, run=run_for_real)
        assert result.exit_code == 0, result.output
        reply = got["reply"]
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        text = answer["choices"][0]["message"]["content"]
        assert answer["eta"]["aligned"] is True and answer["eta"]["input_unsafe"] is True
        assert text.startswith("As an AI assistant") and "Candidate" in text
        chats = stub.bodies("/v1/chat/completions")
        assert chats[0]["stream"] is True and chats[0]["model"] == "tiny-vlm"
        assert [b["n"] for b in chats[1:]] == [2] * (len(chats) - 1) and len(chats) >= 2
        # --tiny's VLM folder supplied the tokenizer: sentence ends as token ids
        assert all(b.get("stop_token_ids") for b in chats[1:])
