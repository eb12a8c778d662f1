"""MediaFetcher against real local HTTP servers: URL kinds, auth, SSRF rules, limits, decoding."""

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from backend.media import MediaError, MediaFetcher
from backend.settings import Settings
from tests.backend.local_http import (  # noqa: F401  (fixtures)
    LEGACY_KEY,
    FakeLabelStudio,
    Reply,
    TrickleServer,
    other_server,
    server,
)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def gradient(width=40, height=30) -> Image.Image:
    """An image whose pixels say where they are: R = column, G = row."""
    yy, xx = np.mgrid[:height, :width]
    pixels = np.stack([xx * 6, yy * 8, np.full_like(xx, 99)], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


PNG = encode(gradient())


def png_reply(data: bytes = PNG) -> Reply:
    return Reply(200, data, {"Content-Type": "image/png"})


def make_fetcher(ls_server=None, key=LEGACY_KEY, **overrides) -> MediaFetcher:
    values = {
        "label_studio_url": ls_server.url if ls_server else None,
        "label_studio_api_key": key if ls_server else None,
        "media_timeout": 5.0,
        **overrides,
    }
    return MediaFetcher(Settings(**values))


@pytest.fixture
def ls(server):
    return FakeLabelStudio(server)


def test_uploaded_file_is_fetched_from_label_studio_with_the_legacy_token(server, ls):
    ls.serve("/data/upload/1/abc-img0.png", png_reply())
    image = make_fetcher(server).load_image("/data/upload/1/abc-img0.png")
    assert image.mode == "RGB" and image.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(gradient()))
    assert server.hits("/data/upload/1/abc-img0.png")[0].headers["Authorization"] == f"Token {LEGACY_KEY}"


def test_uploaded_file_with_a_personal_access_token(server, ls):
    ls.legacy_enabled = False
    ls.serve("/data/upload/1/img.png", png_reply())
    image = make_fetcher(server, key=ls.pat).load_image("/data/upload/1/img.png")
    assert image.size == (40, 30)
    assert ls.refreshes == 1
    assert server.hits("/data/upload/1/img.png")[0].headers["Authorization"].startswith("Bearer ")


def test_wrong_key_gives_a_media_error_naming_the_status(server, ls):
    ls.serve("/data/upload/1/img.png", png_reply())
    with pytest.raises(MediaError, match="HTTP 401"):
        make_fetcher(server, key="not-the-key").load_image("/data/upload/1/img.png")


def test_absolute_label_studio_url_gets_auth_but_another_host_name_does_not(server, ls):
    ls.serve("/data/local-files/", png_reply())
    fetcher = make_fetcher(server)
    assert fetcher.load_image(f"{server.url}/data/local-files/?d=images/a.png").size == (40, 30)
    # Same port, other host name: not Label Studio, so neither credentials nor access.
    with pytest.raises(MediaError, match="not allowed"):
        fetcher.load_image(f"http://localhost:{server.port}/data/local-files/?d=images/a.png")
    assert len(server.hits("/data/local-files/")) == 1


def test_local_files_are_read_from_the_document_root(tmp_path, server, ls):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a b.png").write_bytes(PNG)
    fetcher = make_fetcher(server, local_files_document_root=tmp_path)
    assert fetcher.load_image("/data/local-files/?d=images/a%20b.png").size == (40, 30)
    assert fetcher.load_image(f"{server.url}/data/local-files/?d=images/a b.png").size == (40, 30)
    assert server.requests == []


def test_local_files_work_without_label_studio(tmp_path):
    (tmp_path / "x.png").write_bytes(PNG)
    fetcher = make_fetcher(local_files_document_root=tmp_path)
    assert fetcher.load_image("/data/local-files/?d=x.png").size == (40, 30)
    with pytest.raises(MediaError, match="does not exist"):
        fetcher.load_image("/data/local-files/?d=missing.png")


def test_missing_local_file_falls_back_to_label_studio(tmp_path, server, ls):
    ls.serve("/data/local-files/", png_reply())
    fetcher = make_fetcher(server, local_files_document_root=tmp_path)
    assert fetcher.load_image("/data/local-files/?d=elsewhere/a.png").size == (40, 30)
    assert server.hits("/data/local-files/")[0].query == {"d": ["elsewhere/a.png"]}


@pytest.mark.parametrize(
    "d", ["../secret.png", "images/../../secret.png", "/etc/passwd", "images/%2E%2E/%2E%2E/secret.png", ""]
)
def test_local_file_paths_cannot_leave_the_root(tmp_path, server, ls, d):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(PNG)
    ls.serve("/data/local-files/", png_reply())
    with pytest.raises(MediaError, match="document root"):
        make_fetcher(server, local_files_document_root=root).load_image(f"/data/local-files/?d={d}")
    assert server.requests == []  # refused outright, no fallback download


def test_symlinks_out_of_the_root_are_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(PNG)
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "inside.png").write_bytes(PNG)
    (root / "ok-link.png").symlink_to(root / "inside.png")
    fetcher = make_fetcher(local_files_document_root=root)
    with pytest.raises(MediaError, match="outside the document root"):
        fetcher.load_image("/data/local-files/?d=link.png")
    assert fetcher.load_image("/data/local-files/?d=ok-link.png").size == (40, 30)


def test_plain_urls_need_an_allowed_host_and_get_no_credentials(server, other_server, ls):
    other_server.route("GET", "/cdn/a.png", png_reply())
    url = f"{other_server.url}/cdn/a.png"
    with pytest.raises(MediaError, match="ALLOWED_MEDIA_HOSTS"):
        make_fetcher(server).load_image(url)
    assert other_server.requests == []
    fetcher = make_fetcher(server, allowed_media_hosts=(f"localhost:{other_server.port}",))
    assert fetcher.load_image(url).size == (40, 30)
    assert "Authorization" not in other_server.hits("/cdn/a.png")[0].headers
    by_name = make_fetcher(server, allowed_media_hosts=("localhost",))
    assert by_name.load_image(url + "?v=2").size == (40, 30)


def test_redirects_are_checked_on_every_hop(server, other_server):
    allowed = make_fetcher(allowed_media_hosts=(f"localhost:{other_server.port}",))
    other_server.route("GET", "/to-forbidden", Reply(302, b"", {"Location": f"{server.url}/internal"}))
    server.route("GET", "/internal", png_reply())
    with pytest.raises(MediaError, match="redirected to .* not allowed"):
        allowed.load_image(f"{other_server.url}/to-forbidden")
    assert server.requests == []
    other_server.route("GET", "/to-ls", Reply(302, b"", {"Location": f"{server.url}/data/upload/1/a.png"}))
    server.route("GET", "/data/upload/1/a.png", png_reply())
    via_ls = make_fetcher(server, allowed_media_hosts=(f"localhost:{other_server.port}",))
    assert via_ls.load_image(f"{other_server.url}/to-ls").size == (40, 30)
    assert "Authorization" not in server.hits("/data/upload/1/a.png")[0].headers  # a third party chose this URL
    other_server.route("GET", "/hop", Reply(301, b"", {"Location": "/final.png"}))
    other_server.route("GET", "/final.png", png_reply())
    assert allowed.load_image(f"{other_server.url}/hop").size == (40, 30)
    other_server.route("GET", "/loop", Reply(302, b"", {"Location": "/loop"}))
    with pytest.raises(MediaError, match="redirected more than"):
        allowed.load_image(f"{other_server.url}/loop")


def test_cloud_uris_go_through_the_label_studio_presign_endpoint(server, other_server, ls):
    uri = "s3://bucket/path/img 1.png"

    def presign(request):
        assert base64.urlsafe_b64decode(request.query["fileuri"][0]).decode() == uri
        return Reply(303, b"", {"Location": f"{other_server.url}/bucket/img.png?X-Amz-Signature=sig"})

    server.route("GET", "/tasks/5/presign/", ls.authed(presign))
    other_server.route("GET", "/bucket/img.png", png_reply())
    # The storage host is not in ALLOWED_MEDIA_HOSTS: Label Studio chose it, so the redirect is followed,
    # but Label Studio's credentials stay with Label Studio.
    assert make_fetcher(server).load_image(uri, task_id=5).size == (40, 30)
    assert "Authorization" not in other_server.hits("/bucket/img.png")[0].headers
    with pytest.raises(MediaError, match="task id"):
        make_fetcher(server).load_image("gs://bucket/x.png")


def test_relative_urls_need_label_studio():
    with pytest.raises(MediaError, match="LABEL_STUDIO_URL"):
        make_fetcher().load_image("/data/upload/1/x.png")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "images/a.png", "//evil/a.png", " "])
def test_unsupported_urls(server, url):
    with pytest.raises(MediaError):
        make_fetcher(server).load_image(url)


def test_error_messages_leave_out_query_strings(server, other_server):
    other_server.route("GET", "/private.png", Reply(403, b"denied"))
    fetcher = make_fetcher(allowed_media_hosts=("localhost",))
    with pytest.raises(MediaError) as info:
        fetcher.load_image(f"{other_server.url}/private.png?X-Amz-Signature=topsecret")
    assert "HTTP 403" in str(info.value) and "topsecret" not in str(info.value)


def test_exif_orientation_is_applied(server):
    source = gradient(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    server.route("GET", "/photo.jpg", Reply(200, encode(source, "JPEG", quality=95, exif=exif)))
    image = make_fetcher(server).load_image(f"{server.url}/photo.jpg")
    assert image.size == (30, 40)
    expected = np.asarray(source.transpose(Image.Transpose.ROTATE_270), dtype=int)
    assert np.abs(np.asarray(image, dtype=int) - expected).mean() < 4


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK"])
def test_other_modes_become_rgb(server, mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    server.route("GET", "/img", Reply(200, encode(gradient().convert(mode), fmt)))
    image = make_fetcher(server).load_image(f"{server.url}/img")
    assert image.mode == "RGB" and image.size == (40, 30)


def test_sixteen_bit_images_keep_their_contrast(server):
    deep = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)
    server.route("GET", "/deep.png", Reply(200, encode(Image.fromarray(deep))))
    image = np.asarray(make_fetcher(server).load_image(f"{server.url}/deep.png"))
    np.testing.assert_array_equal(image[:, :, 0], (deep >> 8).astype(np.uint8))


def test_data_urls(server):
    fetcher = make_fetcher()
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert fetcher.load_image(url).size == (40, 30)
    with pytest.raises(MediaError, match="base64"):
        fetcher.load_image("data:image/png;base64,@@@@")
    with pytest.raises(MediaError, match="data:image"):
        fetcher.load_image("data:text/html,<b>hi</b>")


def test_body_size_is_bounded(server):
    big = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)))
    assert len(big) > 100_000
    server.route("GET", "/declared.png", Reply(200, big))
    server.route("GET", "/undeclared.png", Reply(200, big, send_length=False))
    fetcher = make_fetcher(server, max_image_bytes=50_000)
    with pytest.raises(MediaError, match="MAX_IMAGE_BYTES"):
        fetcher.load_image(f"{server.url}/declared.png")
    with pytest.raises(MediaError, match="MAX_IMAGE_BYTES"):
        fetcher.load_image(f"{server.url}/undeclared.png")
    assert make_fetcher(server).load_image(f"{server.url}/undeclared.png").size == (200, 200)


def test_slow_servers_time_out(server):
    def slow(_request):
        time.sleep(1.0)
        return png_reply()

    server.route("GET", "/slow.png", slow)
    started = time.monotonic()
    with pytest.raises(MediaError, match="MEDIA_TIMEOUT"):
        make_fetcher(server, media_timeout=0.3).load_image(f"{server.url}/slow.png")
    assert time.monotonic() - started < 0.9


def test_non_images_and_truncated_images(server):
    server.route("GET", "/page.html", Reply(200, b"<html><body>login</body></html>"))
    server.route("GET", "/cut.png", Reply(200, PNG[: len(PNG) // 2]))
    jpeg = encode(gradient(), "JPEG")
    server.route("GET", "/cut.jpg", Reply(200, jpeg[: len(jpeg) // 2]))
    fetcher = make_fetcher(server)
    with pytest.raises(MediaError, match="not an image"):
        fetcher.load_image(f"{server.url}/page.html")
    for name in ("cut.png", "cut.jpg"):
        with pytest.raises(MediaError, match="truncated or corrupt"):
            fetcher.load_image(f"{server.url}/{name}")


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG claiming huge dimensions: what a decompression bomb looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_decompression_bombs_are_refused_before_decoding(server):
    server.route("GET", "/bomb.png", Reply(200, png_header_only(100_000, 100_000)))
    server.route("GET", "/big.png", Reply(200, png_header_only(3000, 2000)))
    fetcher = make_fetcher(server, max_image_pixels=5_000_000)
    with pytest.raises(MediaError, match="decompression bomb|MAX_IMAGE_PIXELS"):
        fetcher.load_image(f"{server.url}/bomb.png")
    with pytest.raises(MediaError, match="3000x2000 pixels, more than MAX_IMAGE_PIXELS"):
        fetcher.load_image(f"{server.url}/big.png")


def test_decoded_images_are_cached_and_callers_get_their_own_copy(server):
    server.route("GET", "/a.png", png_reply())
    fetcher = make_fetcher(server)
    first = fetcher.load_image(f"{server.url}/a.png")
    first.paste((0, 0, 0), (0, 0, 40, 30))
    second = fetcher.load_image(f"{server.url}/a.png")
    np.testing.assert_array_equal(np.asarray(second), np.asarray(gradient()))
    assert len(server.hits("/a.png")) == 1
    uncached = make_fetcher(server, media_cache_mb=0)
    uncached.load_image(f"{server.url}/a.png")
    uncached.load_image(f"{server.url}/a.png")
    assert len(server.hits("/a.png")) == 3


def test_cache_evicts_the_least_recently_used_image(server):
    side = 400  # 400 * 400 * 3 bytes: two fit in 1 MB, three do not
    for name in "abc":
        server.route("GET", f"/{name}.png", png_reply(encode(gradient(side, side))))
    fetcher = make_fetcher(server, media_cache_mb=1)
    for name in "abac":
        fetcher.load_image(f"{server.url}/{name}.png")
    counts = {name: len(server.hits(f"/{name}.png")) for name in "abc"}
    assert counts == {"a": 1, "b": 1, "c": 1}
    fetcher.load_image(f"{server.url}/a.png")  # still cached
    fetcher.load_image(f"{server.url}/b.png")  # was evicted
    assert (len(server.hits("/a.png")), len(server.hits("/b.png"))) == (1, 2)


# -- hostile servers, addresses and files ---------------------------------------------------------------
@pytest.mark.parametrize("part", ["headers", "body"])
def test_slow_loris_servers_are_cut_off_at_the_deadline(part):
    """Each byte arrives well within the per-read timeout, so only a whole-download deadline stops them."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n" + b"X-Pad: a\r\n" * 40
    head += b"Content-Length: %d\r\n\r\n" % len(PNG)
    first, trickled = (b"", head + PNG) if part == "headers" else (head, PNG)  # body: headers at once
    with TrickleServer(trickled, chunk=1, delay=0.05, head=first) as slow:
        fetcher = make_fetcher(media_timeout=0.5, allowed_media_hosts=(slow.host,))
        started = time.monotonic()
        with pytest.raises(MediaError, match="took longer than MEDIA_TIMEOUT"):
            fetcher.load_image(slow.url())
        assert time.monotonic() - started < 1.5  # the whole response would take len/20 s: minutes
        assert slow.connections == 1


def test_a_deadline_also_bounds_redirect_chains(server):
    """Every hop is quick, but together they take longer than MEDIA_TIMEOUT."""

    def hop(request):
        time.sleep(0.15)
        return Reply(302, b"", {"Location": f"/hop?{int(request.query.get('n', ['0'])[0]) + 1}"})

    server.route("GET", "/hop", hop)
    started = time.monotonic()
    with pytest.raises(MediaError, match="MEDIA_TIMEOUT"):
        make_fetcher(server, media_timeout=0.4).load_image(f"{server.url}/hop")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("host", [
    "localhost:{port}",  # a name that resolves to the allowed address is still another name
    "[::1]:{port}", "[::ffff:127.0.0.1]:{port}",  # IPv6 literals
    "2130706433:{port}", "0177.0.0.1:{port}", "0x7f.0.0.1:{port}", "127.1:{port}", "127.0.0.1.:{port}",  # IPv4 forms
    "127.0.0.1:{port}@localhost:{port}", "[127.0.0.1]:{port}", "127.0.0.1:{port}0000", "127.0.0.1:-1",
])
def test_address_tricks_do_not_pass_the_allow_list(server, host):
    server.route("GET", "/x.png", png_reply())
    fetcher = make_fetcher(allowed_media_hosts=(f"127.0.0.1:{server.port}",))
    assert fetcher.load_image(f"http://127.0.0.1:{server.port}/x.png").size == (40, 30)
    with pytest.raises(MediaError, match="not allowed|malformed|user name"):
        fetcher.load_image(f"http://{host.format(port=server.port)}/x.png")
    assert len(server.requests) == 1


@pytest.mark.parametrize("url", [
    "http://{allowed}@{internal}/x.png",  # reads as the allowed host, goes to the other one
    "http://{internal}@{allowed}/x.png",  # goes to the allowed host: refused too, as nobody needs it
    "http://{allowed}\\@{internal}/x.png", "http://user:pass@{allowed}/x.png",
])
def test_urls_with_user_info_are_refused(server, other_server, url):
    server.route("GET", "/x.png", png_reply())
    other_server.route("GET", "/x.png", png_reply())
    internal, allowed = f"127.0.0.1:{server.port}", f"localhost:{other_server.port}"
    fetcher = make_fetcher(allowed_media_hosts=(allowed,))
    with pytest.raises(MediaError, match="user name or password"):
        fetcher.load_image(url.format(allowed=allowed, internal=internal))
    assert server.requests == [] and other_server.requests == []


def test_redirects_to_user_info_or_malformed_urls_are_refused(server, other_server):
    fetcher = make_fetcher(allowed_media_hosts=(f"localhost:{other_server.port}",))
    for name, location in [("creds", f"http://localhost:{other_server.port}@127.0.0.1:{server.port}/x.png"),
                           ("port", f"http://localhost:{other_server.port}0000/x.png"),
                           ("bracket", f"http://[127.0.0.1]:{server.port}/x.png")]:
        other_server.route("GET", f"/{name}", Reply(302, b"", {"Location": location}))
        with pytest.raises(MediaError, match="user name|malformed|not allowed|RemoteProtocolError"):  # httpx's own
            fetcher.load_image(f"{other_server.url}/{name}")
    assert server.requests == []


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bmp_header_only(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 12, 0, 0, 14 + 40) + info + b"\0" * 12


def _gif_header_only(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
            + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;")


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is patched to claim another size."""
    data = bytearray(encode(gradient(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_images_claiming_absurd_sizes_are_refused_before_decoding(server):
    fetcher = make_fetcher(server, max_image_pixels=5_000_000)
    for name, data in [("bmp", _bmp_header_only(60_000, 60_000)), ("gif", _gif_header_only(65_535, 65_535)),
                       ("jpg", _jpeg_with_size(65_000, 65_000)), ("png", png_header_only(2**31 - 1, 1))]:
        server.route("GET", f"/{name}", Reply(200, data))
        with pytest.raises(MediaError, match="MAX_IMAGE_PIXELS|decompression bomb|truncated or corrupt") as info:
            fetcher.load_image(f"{server.url}/{name}")
        assert "x" in str(info.value) or "bomb" in str(info.value) or "corrupt" in str(info.value), name


def test_compressed_text_chunk_bombs_are_refused(server):
    """A zTXt chunk of 64 MB of zeros is 64 kB on the wire; Pillow's text limits must hold."""
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    data = PNG[:33] + _png_chunk(b"zTXt", b"comment\0\0" + bomb) + PNG[33:]
    server.route("GET", "/text-bomb.png", Reply(200, data))
    with pytest.raises(MediaError, match="truncated or corrupt"):
        make_fetcher(server).load_image(f"{server.url}/text-bomb.png")


def test_corrupt_and_foreign_files_are_refused_with_a_reason(server):
    broken_crc = bytearray(PNG)
    broken_crc[-20] ^= 0xFF  # inside the last IDAT chunk's data
    files = {
        "crc.png": (bytes(broken_crc), "truncated or corrupt"),
        "empty.png": (b"", "not an image"),
        "eps.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not an image"),  # no Ghostscript
        "svg.svg": (b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", "not an image"),
        "pdf.pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "not an image"),
        "zip.png": (b"PK\x03\x04" + b"\0" * 100, "not an image"),
        "header.png": (PNG[:40], "not an image|truncated or corrupt"),
    }
    fetcher = make_fetcher(server)
    for name, (data, reason) in files.items():
        server.route("GET", f"/{name}", Reply(200, data))
        with pytest.raises(MediaError, match=reason):
            fetcher.load_image(f"{server.url}/{name}")
