"""Fidelity to the reference code, round two (issue 18): each test re-implements the reference's
construction plainly (github DripNowhy/ETA and the LLaVA code it vendors) and compares.

The replicas and tiny checkpoints are random: these check mechanics, never safety.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from backend_stub import StubServer  # noqa: E402

from eta_guard import ETA, ETAConfig  # noqa: E402
from eta_guard.backends import HTTPSettings  # noqa: E402
from eta_guard.errors import InvalidInputError  # noqa: E402

CHAT = "/v1/chat/completions"
FAST = HTTPSettings(timeout=5.0, connect_timeout=1.0, max_retries=1, backoff=0.01)
#: LLaVA-1.5's image processor mean (OpenAI CLIP), as the reference's expand2square colour.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.fixture(scope="module")
def server():
    with StubServer() as stub:
        yield stub


@pytest.fixture
def stub(server):
    server.requests.clear()
    server.failures.clear()
    return server


def tall_image() -> Image.Image:
    image = Image.new("RGB", (20, 48), (250, 10, 10))
    image.putpixel((3, 5), (0, 200, 0))
    return image


def reference_expand2square(image: Image.Image, mean) -> Image.Image:
    """llava/mm_utils.py expand2square with ``tuple(int(x * 255) for x in image_mean)``."""
    color = tuple(int(x * 255) for x in mean)
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), color)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), color)
    result.paste(image, ((height - width) // 2, 0))
    return result


def sent_image(stub) -> Image.Image:
    body = stub.bodies(CHAT)[0]
    part = next(p for p in body["messages"][-1]["content"] if p["type"] == "image_url")
    data = part["image_url"]["url"].split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


@pytest.fixture
def remote_eta(stub, tiny_checkpoints):
    def build(config=None, **kwargs):
        config = config or ETAConfig()
        config = config.model_copy(update={"pre_threshold": 2.0})  # no image flagged: vanilla
        return ETA.from_openai_compatible(
            stub.url,
            "tiny-vlm",
            clip=tiny_checkpoints.clip,
            reward_model="tiny-rm",
            reward_model_url=stub.url,
            http=FAST,
            device="cpu",
            config=config,
            **kwargs,
        )

    return build


def _messages(image):
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    return [{"role": "user", "content": content}]


# ----- item 2: the paper's pad-to-square on the remote path -----
def test_paper_preset_pads_images_client_side_with_the_preset_mean(stub, remote_eta):
    eta = remote_eta(preset="paper")
    eta.generate(_messages(tall_image()))
    expected = reference_expand2square(tall_image(), CLIP_MEAN)
    got = sent_image(stub)
    assert got.size == (48, 48)
    assert got.tobytes() == expected.tobytes()
    # ... and with the llava_v1 system text the preset sets
    assert stub.bodies(CHAT)[0]["messages"][0]["role"] == "system"


def test_pad_mean_comes_from_the_served_models_processor(stub, remote_eta, replica_checkpoints):
    llava = replica_checkpoints("llava").vlm
    eta = remote_eta(tokenizer=llava, config=ETAConfig(pad_images_to_square=True))
    from transformers import AutoImageProcessor

    mean = AutoImageProcessor.from_pretrained(llava).image_mean
    eta.generate(_messages(tall_image()))
    assert sent_image(stub).tobytes() == (reference_expand2square(tall_image(), mean).tobytes())


def test_pad_without_any_mean_is_refused_naming_the_fix(stub, remote_eta):
    eta = remote_eta(config=ETAConfig(pad_images_to_square=True))
    with pytest.raises(InvalidInputError, match="image_mean"):
        eta.generate(_messages(tall_image()))
    assert not stub.bodies(CHAT)


def test_bad_image_mean_is_refused():
    from eta_guard.backends import OpenAICompatibleBackend

    with pytest.raises(InvalidInputError, match="image_mean"):
        OpenAICompatibleBackend("http://127.0.0.1:9", "m", image_mean=(0.5, 2.0, 0.1))
