"""The LlamaIndex adapters' class docstrings and the example script run offline as written."""

# Fixtures are imported from llama_index_fixtures, so their use as arguments "redefines" them.
# ruff: noqa: F811

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from llama_index.embeddings.eta import ETAClipEmbedding
from llama_index.evaluation.eta import ETASafetyEvaluator
from llama_index.llms.eta import ETAMultiModalLLM
from llama_index.postprocessor.eta import ETAImageSafetyPostprocessor

sys.path.insert(0, str(Path(__file__).parent))
from llama_index_fixtures import li_ckpt  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:asyncio_module:DeprecationWarning")


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
    [ETAMultiModalLLM, ETAClipEmbedding, ETAImageSafetyPostprocessor, ETASafetyEvaluator],
    ids=lambda c: c.__name__,
)
def test_class_docstring_runs_offline(cls, li_ckpt, tmp_path):
    """Every Python block of the docstring runs, in order, in one namespace (top-level await ok).

    ``/tmp/eta-tiny`` is pointed at the session's tiny checkpoints and ``/tmp/eta-*`` images
    at a temporary folder, so the test leaves nothing behind.
    """
    blocks = python_blocks(cls.__doc__)
    assert len(blocks) >= 2, f"{cls.__name__} docstring has no runnable examples"
    tiny = str(Path(li_ckpt.vlm).parent)
    namespace: dict = {"print": lambda *a, **k: None}
    for block in blocks:
        code = block.replace('"/tmp/eta-tiny"', repr(tiny)).replace("/tmp/eta-", f"{tmp_path}/eta-")
        compiled = compile(
            code, f"<{cls.__name__} docstring>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        )
        result = eval(compiled, namespace)  # noqa: S307 -- our own docstrings
        if asyncio.iscoroutine(result):
            asyncio.run(result)


def markdown_python_blocks(text: str) -> list[str]:
    """The fenced ```python blocks of a markdown file."""
    blocks, current = [], None
    for line in text.splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_readme_section_runs_offline(li_ckpt, tmp_path):
    """docs/llama_index.md (the README's LlamaIndex section): every Python block, in order."""
    from llama_index.core import Settings

    blocks = markdown_python_blocks((ROOT / "docs" / "llama_index.md").read_text())
    assert len(blocks) >= 4
    tiny = str(Path(li_ckpt.vlm).parent)
    namespace: dict = {"print": lambda *a, **k: None}
    saved = (Settings._llm, Settings._embed_model)
    try:
        for i, block in enumerate(blocks):
            code = block.replace('"/tmp/eta-tiny"', repr(tiny)).replace(
                "/tmp/eta-", f"{tmp_path}/eta-"
            )
            exec(compile(code, f"<docs/llama_index.md block {i}>", "exec"), namespace)  # noqa: S102
    finally:
        Settings._llm, Settings._embed_model = saved
    assert namespace["results"]["safety"][1].verdict["image_scores"] == []
    # The RAG block really retrieved images and judged them.
    assert namespace["answer"].source_nodes
    assert namespace["result"].verdict["image_scores"]


def test_example_runs_offline(tmp_path, li_ckpt):
    """The example, as a user runs it (the session's tiny checkpoints spare it a rebuild)."""
    script = ROOT / "examples" / "llama_index_multimodal_rag.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    models = ["--vlm", li_ckpt.vlm, "--clip", li_ckpt.clip, "--reward-model", li_ckpt.reward_model]
    proc = subprocess.run(
        [sys.executable, str(script), "--workdir", str(tmp_path), "--max-new-tokens", "6", *models],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Indexed 5 images" in out and "CLIP safety score" in out
    assert out.count("Answer:") == 2 and out.count("passing=") == 2
