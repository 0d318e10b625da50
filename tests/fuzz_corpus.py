"""Malformed and odd requests for the service, generated from a seed (benchmarks.fuzz and
tests/test_fuzz.py): every one must get a 4xx or a 2xx, never a 5xx, and no error body may
show a traceback or a path on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from PIL import Image

from model.demo import part_image

LEAKS = ("Traceback", 'File "', "site-packages", "/work/", "/home/", "/usr/lib/")


@dataclass(frozen=True)
class FuzzRequest:
    kind: str  # which generator made it
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes | None = None  # sent as is on a socket, for what an HTTP client will not send


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_header(width: int, height: int, tail: bytes = b"") -> bytes:
    """A PNG signature and IHDR for any size, then whatever tail: no real pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + tail
    )


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    lines = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        lines.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + content
            + b"\r\n"
        )
    return b"".join(lines) + f"--{boundary}--\r\n".encode()


class Corpus:
    """Deterministic generators of bad requests, each a few lines."""

    def __init__(self, seed: int, product: str) -> None:
        self.rng = random.Random(seed)
        self.product = product
        good = part_image(seed % 50, 64)
        self.png = _encoded(good, "PNG")
        self.jpeg = _encoded(good, "JPEG")
        self.odd_images = [
            _encoded(Image.new("RGB", (1, 1)), "PNG"),
            _encoded(good.convert("L"), "PNG"),
            _encoded(good.convert("P"), "PNG"),
            _encoded(good.convert("RGBA"), "PNG"),
            _encoded(good.convert("I;16"), "PNG"),
            _encoded(good.convert("CMYK"), "JPEG"),
            _encoded(good.convert("L"), "JPEG"),
            _encoded(good, "BMP"),
            _encoded(good, "TIFF"),
            _encoded(good.resize((3, 900)), "PNG"),
        ]
        self.foreign = [
            _encoded(good, "GIF"),
            _encoded(good, "WEBP"),
            b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
            b'{"image": "not here"}',
        ]

    def _bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def _inspect(
        self,
        kind: str,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        path: str | None = None,
    ) -> FuzzRequest:
        path = path or f"/inspect/{self.product}?heatmap=none"
        return FuzzRequest(
            kind, "POST", path, {"Content-Type": content_type, **(headers or {})}, body
        )

    def random_bytes(self) -> FuzzRequest:
        body = self._bytes(self.rng.choice([0, 1, 7, 100, 5000]))
        return self._inspect("random bytes", body, self.rng.choice(["image/png", "image/jpeg"]))

    def truncated(self) -> FuzzRequest:
        source = self.rng.choice([self.png, self.jpeg])
        cut = self.rng.randrange(1, len(source))
        return self._inspect("truncated image", source[:cut], "image/png")

    def corrupted(self) -> FuzzRequest:
        data = bytearray(self.rng.choice([self.png, self.jpeg]))
        for _ in range(self.rng.randint(1, 20)):
            data[self.rng.randrange(len(data))] = self.rng.randrange(256)
        return self._inspect("corrupted image", bytes(data), "image/png")

    def absurd_header(self) -> FuzzRequest:
        width = self.rng.choice([0, 1, 65_535, 100_000, 2**31 - 1, 2**32 - 1])
        height = self.rng.choice([0, 1, 65_535, 100_000, 2**31 - 1])
        tail = self._bytes(self.rng.choice([0, 50]))
        return self._inspect("absurd PNG header", _png_header(width, height, tail), "image/png")

    def odd_image(self) -> FuzzRequest:
        return self._inspect("odd but valid image", self.rng.choice(self.odd_images), "image/png")

    def foreign_format(self) -> FuzzRequest:
        return self._inspect("other format", self.rng.choice(self.foreign), "image/png")

    def wrong_content_type(self) -> FuzzRequest:
        content_type = self.rng.choice(
            [
                "text/plain",
                "application/json",
                "application/octet-stream",
                "",
                "image/",
                "multipart/form-data",
                "multipart/form-data; boundary=",
                "image/png; charset=\x7f",
            ]
        )
        return self._inspect("content type", self.png, content_type)

    def bad_multipart(self) -> FuzzRequest:
        boundary = "b" + str(self.rng.randrange(10**6))
        choice = self.rng.randrange(6)
        if choice == 0:  # no file field
            body = _multipart([("other", None, b"x")], boundary)
        elif choice == 1:  # the file field as a plain value
            body = _multipart([("file", None, self.png)], boundary)
        elif choice == 2:  # two files
            body = _multipart([("file", "a.png", self.png), ("file", "b.png", self.png)], boundary)
        elif choice == 3:  # cut off
            full = _multipart([("file", "a.png", self.png)], boundary)
            body = full[: self.rng.randrange(1, len(full))]
        elif choice == 4:  # another boundary than declared
            body = _multipart([("file", "a.png", self.png)], boundary + "x")
        else:  # a file that is not an image
            body = _multipart([("file", "a.png", self._bytes(300))], boundary)
        content_type = f"multipart/form-data; boundary={boundary}"
        return self._inspect("bad multipart", body, content_type)

    def bad_path(self) -> FuzzRequest:
        name = self.rng.choice(
            [
                "",
                "x" * 300,
                "..",
                "../etc",
                "%2e%2e%2fetc",
                "a/b",
                self.product.upper(),
                "déjà",
                "a b",
                "%00",
                "unknown",
                "-",
                "_",
                "1" * 64,
                f"{self.product}%20",
            ]
        )
        method = self.rng.choice(["POST", "POST", "GET", "PUT", "DELETE", "PATCH"])
        return FuzzRequest("bad path or method", method, f"/inspect/{name}", {}, self.png)

    def bad_query(self) -> FuzzRequest:
        value = self.rng.choice(["", "bogus", "NONE", "overlay&heatmap=map", "%ff", "x" * 5000])
        path = f"/inspect/{self.product}?heatmap={value}"
        return self._inspect("bad query", self.png, "image/png", path=path)

    def bad_headers(self) -> FuzzRequest:
        headers = self.rng.choice(
            [
                {"Authorization": "Bearer " + "x" * 2000},
                {"Authorization": "Basic Zm9vOmJhcg=="},
                {"X-Request-ID": "x" * 500},
                {"X-Request-ID": "<script>alert(1)</script>"},
                {"Accept": "image/png"},
                {"Accept": "*/*;q=abc"},
            ]
        )
        return self._inspect("odd headers", self.png, "image/png", headers=headers)

    def other_endpoints(self) -> FuzzRequest:
        path = self.rng.choice(
            [
                "/",
                "/products",
                "/healthz",
                "/readyz",
                "/metrics",
                "/docs",
                "/openapi.json",
                "/products/x",
                "/metrics?x=" + "y" * 3000,
                "/static/../../etc/passwd",
                "/nowhere",
            ]
        )
        method = self.rng.choice(["GET", "GET", "POST", "DELETE", "OPTIONS", "HEAD"])
        return FuzzRequest("other endpoints", method, path, {}, b"")

    def raw_protocol(self) -> FuzzRequest:
        line = self.rng.choice(
            [
                b"GARBAGE\r\n\r\n",
                b"POST /inspect/PRODUCT HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                b"POST /inspect/PRODUCT HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                b"POST /inspect/PRODUCT HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"zz\r\n\r\n",
                b"POST /inspect/PRODUCT HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                b"Content-Length: 4\r\n\r\nabc",
                b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                b"POST /inspect/PRODUCT HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n",
                b"POST /inspect/PRODUCT HTTP/9.9\r\nHost: x\r\n\r\n",
                b"POST /inspect/PRODUCT HTTP/1.1\r\nHost: x\r\nX-Request-ID: \t\x01\r\n\r\n",
                b"POST /inspect/PRODUCT HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 5\r\n\r\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            ]
        )
        raw = line.replace(b"PRODUCT", self.product.encode())
        return FuzzRequest("raw protocol", "", "", {}, b"", raw=raw)

    def generators(self) -> list[Callable[[], FuzzRequest]]:
        return [
            self.random_bytes,
            self.truncated,
            self.corrupted,
            self.absurd_header,
            self.odd_image,
            self.foreign_format,
            self.wrong_content_type,
            self.bad_multipart,
            self.bad_path,
            self.bad_query,
            self.bad_headers,
            self.other_endpoints,
            self.raw_protocol,
        ]


def malformed_requests(count: int, product: str, seed: int = 0) -> Iterator[FuzzRequest]:
    """`count` requests for a served product, the generators taken in turn."""
    corpus = Corpus(seed, product)
    generators = corpus.generators()
    for i in range(count):
        yield generators[i % len(generators)]()


def leaked(body: bytes) -> str | None:
    """What in an answer's body shows the server's insides, if anything."""
    text = body.decode("utf-8", "replace")
    return next((mark for mark in LEAKS if mark in text), None)


@dataclass(frozen=True)
class FuzzAnswer:
    kind: str
    status: int  # 0: the connection closed without an answer
    leak: str | None


async def _send_raw(host: str, port: int, request: FuzzRequest) -> FuzzAnswer:
    assert request.raw is not None
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request.raw)
        await writer.drain()
        head = await asyncio.wait_for(reader.read(65_536), 30)
    except (OSError, TimeoutError):
        head = b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    status = int(head[9:12]) if head[:5] == b"HTTP/" and head[9:12].isdigit() else 0
    return FuzzAnswer(request.kind, status, leaked(head))


async def send_all(
    base: str,
    requests: list[FuzzRequest],
    clients: int = 16,
    headers: dict[str, str] | None = None,
) -> list[FuzzAnswer]:
    """Send the requests from `clients` concurrent clients; each one's status and leak.
    `headers` go with every request but the raw ones, under the request's own."""
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    todo = iter(requests)
    answers: list[FuzzAnswer] = []

    async def client(http: httpx.AsyncClient) -> None:
        for request in todo:
            if request.raw is not None:
                answers.append(await _send_raw(host, port, request))
                continue
            try:
                response = await http.request(
                    request.method,
                    request.path,
                    headers={**(headers or {}), **request.headers},
                    content=request.body,
                )
            except httpx.HTTPError:
                answers.append(FuzzAnswer(request.kind, 0, None))
                continue
            answers.append(FuzzAnswer(request.kind, response.status_code, leaked(response.content)))

    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return answers
