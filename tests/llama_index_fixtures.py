"""Shared helpers of the ``test_llama_index_*`` tests (imported by path: tests are not a package).

Kept out of any ``tests/llama_index/`` folder on purpose: a folder of that name on ``sys.path``
would hide the real ``llama_index`` package.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

#: ETA knobs that keep the tiny model fast in tests.
FAST = {"max_new_tokens": 6, "num_candidates": 2, "max_sentence_tokens": 4, "seed": 0}
#: Thresholds that flag everything / nothing (random tiny models say nothing about safety).
FLAG_ALL = {"pre_threshold": -2.0, "post_threshold": 1e9}
FLAG_NONE = {"pre_threshold": 2.0, "post_threshold": -1e9}
IMAGE_KINDS = ("red", "green", "blue", "noise")


def png_bytes(kind: str = "red") -> bytes:
    from eta_guard.testing import image_to_bytes, make_test_image

    return image_to_bytes(make_test_image(kind))


def png_b64(kind: str = "red") -> str:
    return base64.b64encode(png_bytes(kind)).decode()


@pytest.fixture(scope="session")
def li_ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny checkpoints (``tiny_checkpoints`` from conftest when there is one)."""
    try:
        return request.getfixturevalue("tiny_checkpoints")
    except pytest.FixtureLookupError:
        from eta_guard.testing import build_tiny_checkpoints

        return build_tiny_checkpoints(tmp_path_factory.mktemp("li-tiny"))


@pytest.fixture(scope="session")
def li_eta(li_ckpt: Any) -> Any:
    """One loaded ETA engine shared by the LlamaIndex tests."""
    from eta_guard import ETA, ETAConfig

    config = ETAConfig(**FAST)
    return ETA.from_pretrained(
        li_ckpt.vlm, clip=li_ckpt.clip, reward_model=li_ckpt.reward_model, config=config
    )


@pytest.fixture(scope="session")
def li_llm(li_eta: Any) -> Any:
    """An ``ETAMultiModalLLM`` over the shared engine."""
    from llama_index.llms.eta import ETAMultiModalLLM

    from eta_guard.locked_settings import DEFAULT_LOCKED

    # Tests use paths, and force both outcomes per call (FLAG_ALL / FLAG_NONE), so the thresholds
    # are unlocked here; the lock itself is tested in tests/security/test_locked_settings.py.
    unlocked = DEFAULT_LOCKED - {"pre_threshold", "post_threshold"}
    return ETAMultiModalLLM(eta=li_eta, allow_local_image_files=True, locked_settings=unlocked)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of generated PNG images, one per kind in :data:`IMAGE_KINDS`."""
    from eta_guard.testing import make_test_image

    folder = tmp_path_factory.mktemp("li-images")
    for kind in IMAGE_KINDS:
        make_test_image(kind).save(folder / f"{kind}.png")
    return folder


@pytest.fixture
def offline_settings(li_llm: Any, li_eta: Any) -> Any:
    """LlamaIndex ``Settings`` pointing at ETA's LLM and CLIP (nothing reaches for OpenAI)."""
    from llama_index.core import Settings
    from llama_index.embeddings.eta import ETAClipEmbedding

    saved = (Settings._llm, Settings._embed_model)
    Settings.llm = li_llm
    Settings.embed_model = ETAClipEmbedding(evaluator=li_eta)
    yield Settings
    Settings._llm, Settings._embed_model = saved
