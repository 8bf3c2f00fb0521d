"""langchain-tests standard suites for ETAChatModel on tiny random checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

sys.path.insert(0, str(Path(__file__).parent))
from langchain_eta import ETAChatModel  # noqa: E402
from langchain_fixtures import FAST, lc_ckpt, lc_eta, lc_evaluator, png_bytes  # noqa: E402, F401


class TestETAChatModelUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ETAChatModel]:
        return ETAChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"vlm": "tiny/vlm", "clip": "tiny/clip", "reward_model": "tiny/rm", **FAST}


class TestETAChatModelIntegration(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _offline(self, lc_ckpt, monkeypatch):  # noqa: F811
        """Point the suite at the tiny checkpoints and serve its image download from a local PNG."""
        type(self).ckpt = lc_ckpt
        monkeypatch.setattr(
            httpx, "get", lambda *a, **k: httpx.Response(200, content=png_bytes("gradient"))
        )

    @property
    def chat_model_class(self) -> type[ETAChatModel]:
        return ETAChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        c = self.ckpt
        return {"vlm": c.vlm, "clip": c.clip, "reward_model": c.reward_model, **FAST}

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one ETAChatModel serves one local VLM

    @property
    def has_tool_calling(self) -> bool:
        return False  # the tiny LLaVA's template renders no tools (see the suite below)

    @property
    def has_structured_output(self) -> bool:
        return False  # a random model's JSON cannot be relied on to be a joke (suite below)


class TestETAChatModelToolsIntegration(ChatModelIntegrationTests):
    """The tool-calling, structured-output and tool-message tests, on a scripted generator.

    The VLM's words come from ``scripted_backend.schema_following`` behind the GeneratorBackend
    interface (random weights cannot be relied on to call a tool); the engine, its tiny random
    CLIP and RM, the Hermes parser and the LangChain adapter are the real ones. Mechanics only.
    """

    @pytest.fixture(autouse=True)
    def _scripted(self, lc_evaluator, monkeypatch):  # noqa: F811
        type(self).evaluator = lc_evaluator
        monkeypatch.setattr(
            httpx, "get", lambda *a, **k: httpx.Response(200, content=png_bytes("gradient"))
        )

    @property
    def chat_model_class(self) -> type[ETAChatModel]:
        return ETAChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        from scripted_backend import ScriptedBackend, schema_following

        from eta_guard import ETA, ETAConfig

        config = ETAConfig(pre_threshold=2.0, num_candidates=2, max_new_tokens=64, seed=0)
        eta = ETA(ScriptedBackend(schema_following), self.evaluator, config)
        return {"eta": eta, "config": config}

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_tool_message(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return False  # json_mode is offered; the scripted answers follow schemas only

    @property
    def supports_model_override(self) -> bool:
        return False
