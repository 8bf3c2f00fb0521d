"""The LlamaIndex adapters install as PEP 420 namespace portions of ``llama_index``.

They must import as ``llama_index.llms.eta`` & co. next to the real ``llama_index.core``,
from an editable install and from a built wheel, without hiding ``llama_index`` itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTEGRATION = ROOT / "integrations" / "llama_index"
PORTIONS = {
    "llms": "ETAMultiModalLLM",
    "embeddings": "ETAClipEmbedding",
    "postprocessor": "ETAImageSafetyPostprocessor",
    "evaluation": "ETASafetyEvaluator",
}
IMPORTS = "; ".join(
    [
        "import llama_index.core",
        "from llama_index.core.llms import LLM",
        *(f"from llama_index.{sub}.eta import {name}" for sub, name in PORTIONS.items()),
        "import llama_index, llama_index.llms.eta as m",
        "print(llama_index.core.__file__); print(m.__file__); print(getattr(llama_index, '__file__', None))",
    ]
)


def test_namespace_layout():
    """No ``__init__.py`` above the ``eta`` packages: they must not own ``llama_index.*``."""
    assert not (INTEGRATION / "__init__.py").exists()
    for sub in PORTIONS:
        assert not (INTEGRATION / sub / "__init__.py").exists(), sub
        assert (INTEGRATION / sub / "eta" / "__init__.py").exists(), sub
    # A folder named llama_index on sys.path (repo root, tests/) would hide the real package.
    assert not (ROOT / "llama_index").exists()
    assert not (ROOT / "tests" / "llama_index").exists()


def _run(code: str, *, cwd: Path, pythonpath: str | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_installed_package_imports_from_anywhere(tmp_path):
    core, ours, namespace_file = _run(IMPORTS, cwd=tmp_path)
    assert "site-packages" in core and str(INTEGRATION) not in core
    assert ours.startswith(str(INTEGRATION))  # the editable install of this checkout
    assert namespace_file == "None"  # llama_index stays a namespace package


def test_wheel_ships_the_namespace_portions(tmp_path):
    """Build a wheel from a copy of the project and import the adapters from it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "eta_guard", src / "eta_guard", ignore=ignore)
    shutil.copytree(ROOT / "integrations", src / "integrations", ignore=ignore)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if build.returncode != 0:
        pytest.fail(build.stderr[-3000:])
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for sub in PORTIONS:
        assert f"llama_index/{sub}/eta/__init__.py" in names
        assert f"llama_index/{sub}/__init__.py" not in names
    assert "llama_index/__init__.py" not in names
    assert not any(n.startswith("llama_index/core") for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    core, ours, _ = _run(IMPORTS, cwd=tmp_path, pythonpath=str(site))
    assert "site-packages" in core
    assert ours.startswith(str(site))
