"""Fetch a remote image without letting the URL's owner hold, flood or steer the fetch.

Used by :mod:`eta_guard.media` only when remote images are allowed
(``ETAConfig.allow_remote_images``). Each fetch has:

- a total deadline (``timeout``): connect, redirects, headers and body together, not per read;
  the caller gets its answer by then even if a read is still blocked in the worker thread;
- a byte cap (``max_bytes``), checked on ``Content-Length`` and while reading; the body is
  asked for and read without content encoding, so a gzip bomb cannot expand behind the cap;
- redirects followed by hand, at most ``max_redirects``, only to ``http``/``https``, each hop
  checked exactly like the first;
- a target check: the host is resolved once, every address it resolves to must be public
  (not loopback, private, link-local, multicast, reserved or unspecified, IPv4-mapped forms
  included) unless ``allow_private_hosts``, and the connection goes to the checked address
  (``Host`` header and TLS SNI keep the name), so DNS rebinding between check and connect
  cannot move it. Proxies from the environment are ignored for the same reason.

Error messages name the URL shortened and never quote the response body.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from eta_guard.errors import InvalidInputError

_SCHEMES = ("http", "https")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class RemoteFetchPolicy:
    """How a remote image may be fetched (see the module docstring).

    Attributes:
        timeout: Total seconds for the whole fetch, redirects included.
        max_bytes: Largest body accepted.
        max_redirects: Redirects followed (each re-checked).
        allow_private_hosts: Allow loopback / private / link-local / multicast / reserved targets.
    """

    timeout: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    allow_private_hosts: bool = False

    @classmethod
    def from_config(cls, config: Any) -> RemoteFetchPolicy:
        """The policy an ``ETAConfig`` asks for."""
        return cls(
            timeout=config.remote_timeout,
            max_bytes=config.remote_max_bytes,
            max_redirects=config.remote_max_redirects,
            allow_private_hosts=config.allow_private_image_hosts,
        )


def fetch_bytes(url: str, policy: RemoteFetchPolicy, *, label: str) -> bytes:
    """Download ``url`` under ``policy`` and return the body.

    Args:
        url: An ``http(s)://`` URL.
        policy: Deadline, byte cap, redirects and target rules.
        label: How to name the URL in error messages (already shortened by the caller).

    Raises:
        InvalidInputError: The URL, a redirect or a target is refused, the server failed or
            answered with an error, the body is too large, or the deadline passed.
    """
    deadline = time.monotonic() + policy.timeout
    outcome: dict[str, Any] = {}
    cancel = threading.Event()

    def work() -> None:
        try:
            outcome["data"] = _fetch(url, policy, deadline, cancel, label)
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    # The worker's own reads are bounded by the time left, so an abandoned worker ends soon too.
    worker = threading.Thread(target=work, daemon=True, name="eta-guard-fetch")
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        cancel.set()
        raise _timeout_error(label, policy)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def _fetch(
    url: str, policy: RemoteFetchPolicy, deadline: float, cancel: threading.Event, label: str
) -> bytes:
    try:
        import httpx
    except ImportError as e:
        raise ImportError(
            "fetching remote images needs httpx: pip install 'eta-guard[remote]'"
        ) from e

    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise InvalidInputError(f"image URL {label} is not a valid URL") from e
    # trust_env=False: an HTTP(S)_PROXY from the environment would connect somewhere unchecked.
    with httpx.Client(trust_env=False, follow_redirects=False) as client:
        for hop in range(policy.max_redirects + 1):
            where = label if hop == 0 else f"{label} (redirect {hop})"
            request = _checked_request(client, current, policy, where)
            try:
                data, location = _send(client, request, policy, deadline, cancel, where)
            except httpx.TimeoutException as e:
                raise _timeout_error(label, policy) from e
            except httpx.HTTPError as e:
                raise InvalidInputError(
                    f"could not fetch the image URL {where}: {type(e).__name__}"
                ) from e
            if location is None:
                return data
            try:
                current = current.join(location)
            except (httpx.InvalidURL, ValueError, TypeError) as e:
                raise InvalidInputError(f"{where} redirects to an invalid URL") from e
    raise InvalidInputError(
        f"image URL {label} redirects more than remote_max_redirects={policy.max_redirects} "
        "times; pass the final URL, or the image itself"
    )


def _checked_request(client: Any, url: Any, policy: RemoteFetchPolicy, where: str) -> Any:
    """A request to the checked address of ``url``'s host (``Host`` and SNI keep the name)."""
    if url.scheme not in _SCHEMES:
        raise InvalidInputError(
            f"{where} uses the scheme {url.scheme[:16]!r}; only http and https images are fetched"
        )
    if not url.host:
        raise InvalidInputError(f"image URL {where} has no host")
    port = url.port or (443 if url.scheme == "https" else 80)
    address = _checked_address(url.host, port, policy, where)
    headers = {
        "Host": url.netloc.decode("ascii"),
        "User-Agent": "eta-guard",
        "Accept": "image/*",
        "Accept-Encoding": "identity",
    }
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    return client.build_request(
        "GET", url.copy_with(host=address), headers=headers, extensions=extensions
    )


def _send(
    client: Any,
    request: Any,
    policy: RemoteFetchPolicy,
    deadline: float,
    cancel: threading.Event,
    where: str,
) -> tuple[bytes, str | None]:
    """Send one hop; return ``(body, None)`` or ``(b"", location)`` for a redirect."""
    import httpx

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise httpx.TimeoutException("deadline passed")
    request.extensions["timeout"] = httpx.Timeout(remaining).as_dict()
    response = client.send(request, stream=True)
    try:
        if response.is_redirect:
            location = response.headers.get("location")
            if not location:
                raise InvalidInputError(f"{where} answered a redirect without a Location")
            return b"", location
        if response.status_code != 200:
            raise InvalidInputError(
                f"the image URL {where} answered HTTP {response.status_code}, not 200"
            )
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InvalidInputError(
                f"the image URL {where} sent a {encoding[:20]!r}-encoded body although none was "
                "asked for; refused (a compressed body could expand past remote_max_bytes)"
            )
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > policy.max_bytes:
            raise _too_large(where, policy)
        body = bytearray()
        for chunk in response.iter_raw(_CHUNK):
            body += chunk
            if len(body) > policy.max_bytes:
                raise _too_large(where, policy)
            if cancel.is_set() or time.monotonic() > deadline:
                raise httpx.TimeoutException("deadline passed")
        return bytes(body), None
    finally:
        response.close()


def _checked_address(host: str, port: int, policy: RemoteFetchPolicy, where: str) -> str:
    """Resolve ``host`` once; every address must be allowed; return the first one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise InvalidInputError(f"the host of the image URL {where} could not be resolved") from e
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise InvalidInputError(f"the host of the image URL {where} could not be resolved")
    if not policy.allow_private_hosts:
        for address in addresses:
            reason = blocked_reason(address)
            if reason is not None:
                raise InvalidInputError(
                    f"the image URL {where} resolves to a {reason} address; remote images are "
                    "fetched only from public hosts (set allow_private_image_hosts=True to allow "
                    "internal hosts you trust)"
                )
    return addresses[0].split("%", 1)[0]  # drop an IPv6 zone id


def blocked_reason(address: str) -> str | None:
    """Why ``address`` may not be fetched from by default (``None``: it is public).

    IPv4-mapped and 6to4 IPv6 forms are judged by the IPv4 address they carry.
    """
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            address.split("%", 1)[0]
        )
    except ValueError:
        return "unparseable"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            ip = embedded
    for flag, reason in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_unspecified", "unspecified"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, flag):
            return reason
    if not ip.is_global:  # shared address space (100.64/10) and the like
        return "non-global"
    return None


def _too_large(where: str, policy: RemoteFetchPolicy) -> InvalidInputError:
    return InvalidInputError(
        f"the image at {where} is larger than remote_max_bytes={policy.max_bytes:_} bytes; "
        "download and resize it first"
    )


def _timeout_error(label: str, policy: RemoteFetchPolicy) -> InvalidInputError:
    return InvalidInputError(
        f"fetching the image URL {label} took longer than remote_timeout={policy.timeout:g}s "
        "(the whole fetch, redirects included); download the image yourself and pass its bytes"
    )
