"""Tests for eta_guard.media: every accepted image form and every refusal."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from eta_guard import media
from eta_guard.errors import InvalidInputError
from eta_guard.media import load_image, load_images


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file whose IHDR claims ``width`` x ``height`` (a decompression bomb)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


RED = Image.new("RGB", (8, 6), (255, 0, 0))
RED_PNG = encode(RED)
RED_B64 = base64.b64encode(RED_PNG).decode()


@pytest.fixture
def red_file(tmp_path: Path) -> Path:
    path = tmp_path / "red image.png"  # a space, to check file:// URL unquoting
    path.write_bytes(RED_PNG)
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("fetch_bytes must not be called")

    monkeypatch.setattr(media, "fetch_bytes", fail)


# --------------------------------------------------------------------------- accepted forms


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: RED.copy(), id="pil"),
        pytest.param(lambda p: str(p), id="path-str"),
        pytest.param(lambda p: p, id="pathlib"),
        pytest.param(lambda p: p.as_uri(), id="file-url"),
        pytest.param(lambda p: RED_PNG, id="bytes"),
        pytest.param(lambda p: bytearray(RED_PNG), id="bytearray"),
        pytest.param(lambda p: memoryview(RED_PNG), id="memoryview"),
        pytest.param(lambda p: RED_B64, id="base64"),
        pytest.param(lambda p: base64.encodebytes(RED_PNG).decode(), id="base64-wrapped-lines"),
        pytest.param(
            lambda p: base64.urlsafe_b64encode(RED_PNG).decode().rstrip("="), id="base64-urlsafe"
        ),
        pytest.param(lambda p: "data:image/png;base64," + RED_B64, id="data-url"),
        pytest.param(lambda p: "  DATA:image/PNG;base64," + RED_B64 + "\n", id="data-url-case"),
        pytest.param(lambda p: Image.open(p), id="pil-lazy-file"),
    ],
)
def test_accepted_sources_decode_to_rgb(make, no_network, red_file: Path) -> None:
    image = load_image(make(red_file))
    assert image.mode == "RGB"
    assert image.size == (8, 6)
    assert image.getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats(fmt: str) -> None:
    image = load_image(encode(RED, fmt))
    assert image.mode == "RGB" and image.size == (8, 6)
    red, green, blue = image.getpixel((3, 3))
    assert red > 200 and green < 60 and blue < 60  # lossy formats are close, not exact


@pytest.mark.parametrize(
    "source, expected",
    [
        pytest.param(Image.new("L", (4, 4), 128), (128, 128, 128), id="L"),
        pytest.param(Image.new("1", (4, 4), 1), (255, 255, 255), id="1"),
        pytest.param(Image.new("RGB", (4, 4), (0, 0, 255)).convert("P"), (0, 0, 255), id="P"),
        pytest.param(Image.new("CMYK", (4, 4), (0, 0, 0, 255)), (0, 0, 0), id="CMYK"),
        pytest.param(Image.new("RGBA", (4, 4), (0, 255, 0, 255)), (0, 255, 0), id="RGBA-opaque"),
        # Transparent pixels keep the colour stored under them, as the reference's
        # convert("RGB") keeps it (tests/test_fidelity_round2.py compares more modes).
        pytest.param(Image.new("RGBA", (4, 4), (9, 8, 7, 0)), (9, 8, 7), id="RGBA-clear"),
        pytest.param(Image.new("LA", (4, 4), (5, 0)), (5, 5, 5), id="LA-clear"),
        pytest.param(Image.new("I;16", (4, 4), 65535), (255, 255, 255), id="I;16-white"),
        pytest.param(Image.new("I;16", (4, 4), 32768), (128, 128, 128), id="I;16-grey"),
    ],
)
def test_modes_become_rgb(source: Image.Image, expected: tuple[int, int, int]) -> None:
    for given in (source, encode(source, "TIFF" if source.mode == "CMYK" else "PNG")):
        image = load_image(given)
        assert image.mode == "RGB"
        assert image.getpixel((1, 1)) == expected


def test_transparent_gif_palette_keeps_its_colour() -> None:
    frame = Image.new("P", (4, 4), 0)
    frame.putpalette([40, 50, 60] * 256)
    data = encode(frame, "GIF", transparency=0)
    assert load_image(data).getpixel((1, 1)) == (40, 50, 60)


def test_exif_orientation_is_applied() -> None:
    wide = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = load_image(encode(wide, "JPEG", exif=exif.tobytes()))
    assert image.size == (10, 20)


def test_aspect_ratio_at_the_limit_is_accepted() -> None:
    assert load_image(Image.new("L", (400, 2))).size == (400, 2)


def test_input_pil_image_is_not_modified() -> None:
    source = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    image = load_image(source)
    assert image is not source
    assert source.mode == "RGBA" and source.getpixel((0, 0)) == (10, 20, 30, 0)
    rgb = Image.new("RGB", (4, 4))
    assert load_image(rgb) is not rgb


# --------------------------------------------------------------------------- refusals

TRUNCATED_PNG = encode(Image.effect_noise((64, 64), 50).convert("RGB"))[:400]
BOMB_PNG = png_header(30_000, 30_000)


@pytest.mark.parametrize(
    "source, kwargs, words",
    [
        pytest.param(None, {}, ["None", "PIL.Image.Image", "bytes"], id="none"),
        pytest.param(3, {}, ["builtins.int", "expected one of", "pathlib.Path"], id="int"),
        pytest.param([RED_PNG], {}, ["list", "expected one of"], id="list"),
        pytest.param(b"", {}, ["empty", "0 bytes"], id="empty-bytes"),
        pytest.param(bytearray(), {}, ["empty"], id="empty-bytearray"),
        pytest.param("", {}, ["empty string"], id="empty-str"),
        pytest.param(b"hello world", {}, ["not an image", "hello world"], id="text-bytes"),
        pytest.param(bytes(range(1, 40)) * 3, {}, ["not an image", r"b'\x01\x02"], id="binary"),
        pytest.param(TRUNCATED_PNG, {}, ["truncated"], id="truncated"),
        pytest.param(b"%PDF-1.7\n%\xe2\xe3", {}, ["not an image", "PDF"], id="pdf"),
        pytest.param(b"<?xml version='1.0'?><svg></svg>", {}, ["SVG", "PNG"], id="svg"),
        pytest.param(b"<!DOCTYPE html><html></html>", {}, ["HTML"], id="html"),
        pytest.param(b"PK\x03\x04rest", {}, ["ZIP"], id="zip"),
        pytest.param(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 16, {}, ["HEIC", "PNG"], id="heic"),
        pytest.param(png_header(0, 10), {}, ["zero width", "PNG"], id="zero-width-png"),
        pytest.param(Image.new("RGB", (0, 5)), {}, ["zero size", "0x5"], id="zero-size-pil"),
        pytest.param(BOMB_PNG, {}, ["too large", "max_pixels=40_000_000"], id="bomb"),
        pytest.param(
            png_header(8000, 8000), {}, ["8000x8000", "max_pixels=40_000_000"], id="over-limit"
        ),
        pytest.param(RED_PNG, {"max_pixels": 10}, ["8x6 = 48 pixels", "max_pixels=10"], id="cap"),
        pytest.param(png_header(1, 1_000_000), {}, ["1x1000000", "aspect ratio"], id="strip"),
        pytest.param(Image.new("L", (402, 2)), {}, ["402x2", "aspect ratio"], id="strip-pil"),
        pytest.param(RED, {"max_pixels": 10}, ["PIL image", "max_pixels=10"], id="cap-pil"),
        pytest.param(RED_PNG, {"max_pixels": 0}, ["max_pixels", "positive int", "0"], id="mp-0"),
        pytest.param(RED_PNG, {"max_pixels": 1.5}, ["max_pixels", "1.5"], id="mp-float"),
        pytest.param("/no/such/dir/cat.png", {}, ["image path refused", "readable image file"]),
        pytest.param(Path("/no/such/cat.png"), {}, ["image path refused"]),
        pytest.param("file:///no/such/cat.png", {}, ["image path refused"], id="file-url-missing"),
        pytest.param("file://host/cat.png", {}, ["host", "only local files"], id="file-url-host"),
        pytest.param("abcd", {}, ["image path refused", "base64"], id="short-str"),
        pytest.param("not @ path!", {}, ["image path refused", "data URL"], id="junk-str"),
        pytest.param("#" * 5000, {}, ["not an existing file path", "base64"], id="long-junk"),
        pytest.param(
            base64.b64encode(b"plain text " * 200).decode(),
            {},
            ["base64 string", "not an image", "plain text"],
            id="base64-not-image",
        ),
        pytest.param("ftp://example.com/a.png", {}, ["'ftp'", "http(s)://"], id="ftp"),
        pytest.param("data:image/png;base64", {}, ["no ','", "data:image"], id="data-no-comma"),
        pytest.param("data:image/png;base64,", {}, ["data URL is empty"], id="data-empty"),
        pytest.param(
            "data:text/plain;base64,aGVsbG8=", {}, ["'text/plain'", "not an image"], id="data-text"
        ),
        pytest.param("data:,hello", {}, ["(none)", "not an image"], id="data-no-mime"),
        pytest.param("data:image/png,%89PNG", {}, ["not base64"], id="data-not-b64"),
        pytest.param("data:image/png;base64,@@!!", {}, ["not valid base64", "@@!!"]),
        pytest.param("data:image/svg+xml;base64,PHN2Zz4=", {}, ["SVG", "PNG"], id="data-svg"),
        pytest.param(
            "data:image/png;base64," + base64.b64encode(b"%PDF-1.4").decode(),
            {},
            ["data URL", "PDF"],
            id="data-pdf",
        ),
    ],
)
def test_refusals(source, kwargs, words, no_network) -> None:
    start = time.perf_counter()
    with pytest.raises(InvalidInputError) as caught:
        load_image(source, **kwargs)
    assert time.perf_counter() - start < 0.5
    message = str(caught.value)
    for word in words:
        assert word in message, message
    assert len(message) < 600, "messages must never dump the input"
    assert isinstance(caught.value, ValueError)


def test_directory_is_refused(tmp_path: Path) -> None:
    # The neutral path message: it must not say that the path is a directory.
    with pytest.raises(InvalidInputError, match="image path refused"):
        load_image(tmp_path)
    with pytest.raises(InvalidInputError, match="image path refused"):
        load_image(str(tmp_path))


def test_huge_base64_is_not_dumped_into_the_message() -> None:
    garbage = base64.b64encode(bytes(range(256)) * 4096).decode()  # ~1.4 MB
    with pytest.raises(InvalidInputError) as caught:
        load_image(garbage)
    assert "not an image" in str(caught.value)
    assert len(str(caught.value)) < 400


def test_errors_chain_the_cause() -> None:
    with pytest.raises(InvalidInputError) as caught:
        load_image(TRUNCATED_PNG)
    assert isinstance(caught.value.__cause__, OSError)


def test_bomb_is_refused_from_the_header_without_warnings() -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        start = time.perf_counter()
        with pytest.raises(InvalidInputError, match="max_pixels"):
            load_image(BOMB_PNG)
        with pytest.raises(InvalidInputError, match="max_pixels=1_000_000"):
            load_image(png_header(5000, 5000), max_pixels=1_000_000)
        assert time.perf_counter() - start < 0.5
    assert Image.MAX_IMAGE_PIXELS == limit_before, "the global Pillow limit must stay untouched"


def test_pillow_bomb_warning_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    # Shrink Pillow's own limit so a small image sits between its warning and error levels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(RED_PNG).size == (8, 6)  # 48 pixels: Pillow warns, we allow
        with pytest.raises(InvalidInputError, match="max_pixels"):
            load_image(encode(Image.new("RGB", (10, 10))))  # 100 > 2 * 40: Pillow refuses


# --------------------------------------------------------------------------- remote URLs


def test_remote_url_is_refused_without_network(no_network) -> None:
    with pytest.raises(InvalidInputError) as caught:
        load_image("https://example.com/cat.png")
    message = str(caught.value)
    assert "remote images are disabled" in message
    assert "allow_remote_images=True" in message
    assert "https://example.com/cat.png" in message


def test_remote_url_is_fetched_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_fetch(url, policy, *, label):
        calls.append((url, policy.timeout))
        return RED_PNG

    monkeypatch.setattr(media, "fetch_bytes", fake_fetch)
    image = load_image("http://example.com/red.png", allow_remote=True, timeout=3.0)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert calls == [("http://example.com/red.png", 3.0)]
    # Deadline, byte cap, redirects and private targets: tests/security/test_resource_exhaustion.py


# --------------------------------------------------------------------------- load_images


def test_load_images_single_and_lists() -> None:
    assert [im.size for im in load_images(RED_PNG)] == [(8, 6)]
    blue = Image.new("RGB", (2, 2), (0, 0, 255))
    images = load_images([RED_PNG, blue])
    assert [im.getpixel((0, 0)) for im in images] == [(255, 0, 0), (0, 0, 255)]
    assert len(load_images((RED, RED))) == 2
    assert load_images([]) == []


def test_load_images_names_the_bad_index(no_network) -> None:
    with pytest.raises(InvalidInputError, match=r"^image 1: .*remote images are disabled"):
        load_images([RED_PNG, "https://example.com/x.png"])
    with pytest.raises(InvalidInputError, match=r"^image 0: .*max_pixels=4\b"):
        load_images([RED_PNG], max_pixels=4)
    with pytest.raises(InvalidInputError, match=r"^the image data is empty"):
        load_images(b"")  # a single source keeps its own message


def test_import_is_light() -> None:
    code = (
        "import sys, eta_guard.media, eta_guard.messages; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- local files


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p, id="pathlib"),
        pytest.param(lambda p: str(p), id="path-str"),
        pytest.param(lambda p: p.as_uri(), id="file-url"),
        pytest.param(lambda p: "/etc/hostname", id="other-file"),
    ],
)
def test_local_files_can_be_disabled(make, red_file: Path) -> None:
    with pytest.raises(InvalidInputError) as caught:
        load_image(make(red_file), allow_local_files=False)
    message = str(caught.value)
    assert "local image files are disabled" in message or "image path refused" in message
    assert "allow_local" in message


def test_in_memory_sources_work_without_local_files() -> None:
    for source in (RED_PNG, RED_B64, "data:image/png;base64," + RED_B64, RED):
        assert load_image(source, allow_local_files=False).size == (8, 6)


def test_local_file_contents_are_never_quoted(tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_text("password=hunter2\n")
    with pytest.raises(InvalidInputError) as caught:
        load_image(secret)
    assert "image path refused" in str(caught.value)  # not even "it looks like text"
    assert "hunter2" not in str(caught.value) and "text" not in str(caught.value)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_device_files_are_refused_without_reading() -> None:
    with pytest.raises(InvalidInputError, match="image path refused"):
        load_image("/dev/zero")


def test_empty_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="image path refused") as caught:
        load_image(empty)
    assert "is empty" in str(caught.value.__cause__)  # the reason stays on the chain
