"""``eta_guard.scored_images`` and ``eta_guard.image_score_cache``: forwarding and caching units."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from eta_guard.errors import InvalidInputError
from eta_guard.image_score_cache import ImageScoreCache
from eta_guard.scored_images import content_key, load_scored_image


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def test_forwarded_png_is_plain_rgb_without_metadata():
    source = Image.new("RGBA", (8, 6), (255, 0, 0, 128))
    data = _encode(source, icc_profile=b"not really a profile")
    scored = load_scored_image(data)
    forwarded = Image.open(io.BytesIO(scored.png))
    assert forwarded.format == "PNG" and forwarded.mode == "RGB"
    assert "icc_profile" not in forwarded.info
    assert np.array_equal(np.asarray(forwarded), np.asarray(scored.image))
    assert scored.data_url.startswith("data:image/png;base64,")
    assert scored.key == content_key(scored.data_url)


def test_same_pixels_same_key_other_pixels_other_key():
    red = load_scored_image(_encode(Image.new("RGB", (8, 6), "red")))
    red_bmp = load_scored_image(_encode(Image.new("RGB", (8, 6), "red"), "BMP"))
    blue = load_scored_image(_encode(Image.new("RGB", (8, 6), "blue")))
    assert red.key == red_bmp.key != blue.key


def test_paths_and_urls_have_no_content_key(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_encode(Image.new("RGB", (8, 6))))
    assert content_key(str(path)) is None and content_key(path) is None
    assert content_key("https://example.com/a.png") is None and content_key(path.as_uri()) is None
    assert content_key(b"abc") != content_key(b"abd")


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animations_are_refused(fmt):
    frames = [Image.new("RGB", (8, 6), c) for c in ("red", "blue")]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidInputError, match="animated"):
        load_scored_image(data)
    assert load_scored_image(_encode(frames[0], fmt)).image.size == (8, 6)  # one frame: fine


def test_local_files_are_off_by_default(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_encode(Image.new("RGB", (8, 6))))
    with pytest.raises(InvalidInputError, match="image path refused"):
        load_scored_image(path)
    assert load_scored_image(path, allow_local_files=True).image.size == (8, 6)


def test_cache_is_bounded_lru():
    cache = ImageScoreCache(max_entries=2)
    cache.put("a", 0.1)
    cache.put("b", 0.2)
    assert cache.get("a") == 0.1  # refreshes "a"
    cache.put("c", 0.3)
    assert cache.get("b") is None and len(cache) == 2 and "a" in cache


def test_cache_size_zero_caches_nothing_and_bad_sizes_are_refused():
    off = ImageScoreCache(0)
    off.put("a", 1.0)
    assert off.get("a") is None
    for bad in (-1, 1.5, True, "9"):
        with pytest.raises(InvalidInputError, match="image cache size"):
            ImageScoreCache(bad)
