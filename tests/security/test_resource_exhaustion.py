"""Issue 8, class 4 (resource exhaustion), as an attacker would try it.

Request limits: too many images, too many pixels in total (refused from the headers, before any
decoding), too much text, CLIP running every image in one forward. Remote fetch: a slow server
holding the fetch past its deadline, an endless or oversized body, redirects to other schemes or
to internal hosts, hosts that resolve to loopback / private addresses, DNS rebinding.

Every server here binds 127.0.0.1, answers a bounded number of bytes and stops with its fixture.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eta_guard import ETA, ETAConfig, ETAEvaluator
from eta_guard.errors import InvalidInputError
from eta_guard.media import load_image
from eta_guard.messages import normalize_messages
from eta_guard.testing import image_to_bytes, make_test_image

FAST = {"max_new_tokens": 4, "seed": 0}


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` but whose pixel data is a few bytes.

    Decoding it would fail (or allocate the full raster); a limit checked from the header must
    refuse it first.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _user(*parts):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


def _image(source):
    return {"type": "image", "image": source}


# --------------------------------------------------------------------------- request limits


def test_too_many_images_are_refused_before_any_is_decoded(monkeypatch):
    import eta_guard.media as media

    decoded = []
    original = media._finish
    monkeypatch.setattr(media, "_finish", lambda *a, **k: decoded.append(1) or original(*a, **k))
    tiny = image_to_bytes(make_test_image("red", (8, 8)))
    with pytest.raises(InvalidInputError, match="max_images_per_request=16"):
        normalize_messages(_user(*[_image(tiny)] * 17))
    assert decoded == []


def _one_megapixel() -> bytes:
    from PIL import Image

    return image_to_bytes(Image.new("RGB", (1000, 1000)))  # ~3 KB, 1M pixels


def test_total_pixels_are_refused_from_the_headers_before_decoding():
    # Each image is within max_image_pixels (40M); together they hold 41M pixels. The second is
    # only a header: the refusal must come from the pixel budget, not from a decode error.
    parts = [_image(_one_megapixel()), _image(header_only_png(6400, 6250))]
    with pytest.raises(InvalidInputError) as caught:
        normalize_messages(_user(*parts))
    message = str(caught.value)
    assert "max_request_pixels=40_000_000" in message and "messages[0]['content'][1]" in message


def test_the_pixel_budget_counts_decoded_images_of_the_whole_request():
    image = image_to_bytes(make_test_image("gradient", (100, 100)))  # 10_000 pixels
    cfg = ETAConfig(max_request_pixels=25_000)
    from eta_guard.limits import RequestLimits

    limits = RequestLimits.from_config(cfg)
    assert len(normalize_messages(_user(_image(image), _image(image)), limits=limits).images) == 2
    with pytest.raises(InvalidInputError, match="30_000 pixels, more than max_request_pixels"):
        normalize_messages(_user(*[_image(image)] * 3), limits=limits)
    # A later request starts with a fresh budget.
    assert len(normalize_messages(_user(_image(image)), limits=limits).images) == 1


def test_long_text_is_refused_without_being_echoed():
    secret = "x" * 200_001
    with pytest.raises(InvalidInputError) as caught:
        normalize_messages([{"role": "user", "content": secret}])
    assert "max_text_chars=200_000" in str(caught.value) and len(str(caught.value)) < 300


@pytest.fixture(scope="module")
def evaluator(tiny_checkpoints) -> ETAEvaluator:
    return ETAEvaluator.from_pretrained(
        clip=tiny_checkpoints.clip, reward_model=tiny_checkpoints.reward_model, device="cpu"
    )


def test_evaluator_limits_count_the_whole_batch(evaluator):
    tiny = image_to_bytes(make_test_image("red", (8, 8)))
    items = [{"images": [tiny] * 4} for _ in range(5)]  # 20 images over 5 items
    with pytest.raises(InvalidInputError, match="max_images_per_request"):
        evaluator.evaluate_batch(items)
    with pytest.raises(InvalidInputError, match="max_request_pixels"):
        evaluator.evaluate_batch(
            [{"images": _one_megapixel()}, {"images": header_only_png(6400, 6250)}]
        )
    with pytest.raises(InvalidInputError, match="max_text_chars"):
        evaluator.evaluate(response="word " * 50_000)


def test_clip_runs_images_in_chunks_of_clip_batch_size(evaluator, monkeypatch):
    images = [make_test_image("noise", (32, 32), seed=i) for i in range(5)]
    whole = evaluator.pre.score_images(images)
    sizes = []
    encoder = evaluator.pre.encoder
    original = encoder.embed_images
    monkeypatch.setattr(
        encoder, "embed_images", lambda batch: sizes.append(len(batch)) or original(batch)
    )
    config = evaluator.config.with_overrides(clip_batch_size=2)
    verdict = evaluator.with_config(config).evaluate(images=images)
    assert sizes == [2, 2, 1]
    assert verdict.image_scores == pytest.approx(whole, abs=1e-5)


def test_eta_enforces_the_limits_of_its_config(tiny_checkpoints):
    eta = ETA.from_pretrained(
        tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        config=ETAConfig(**FAST, max_images_per_request=1),
    )
    image = make_test_image()
    with pytest.raises(InvalidInputError, match="max_images_per_request=1"):
        eta.generate(_user(_image(image), _image(image)))
    with pytest.raises(InvalidInputError, match="max_text_chars=10"):
        eta.generate([{"role": "user", "content": "x" * 11}], max_text_chars=10)


def test_stop_strings_are_bounded_before_any_model_runs(tiny_checkpoints, monkeypatch):
    # transformers' stop-string tables grow with vocabulary x stop length: a 200,000-character
    # stop string cost +893 MB with the 512-token test vocabulary; it is refused up front.
    from eta_guard.limits import MAX_STOP_CHARS, MAX_STOP_STRINGS

    eta = ETA.from_pretrained(
        tiny_checkpoints.vlm,
        clip=tiny_checkpoints.clip,
        reward_model=tiny_checkpoints.reward_model,
        config=ETAConfig(**FAST),
    )
    calls = []
    monkeypatch.setattr(eta.vlm, "prepare", lambda *a, **k: calls.append(a))
    text = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidInputError, match=rf"at most {MAX_STOP_CHARS}"):
        eta.generate(text, stop=["ab" * 100_000])
    with pytest.raises(InvalidInputError, match=rf"at most {MAX_STOP_STRINGS}"):
        list(eta.stream(text, stop=["x"] * (MAX_STOP_STRINGS + 1)))
    assert calls == []  # refused before the prompt was even rendered
    monkeypatch.undo()
    ok = eta.generate(text, stop=["y" * MAX_STOP_CHARS] * MAX_STOP_STRINGS)
    assert ok.text is not None


# --------------------------------------------------------------------------- remote fetch

PNG = image_to_bytes(make_test_image("red", (8, 8)))


class _Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).hosts.append(self.headers.get("Host", ""))
        path, _, query = self.path.partition("?")
        if path == "/img":
            self._send(200, PNG)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query)
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Length", str(100 * 2**20))
            self.end_headers()
            self.wfile.write(b"\0" * 1024)
        elif path == "/endless":  # no Content-Length; bounded at 4 MB so the server stops
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif path == "/slow":  # one byte every 0.2 s: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif path == "/gzip":
            body = zlib.compress(b"\0" * 100_000)
            self.send_response(200)
            self.send_header("Content-Encoding", "deflate")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._send(404, b"SECRET-BODY")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _policy(**kw):
    from eta_guard.remote_fetch import RemoteFetchPolicy

    return RemoteFetchPolicy(**{"allow_private_hosts": True, "timeout": 5.0, **kw})


def _fetch(url, **kw):
    return load_image(url, allow_remote=True, remote=_policy(**kw))


def test_loopback_is_refused_unless_allowed(server):
    with pytest.raises(InvalidInputError, match="loopback"):
        load_image(f"{server}/img", allow_remote=True)  # default policy
    assert _fetch(f"{server}/img").size == (8, 8)


def test_etaconfig_remote_settings_reach_the_fetch(server):
    from eta_guard.media import image_options

    refused = ETAConfig(allow_remote_images=True)
    with pytest.raises(InvalidInputError, match="loopback"):
        load_image(f"{server}/img", **image_options(refused))
    allowed = refused.with_overrides(allow_private_image_hosts=True)
    assert load_image(f"{server}/img", **image_options(allowed)).size == (8, 8)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata endpoint
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-global"),
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_target_address_table(address, reason):
    from eta_guard.remote_fetch import blocked_reason

    assert blocked_reason(address) == reason


def _fake_dns(monkeypatch, table):
    """Resolve the names in ``table`` (name -> list of address lists, one per call)."""
    real = socket.getaddrinfo
    calls: dict[str, int] = {}

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            return real(host, port, *args, **kwargs)
        n = calls[host] = calls.get(host, 0) + 1
        answers = table[host][min(n, len(table[host])) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def test_every_resolved_address_is_checked(monkeypatch):
    _fake_dns(monkeypatch, {"mixed.test": [["8.8.8.8", "127.0.0.1"]]})
    with pytest.raises(InvalidInputError, match="loopback"):
        load_image("http://mixed.test/img", allow_remote=True)


def _treat_127_0_0_1_as_public(monkeypatch):
    import eta_guard.remote_fetch as remote_fetch

    real = remote_fetch.blocked_reason
    monkeypatch.setattr(
        remote_fetch, "blocked_reason", lambda a: None if a == "127.0.0.1" else real(a)
    )


def test_connection_goes_to_the_checked_address_not_a_rebound_one(server, monkeypatch):
    # The name resolves to an allowed address once, then to a private one: a fetch that
    # resolved again at connect time would go to 10.0.0.1 (and time out here).
    _treat_127_0_0_1_as_public(monkeypatch)
    port = server.rsplit(":", 1)[1]
    calls = _fake_dns(monkeypatch, {"rebind.test": [["127.0.0.1"], ["10.0.0.1"]]})
    _Handler.hosts.clear()
    image = load_image(f"http://rebind.test:{port}/img", allow_remote=True, timeout=3.0)
    assert image.size == (8, 8)
    assert calls == {"rebind.test": 1}
    assert _Handler.hosts == [f"rebind.test:{port}"]  # the server saw the name, not the IP


def test_each_redirect_hop_is_checked_again(server, monkeypatch):
    _treat_127_0_0_1_as_public(monkeypatch)
    port = server.rsplit(":", 1)[1]
    with pytest.raises(InvalidInputError, match=r"redirect 1.*loopback"):
        load_image(f"{server}/redirect?http://127.0.0.2:{port}/img", allow_remote=True, timeout=3.0)
    assert load_image(f"{server}/redirect?/img", allow_remote=True, timeout=3.0).size == (8, 8)


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://x/"])
def test_redirects_to_other_schemes_are_refused(server, target):
    with pytest.raises(InvalidInputError, match="only http and https"):
        _fetch(f"{server}/redirect?{target}")


def test_redirect_loops_stop_at_the_limit(server):
    with pytest.raises(InvalidInputError, match="remote_max_redirects=2"):
        _fetch(f"{server}/loop", max_redirects=2)


def test_the_deadline_is_total_not_per_read(server):
    # Each byte arrives well within any per-read timeout; the whole body would take 8 s.
    start = time.monotonic()
    with pytest.raises(InvalidInputError, match="remote_timeout=1s"):
        _fetch(f"{server}/slow", timeout=1.0)
    assert time.monotonic() - start < 1.8


@pytest.mark.parametrize("path", ["/declared-big", "/endless"])
def test_the_byte_cap_holds_with_and_without_content_length(server, path):
    start = time.monotonic()
    with pytest.raises(InvalidInputError, match="remote_max_bytes=1_000_000"):
        _fetch(f"{server}{path}", max_bytes=1_000_000)
    assert time.monotonic() - start < 3


def test_compressed_bodies_are_refused(server):
    with pytest.raises(InvalidInputError, match="deflate"):
        _fetch(f"{server}/gzip")


def test_http_errors_are_typed_and_do_not_quote_the_body(server):
    with pytest.raises(InvalidInputError, match="HTTP 404") as caught:
        _fetch(f"{server}/missing")
    assert "SECRET" not in str(caught.value)
