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
from langchain_fixtures import FAST, lc_ckpt, png_bytes  # noqa: E402, F401


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
