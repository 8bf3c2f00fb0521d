"""The LangChain adapters' class docstrings and example scripts run offline as written."""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from langchain_eta import (  # noqa: E402
    ETAChatModel,
    ETAGuardMiddleware,
    ETAInputGuard,
    ETAOutputGuard,
)
from langchain_fixtures import lc_ckpt  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(doc: str) -> list[str]:
    """The ``.. code-block:: python`` snippets of a docstring, dedented."""
    blocks, lines = [], doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != ".. code-block:: python":
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt)
        blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return blocks


def test_python_blocks_parser():
    doc = "Intro:\n    .. code-block:: python\n\n        a = 1\n\n        b = a + 1\n    Next:\n"
    assert python_blocks(doc) == ["a = 1\n\nb = a + 1\n"]


@pytest.mark.parametrize(
    "cls",
    [ETAChatModel, ETAInputGuard, ETAOutputGuard, ETAGuardMiddleware],
    ids=lambda c: c.__name__,
)
def test_class_docstring_runs_offline(cls, lc_ckpt):  # noqa: F811
    """Every Python block runs, in order, in one namespace (top-level await allowed).

    ``/tmp/eta-tiny`` is pointed at the session's tiny checkpoints, so nothing is rebuilt.
    """
    blocks = python_blocks(cls.__doc__)
    assert len(blocks) >= 2, f"{cls.__name__} docstring has no runnable examples"
    tiny = str(Path(lc_ckpt.vlm).parent)
    namespace: dict = {"print": lambda *a, **k: None}
    for block in blocks:
        code = block.replace('"/tmp/eta-tiny"', repr(tiny))
        compiled = compile(
            code, f"<{cls.__name__} docstring>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        )
        result = eval(compiled, namespace)  # noqa: S307 -- our own docstrings
        if asyncio.iscoroutine(result):
            asyncio.run(result)


@pytest.mark.parametrize(
    ("script", "needs_vlm", "expect"),
    [
        ("langchain_chain.py", True, "aligned: True"),
        ("langchain_agent.py", True, "I'm sorry"),
        ("langchain_guards.py", False, "raise: ETAInputGuard: image flagged"),
    ],
)
def test_example_runs_offline(lc_ckpt, script, needs_vlm, expect):  # noqa: F811
    """Each example, as a user runs it, with --flag-all (the session's checkpoints spare a rebuild)."""
    models = ["--clip", lc_ckpt.clip, "--reward-model", lc_ckpt.reward_model]
    if needs_vlm:
        models += ["--vlm", lc_ckpt.vlm]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *models, "--flag-all"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout, proc.stdout
