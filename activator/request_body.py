"""Reading a request body: bounded in size (on the wire and decoded) and in time.

The server runs with aiohttp's own request decompression off (`auto_decompress=False`
in app.py), so a body arrives here exactly as the client encoded it and is decoded here,
where every failure has an answer: an unsupported Content-Encoding is a 415, a body that
does not decode a 400, a body over `max_body_bytes` once decoded (a compression bomb
included) a 413, a body slower than `body_timeout` a 408. What leaves this module is the
plain body; the client's Content-Encoding never travels further.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib

from aiohttp import hdrs, web

from activator.errors import BadRequest, BodyTooLarge, RequestTimeout, UnsupportedEncoding

# Content-Encoding tokens that decode with zlib. "deflate" is zlib-wrapped per RFC 9110,
# but many clients send raw deflate: told apart by the first two bytes (`_wbits`).
GZIP = frozenset({"gzip", "x-gzip"})
DEFLATE = "deflate"
IDENTITY = "identity"


async def read_body(request: web.Request, *, limit: int, body_timeout: float) -> bytes:
    """The request's body, decoded. Raises the errors above; safe to cancel."""
    decoder = Decoder(request.headers.getall(hdrs.CONTENT_ENCODING, []), limit=limit)
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body over {limit} bytes")
    received = 0
    # A body that has all arrived (a small one comes with its headers) needs no timer.
    bound = contextlib.nullcontext() if request.content.is_eof() else asyncio.timeout(body_timeout)
    try:
        async with bound:
            while chunk := await request.content.readany():
                received += len(chunk)
                if received > limit:
                    raise BodyTooLarge(f"request body over {limit} bytes")
                decoder.feed(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {body_timeout:g}s (server.body_timeout)"
        ) from None
    except web.RequestPayloadError as exc:  # broken chunked framing, a short body
        raise BadRequest(f"the request body is malformed: {exc}") from None
    return decoder.finish()


class Decoder:
    """Decodes one body fed in chunks. zlib is never asked for more than one byte past
    `limit`, so a compression bomb costs no more memory or time than a plain body."""

    def __init__(self, encodings: list[str], *, limit: int) -> None:
        tokens = [t.strip().lower() for value in encodings for t in value.split(",")]
        codings = [t for t in tokens if t and t != IDENTITY]
        if len(codings) > 1 or (codings and codings[0] not in {*GZIP, DEFLATE}):
            raise UnsupportedEncoding(
                f"Content-Encoding {', '.join(codings)!r} is not supported: send the body "
                "plain, or as gzip or deflate"
            )
        self._coding = codings[0] if codings else None
        self._limit = limit
        self._size = 0
        self._parts: list[bytes] = []
        self._head = b""  # deflate: the first bytes, until the header can be told
        self._zlib: zlib._Decompress | None = None

    def feed(self, chunk: bytes) -> None:
        if self._coding is None:
            self._keep(chunk)
        elif self._zlib is not None:
            self._inflate(chunk)
        else:
            self._head += chunk
            if self._coding in GZIP or len(self._head) >= 2:
                self._start()

    def finish(self) -> bytes:
        if self._coding is not None:
            if self._zlib is None and self._head:  # a one-byte deflate body
                self._start()
            if self._zlib is not None and not self._zlib.eof:
                raise BadRequest(f"the request body is a truncated {self._coding} stream")
        return b"".join(self._parts)

    def _start(self) -> None:
        head, self._head = self._head, b""
        self._zlib = zlib.decompressobj(self._wbits(head))
        self._inflate(head)

    def _inflate(self, chunk: bytes) -> None:
        assert self._zlib is not None
        while chunk:
            if self._zlib.eof:
                # Only gzip may continue after its end: another member (RFC 1952).
                if self._coding not in GZIP:
                    raise BadRequest("the request body has data after its deflate stream")
                self._zlib = zlib.decompressobj(self._wbits(chunk))
            try:
                # At most one byte over what is left: enough to tell that it is over.
                plain = self._zlib.decompress(chunk, self._limit - self._size + 1)
            except zlib.error:
                raise BadRequest(f"the request body does not decode as {self._coding}") from None
            self._keep(plain)
            chunk = self._zlib.unused_data

    def _keep(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            what = "decoded request body" if self._coding else "request body"
            raise BodyTooLarge(f"{what} over {self._limit} bytes")
        if data:
            self._parts.append(data)

    def _wbits(self, start: bytes) -> int:
        if self._coding in GZIP:
            return 16 + zlib.MAX_WBITS
        return zlib.MAX_WBITS if _is_zlib_header(start) else -zlib.MAX_WBITS


def _is_zlib_header(start: bytes) -> bool:
    """RFC 1950: compression method 8, and the first two bytes a multiple of 31."""
    return len(start) >= 2 and start[0] & 0x0F == 8 and (start[0] << 8 | start[1]) % 31 == 0
