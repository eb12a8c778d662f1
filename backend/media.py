"""Fetching task images the way Label Studio serves them, safely.

Task URLs are user data, so every download is bounded in size and time, only goes
to Label Studio or to hosts the operator allowed (redirects are re-checked per hop,
against SSRF), and carries Label Studio credentials only to Label Studio itself.
Images are decoded as the browser shows them (EXIF orientation applied), because
regions are drawn in those coordinates.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import socket
import threading
import time
from collections import OrderedDict
from pathlib import PurePosixPath
from urllib.parse import parse_qs, unquote_to_bytes, urljoin, urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.settings import Settings

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")  # no plugins that shell out (EPS)
MAX_REDIRECTS = 5
LOCAL_FILES_PATH = "/data/local-files/"

# httpx logs every URL at INFO and httpcore the response headers at DEBUG; presigned storage URLs
# and their redirects carry signatures there, so both stay at WARNING whatever LOG_LEVEL says.
for _logger in ("httpx", "httpcore"):
    logging.getLogger(_logger).setLevel(logging.WARNING)


class MediaError(ValueError):
    """An image that cannot be used, with a reason fit for an API response."""


class MediaFetcher:
    """Loads task images from any URL kind Label Studio puts in ``task.data``."""

    def __init__(self, settings: Settings, client: LabelStudioClient | None = None):
        self._settings = settings
        self._owns_client = client is None and bool(settings.label_studio_url and settings.label_studio_api_key)
        if self._owns_client:
            client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
        self._client = client
        self._ls_url = client.url if client else settings.label_studio_url
        # No keep-alive: every download gets its own connection, which its deadline can cut.
        self._http = httpx.Client(timeout=settings.media_timeout, follow_redirects=False,
                                  limits=httpx.Limits(max_keepalive_connections=0))
        self._cache = _ImageCache(settings.media_cache_mb * 1024 * 1024)

    def close(self) -> None:
        self._http.close()
        if self._owns_client:
            self._client.close()

    def load_image(self, url: str, task_id: int | None = None) -> Image.Image:
        """The image at ``url`` as RGB, EXIF-transposed; ``task_id`` is needed for cloud URIs."""
        if not isinstance(url, str) or not url.strip():
            raise MediaError("task has no image URL")
        url = url.strip()
        key = (url, task_id if _scheme(url) in CLOUD_SCHEMES else None)
        image = self._cache.get(key)
        if image is None:
            image = self._decode(self._read(url, task_id), _describe(url))
            self._cache.put(key, image)
        return image.copy()

    def _read(self, url: str, task_id: int | None) -> bytes:
        scheme = _scheme(url)
        if scheme == "data":
            return self._data_url(url)
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise MediaError(f"{scheme}:// images need the task id to be presigned by Label Studio")
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            return self._fetch(self._on_label_studio(f"/tasks/{int(task_id)}/presign/?fileuri={fileuri}"))
        if scheme == "" and url.startswith("/") and not url.startswith("//"):
            return self._local_file(url) or self._fetch(self._on_label_studio(url))
        if scheme not in ("http", "https"):
            raise MediaError(f"unsupported image URL {_describe(url)}")
        _check_url(url)
        if self._is_label_studio(url):
            return self._local_file(url) or self._fetch(url)
        return self._fetch(url)

    def _on_label_studio(self, path: str) -> str:
        if not self._ls_url:
            raise MediaError(f"{_describe(path)} is served by Label Studio, but LABEL_STUDIO_URL is not set "
                             "(the backend needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read it)")
        return self._ls_url + path

    def _is_label_studio(self, url: str) -> bool:
        return self._ls_url is not None and _origin(url) == _origin(self._ls_url)

    def _allowed(self, url: str) -> bool:
        if self._is_label_studio(url):
            return True
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        netloc = f"{host}:{parts.port}" if parts.port else host
        return any(entry in (host, netloc) for entry in self._settings.allowed_media_hosts)

    def _local_file(self, url: str) -> bytes | None:
        """Bytes of a ``/data/local-files/?d=...`` file under LOCAL_FILES_DOCUMENT_ROOT, if it is there.

        A missing file falls back to downloading from Label Studio; a path that leaves
        the root (``..``, absolute paths, symlinks pointing out) is refused outright.
        """
        root = self._settings.local_files_document_root
        parts = urlsplit(url)
        if root is None or parts.path.rstrip("/") != LOCAL_FILES_PATH.rstrip("/"):
            return None
        relative = (parse_qs(parts.query).get("d") or [""])[0]
        pure = PurePosixPath(relative)
        if not relative or "\x00" in relative or pure.is_absolute() or ".." in pure.parts:
            raise MediaError(f"local file path {relative!r} is not a relative path inside the document root")
        path = (root / pure).resolve()
        if not path.is_relative_to(root):
            raise MediaError(f"local file {relative!r} resolves outside the document root")
        if not path.is_file():
            if self._ls_url:
                return None
            raise MediaError(f"local file {relative!r} does not exist under LOCAL_FILES_DOCUMENT_ROOT")
        if path.stat().st_size > self._settings.max_image_bytes:
            raise MediaError(f"local file {relative!r} is larger than MAX_IMAGE_BYTES")
        return path.read_bytes()

    def _fetch(self, url: str) -> bytes:
        _check_url(url)
        if not self._allowed(url):
            raise MediaError(
                f"image host of {_describe(url)} is not allowed; add it to ALLOWED_MEDIA_HOSTS to fetch from it"
            )
        deadline = _Deadline(self._settings.media_timeout)
        on_label_studio = True  # credentials only while every hop so far was Label Studio's
        try:
            for _ in range(MAX_REDIRECTS + 1):
                on_label_studio = on_label_studio and self._is_label_studio(url)
                headers = self._auth_headers() if on_label_studio else {}
                with self._http.stream("GET", url, headers=headers, timeout=deadline.remaining(),
                                       extensions={"trace": deadline.trace}) as response:
                    if response.is_redirect:
                        url = self._redirect_target(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise MediaError(self._refusal(url, response.status_code, on_label_studio))
                    return self._body(response, deadline, url)
        except httpx.HTTPError as exc:
            if deadline.expired or isinstance(exc, httpx.TimeoutException):
                raise MediaError(f"downloading {_describe(url)} took longer than MEDIA_TIMEOUT") from None
            hint = "check LABEL_STUDIO_URL" if self._is_label_studio(url) else "check that the backend reaches it"
            raise MediaError(f"downloading {_describe(url)} failed ({type(exc).__name__}); {hint}") from None
        finally:
            deadline.cancel()
        raise MediaError(f"downloading {_describe(url)} was redirected more than {MAX_REDIRECTS} times")

    def _refusal(self, url: str, status: int, on_label_studio: bool) -> str:
        """Why a download was answered ``status``, naming the setting that fixes it where one does."""
        message = f"downloading {_describe(url)} failed: HTTP {status}"
        if on_label_studio and status in (401, 403):
            if self._client is None:
                return f"{message}: Label Studio needs a token; set LABEL_STUDIO_API_KEY on the backend"
            return (f"{message}: Label Studio refused LABEL_STUDIO_API_KEY; set it to a personal access token "
                    "of a user who can see the project")
        if on_label_studio and status == 404 and LOCAL_FILES_PATH in url:
            return (f"{message}: Label Studio serves local files only with LOCAL_FILES_SERVING_ENABLED and a "
                    "Local Storage covering the path (or set LOCAL_FILES_DOCUMENT_ROOT on the backend)")
        return message

    def _redirect_target(self, url: str, location: str) -> str:
        """Redirects chosen by Label Studio (e.g. presigned storage URLs) are trusted; others re-checked."""
        try:
            target = urljoin(url, location)
        except ValueError:
            raise MediaError(f"{_describe(url)} redirected to a malformed URL") from None
        if _scheme(target) not in ("http", "https"):
            raise MediaError(f"{_describe(url)} redirected to an unsupported URL")
        _check_url(target)
        if not self._is_label_studio(url) and not self._allowed(target):
            raise MediaError(f"{_describe(url)} redirected to {_describe(target)}, a host that is not allowed")
        return target

    def _auth_headers(self) -> dict[str, str]:
        if self._client is None:
            return {}
        try:
            return self._client.auth_headers()
        except LabelStudioError as exc:
            raise MediaError(f"cannot authenticate to Label Studio with LABEL_STUDIO_API_KEY: {exc}") from None

    def _body(self, response: httpx.Response, deadline: _Deadline, url: str) -> bytes:
        limit = self._settings.max_image_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MediaError(f"{_describe(url)} is {declared} bytes, more than MAX_IMAGE_BYTES ({limit})")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise MediaError(f"{_describe(url)} is larger than MAX_IMAGE_BYTES ({limit})")
            if deadline.expired:
                raise MediaError(f"downloading {_describe(url)} took longer than MEDIA_TIMEOUT")
            chunks.append(chunk)
        return b"".join(chunks)

    def _data_url(self, url: str) -> bytes:
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.endswith(";base64") or not header.startswith("image/"):
            raise MediaError("only base64 data:image/... URLs are supported")
        if len(payload) * 3 // 4 > self._settings.max_image_bytes:
            raise MediaError("data: URL is larger than MAX_IMAGE_BYTES")
        try:
            return base64.b64decode(unquote_to_bytes(payload), validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("data: URL holds invalid base64") from None

    def _decode(self, data: bytes, where: str) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            limit = self._settings.max_image_pixels
            if width * height > limit:
                raise MediaError(f"{where} is {width}x{height} pixels, more than MAX_IMAGE_PIXELS ({limit})")
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
        except MediaError:
            raise
        except Image.DecompressionBombError:
            raise MediaError(f"{where} has too many pixels (decompression bomb)") from None
        except UnidentifiedImageError:
            raise MediaError(f"{where} is not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError, EOFError):
            raise MediaError(f"{where} is a truncated or corrupt image") from None


class _Deadline:
    """Cuts a download off at MEDIA_TIMEOUT, whatever the server does.

    httpx's timeouts bound each socket operation, so a server that trickles one byte at a
    time (headers included) never trips them; at the deadline this shuts down the sockets
    the download opened, which ends any read in progress.
    """

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self._at

    def remaining(self) -> float:
        return max(self._at - time.monotonic(), 0.001)

    def trace(self, event: str, info: dict) -> None:
        """httpcore's trace hook: learns each connection's socket as it is opened."""
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        sock = info["return_value"].get_extra_info("socket")
        with self._lock:
            self._sockets.append(sock)
            expired = self._expired
        if expired:
            _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock: socket.socket | None) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):  # already closed, or detached by TLS wrapping
        pass


class _ImageCache:
    """LRU of decoded images, bounded by their pixel bytes; shared by request threads."""

    def __init__(self, max_bytes: int):
        self._max = max_bytes
        self._items: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Image.Image | None:
        with self._lock:
            image = self._items.get(key)
            if image is not None:
                self._items.move_to_end(key)
            return image

    def put(self, key: tuple, image: Image.Image) -> None:
        cost = image.width * image.height * 3
        if cost > self._max:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = image
            self._size += cost
            while self._size > self._max:
                _, old = self._items.popitem(last=False)
                self._size -= old.width * old.height * 3


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit: browsers show the high byte
        high = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        image = Image.fromarray(high)
    return image if image.mode == "RGB" else image.convert("RGB")


def _scheme(url: str) -> str:
    head, sep, _ = url.partition(":")
    return head.lower() if sep and head.replace("-", "").isalnum() else ""


def _check_url(url: str) -> None:
    """Refuse URLs that parsers may read differently: credentials, bad ports, control characters.

    The allow-list is checked on one parse of the URL and the request made from another
    (httpx's); both must agree on the host, and ``http://allowed@evil/``-style URLs are
    refused outright rather than trusted to be read the same way everywhere.
    """
    try:
        parsed = httpx.URL(url)
        urlsplit(url).port  # noqa: B018  (raises on ports out of range)
    except (httpx.InvalidURL, ValueError):
        raise MediaError(f"malformed image URL {_describe(url)}") from None
    if parsed.userinfo or "@" in urlsplit(url).netloc:
        raise MediaError(f"image URLs with a user name or password are refused: {_describe(url)}")
    if not parsed.host or parsed.host != (urlsplit(url).hostname or "").lower():
        raise MediaError(f"malformed image URL {_describe(url)}")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _describe(url: str) -> str:
    """The URL without credentials or query (presigned URLs carry signatures there)."""
    if url.startswith("data:"):
        return "data: URL"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a bracketed host that is no IPv6 address
        return "an unparsable URL"
    host = parts.netloc.rpartition("@")[2]  # no user info; not parsed further: it may be malformed
    where = f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path
    local = parse_qs(parts.query).get("d") if parts.path.rstrip("/") == LOCAL_FILES_PATH.rstrip("/") else None
    return f"{where}?d={local[0]}" if local else where
