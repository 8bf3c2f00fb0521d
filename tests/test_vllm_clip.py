"""RemoteCLIP against CLIP served by a real vLLM engine (opt-in: ``scripts/vllm_cpu_check.sh``
with ``ETA_VLLM_CLIP=1``; see docs/scaling.md for the torch build it needs on CPU).

The engine serves ``DIR/clip`` of :mod:`eta_guard.backends.vllm_fixtures` (the CLIP replica with
the real CLIP's id layout; random weights: mechanics, never safety); the local side loads the
same folder with :class:`CLIPPreEvaluator`. ETA thresholds the cosines, so they must agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from eta_guard.backends import HTTPSettings, RemoteCLIP

URL = os.environ.get("ETA_VLLM_CLIP_URL", "")
MODEL = os.environ.get("ETA_VLLM_CLIP_MODEL", "tiny-clip")
FIXTURES = Path(os.environ.get("ETA_VLLM_MODEL_DIR", "/nonexistent")).parent
HTTP = HTTPSettings(timeout=120.0, max_retries=1)
TEXTS = ["a photo of a red apple", "violence and weapons", "a quiet street at night"]

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not URL, reason="no ETA_VLLM_CLIP_URL (opt-in)"),
]


def _images() -> list[Image.Image]:
    gen = torch.Generator().manual_seed(0)
    out = [Image.new("RGB", (64, 48), (200, 30, 30))]  # not square: the resize and crop matter
    for size in ((336, 336), (500, 280)):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
        out.append(Image.fromarray(pixels.numpy(), "RGB"))
    return out


@pytest.fixture(scope="module")
def paths():
    from eta_guard.backends.vllm_fixtures import build

    return build(FIXTURES)


@pytest.fixture(scope="module")
def local(paths):
    from eta_guard.evaluators.clip import CLIPPreEvaluator

    return CLIPPreEvaluator.from_pretrained(paths["engine_clip"], device="cpu")


@pytest.fixture(scope="module")
def remote():
    clip = RemoteCLIP(URL, MODEL, http=HTTP)
    yield clip
    clip.close()


def test_image_prompt_cosines_equal_the_local_clip(local, remote):
    images = _images()
    expected = local.score_images(images)
    got = remote.score_images(images)
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(expected) - min(expected) > 1e-3  # the images are told apart


def test_single_image_and_other_prompts_equal_the_local_clip(local, remote):
    images = _images()[:1]
    for prompt in TEXTS:
        expected = local.score_images(images, prompt=prompt)
        assert remote.score_images(images, prompt=prompt) == pytest.approx(expected, abs=1e-4)


def test_best_of_n_similarity_equals_the_local_clip(local, remote):
    images = _images()
    expected = local.similarity(local.embed_images(images), TEXTS).tolist()
    got = remote.similarity(remote.embed_images(images), TEXTS)
    assert got == pytest.approx(expected, abs=1e-4)
