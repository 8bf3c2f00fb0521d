"""The vLLM plugin's wiring (no engine here: tests/test_vllm_armorm.py runs it on a real one)."""

from __future__ import annotations

import sys
import types
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_entry_point_names_the_register_function():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["vllm.general_plugins"]["eta_guard_armorm"]
    module, _, name = target.partition(":")
    assert callable(getattr(import_module(module), name))
    assert "vllm" not in project["optional-dependencies"]["all"][0]  # never in the guard's env


def test_register_names_the_model_class_lazily(monkeypatch):
    registered: dict[str, str] = {}

    class Registry:
        @staticmethod
        def get_supported_archs():
            return set(registered)

        @staticmethod
        def register_model(arch, cls):
            registered[arch] = cls

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(ModelRegistry=Registry))
    from eta_guard.vllm_plugin import register

    register()
    register()  # idempotent: vLLM calls plugins once per process, but twice must not fail
    assert registered == {
        "LlamaForRewardModelWithGating": "eta_guard.vllm_plugin.armorm:ArmoRMForVLLM"
    }
    assert "eta_guard.vllm_plugin.armorm" not in sys.modules  # nothing heavy at registration
