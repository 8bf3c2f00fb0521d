"""Shared fixtures: random tiny checkpoints built once per session, offline.

The checkpoints are random: they prove mechanics, never safety (see ``eta_guard.testing``).
"""

from __future__ import annotations

import os

# Set before anything imports transformers / huggingface_hub: nothing may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    # spinning made them ~30x slower (measured): one thread keeps the suite fast and steady.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per session holding every tiny checkpoint the tests build."""
    return tmp_path_factory.mktemp("eta-tiny")


@pytest.fixture(scope="session")
def tiny_checkpoints_by_family(tiny_dir: Path) -> Callable[..., object]:
    """A function ``(family="llava") -> TinyCheckpoints``; each family is built once per session."""
    from eta_guard.testing import build_tiny_checkpoints

    cache: dict[str, object] = {}

    def get(family: str = "llava"):
        if family not in cache:
            cache[family] = build_tiny_checkpoints(tiny_dir, vlm_family=family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_checkpoints_by_family):
    """The tiny LLaVA + CLIP + reward-model checkpoints (``TinyCheckpoints``)."""
    return tiny_checkpoints_by_family("llava")


@pytest.fixture
def test_image():
    """A deterministic 64x64 RGB noise image."""
    from eta_guard.testing import make_test_image

    return make_test_image("noise")


# --- VLM adapters for the decoding tests (test_vlm_adapter.py, test_best_of_n.py) ---


@pytest.fixture(scope="module")
def vlm_paths(tiny_checkpoints_by_family):
    """``family -> path`` of the tiny random VLM checkpoint (built once per session)."""
    return lambda family: tiny_checkpoints_by_family(family).vlm


@pytest.fixture(scope="module")
def test_images():
    from eta_guard.testing import make_test_image

    return [make_test_image("noise", (64, 64), seed=1), make_test_image("gradient", (48, 40))]


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "idefics3"])
def vlm(request, vlm_paths):
    """A ``VLMAdapter`` for each tiny family."""
    from eta_guard.decoding.vlm import VLMAdapter

    return VLMAdapter.from_pretrained(vlm_paths(request.param), local_files_only=True)


@pytest.fixture(scope="module")
def llava(vlm_paths):
    from eta_guard.decoding.vlm import VLMAdapter

    return VLMAdapter.from_pretrained(vlm_paths("llava"), local_files_only=True)


@pytest.fixture(scope="session")
def armorm_replica(tiny_dir: Path) -> Path:
    """A random ArmoRM-architecture checkpoint (``eta_guard.replicas.armorm``), built once."""
    from eta_guard.replicas.armorm import build_armorm_replica

    return build_armorm_replica(tiny_dir / "armorm-replica")


@pytest.fixture(scope="session")
def replica_checkpoints(tiny_dir: Path) -> Callable[..., object]:
    """``(family="llava") -> ReplicaCheckpoints`` (eta_guard.replicas), built once per session."""
    from eta_guard.replicas import build_replica_checkpoints

    cache: dict[str, object] = {}

    def get(family: str = "llava"):
        if family not in cache:
            cache[family] = build_replica_checkpoints(tiny_dir, vlm_family=family)
        return cache[family]

    return get
