"""Reading a request body: bounded in size (on the wire and decoded) and in time.

The server runs with aiohttp's own request decompression off (`auto_decompress=False`
in app.py), so a body arrives here exactly as the client encoded it and is decoded here,
where every failure has an answer: an unsupported Content-Encoding is a 415, a body that
does not decode a 400, a body over `max_body_bytes` once decoded (a compression bomb
included) a 413, a body slower than `body_timeout` a 408. What leaves this module is the
plain body; the client's Content-Encoding never travels further.

Every body activator reads goes through here, on every route and before or after auth
alike: a proxied request's (`read_body`), the status page's login form (`read_form`) and
the bodies no handler wants, which are drained before the connection is reused
(`drain_unread`). All of them share `BodyReads`, which holds the time limit and bounds how
many bodies one client address may have arriving at once (429 past it): so a client that
trickles its bodies holds at most that many connections, each for at most body_timeout.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import email.parser
import email.policy
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from email.message import EmailMessage

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from multidict import MultiDict

from activator.core.errors import (
    BadRequest,
    BodyTooLarge,
    RequestTimeout,
    TooManyBodies,
    UnsupportedEncoding,
)

# Content-Encoding tokens that decode with zlib. "deflate" is zlib-wrapped per RFC 9110,
# but many clients send raw deflate: told apart by the first two bytes (`_wbits`).
GZIP = frozenset({"gzip", "x-gzip"})
DEFLATE = "deflate"
IDENTITY = "identity"


class BodyReads:
    """The bodies being read now, counted per client address; the owner of body_timeout.

    One per app, shared by every reader; `configure` applies a reload. Per address rather
    than per server: a server-wide cap would let one slow client lock every other client
    out, where this one only refuses the client that holds too many. A gateway in front
    (LiteLLM) is one address for all of its clients, hence a default well above what its
    bodies, which arrive at once, ever hold at the same instant. The table holds only
    addresses with a body arriving now, so it is bounded by the open connections.
    """

    def __init__(self, *, body_timeout: float, per_client: int) -> None:
        self.body_timeout = body_timeout
        self.per_client = per_client
        self._reading: dict[str, int] = {}

    def configure(self, *, body_timeout: float, per_client: int) -> None:
        self.body_timeout = body_timeout
        self.per_client = per_client

    def reading(self, peer: str | None = None) -> int:
        """Bodies arriving now: from `peer`, or from everyone."""
        if peer is None:
            return sum(self._reading.values())
        return self._reading.get(peer, 0)

    @contextlib.contextmanager
    def slot(self, request: web.Request) -> Iterator[None]:
        """Raises TooManyBodies (429, the connection is closed) past the bound. Sync, so
        the count can never be left raised by a cancellation between check and use."""
        peer = request.remote or "-"
        held = self._reading.get(peer, 0)
        if held >= self.per_client:
            raise TooManyBodies(
                f"{held} request bodies from this client are still arriving "
                f"(server.max_body_reads_per_client); send the body at once, or retry later",
                retry_after=1.0,
            )
        self._reading[peer] = held + 1
        try:
            yield
        finally:
            if (left := self._reading[peer] - 1) > 0:
                self._reading[peer] = left
            else:
                del self._reading[peer]


async def read_body(request: web.Request, *, limit: int, reads: BodyReads) -> bytes:
    """The request's body, decoded. Raises the errors above; safe to cancel."""
    decoder = Decoder(request.headers.getall(hdrs.CONTENT_ENCODING, []), limit=limit)
    await _receive(request, limit=limit, reads=reads, sink=decoder.feed)
    return decoder.finish()


async def drain_unread(request: web.Request, *, limit: int, reads: BodyReads) -> bool:
    """Read and drop what is left of a body its handler did not read (a POST to /admin/*
    with a body, a 401, a 404), under the same bounds as any body, so that the connection
    can carry the next request. False: it could not be drained (too slow, too large, too
    many at once); the answer must then close the connection."""
    if not request.body_exists or request.content.is_eof():
        return True
    try:
        await _receive(request, limit=limit, reads=reads, sink=lambda _: None)
    except (BadRequest, BodyTooLarge, RequestTimeout, TooManyBodies):
        return False
    return True


def unread_bodies_middleware(reads: BodyReads, *, limit: Callable[[], int]) -> Middleware:
    """Drains (`drain_unread`) the body of any request whose handler left it unread, once
    the answer is made and before it is sent; when that fails the answer closes the
    connection. Outermost: it sees every answer, a 401 included. `limit`: the size in
    force (server.max_body_bytes)."""

    @web.middleware
    async def drain(request: web.Request, handler: Handler) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if response.keep_alive is not False and not await drain_unread(
            request, limit=limit(), reads=reads
        ):
            response.force_close()
        return response

    return drain


async def read_form(request: web.Request, *, limit: int, reads: BodyReads) -> MultiDict[str]:
    """A form body (urlencoded or multipart/form-data; text fields only), read under the
    bounds above. Anything that does not parse as one is a BadRequest (400), never a 500:
    bytes that are not in the declared charset, an unknown charset, a multipart body with
    no boundary or a part with no name."""
    body = await read_body(request, limit=limit, reads=reads)
    mimetype = request.content_type  # "application/octet-stream" when none is sent
    if mimetype == "multipart/form-data":
        return _multipart_form(request.headers.get(hdrs.CONTENT_TYPE, ""), body)
    if mimetype in {"application/x-www-form-urlencoded", "application/octet-stream"}:
        charset = _codec(request.charset or "utf-8")
        try:
            pairs = urllib.parse.parse_qsl(
                body.decode(charset), keep_blank_values=True, encoding=charset, errors="strict"
            )
        except (UnicodeDecodeError, ValueError, LookupError):  # LookupError: 'rot13' & co.
            raise BadRequest(f"the form is not valid {charset}") from None
        return MultiDict(pairs)
    raise BadRequest(
        f"a form is sent as application/x-www-form-urlencoded or multipart/form-data, "
        f"not {mimetype}"
    )


def _codec(charset: str) -> str:
    try:
        return codecs.lookup(charset).name
    except LookupError:
        raise BadRequest(f"unknown charset {charset!r}") from None


def _multipart_form(content_type: str, body: bytes) -> MultiDict[str]:
    # The stdlib's MIME parser, on the body already read and bounded: aiohttp's reader
    # would read from the connection again, outside these bounds.
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert isinstance(message, EmailMessage)
    if not message.get_param("boundary"):
        raise BadRequest("a multipart/form-data body needs a boundary in its Content-Type")
    if message.defects or not message.is_multipart():
        raise BadRequest("the multipart/form-data body is malformed")
    form: MultiDict[str] = MultiDict()
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise BadRequest("a part of the multipart/form-data body has no name")
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        charset = _codec(part.get_content_charset() or "utf-8")
        try:
            form.add(name, data.decode(charset))
        except (UnicodeDecodeError, LookupError):
            raise BadRequest(f"the form field {name!r} is not valid {charset}") from None
    return form


async def _receive(
    request: web.Request, *, limit: int, reads: BodyReads, sink: Callable[[bytes], None]
) -> None:
    """Every chunk of the body to `sink`, within body_timeout and `limit` bytes, holding one
    of the client's slots meanwhile."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body over {limit} bytes")
    timeout = reads.body_timeout
    received = 0
    # A body that has all arrived (a small one comes with its headers) needs no timer.
    bound = contextlib.nullcontext() if request.content.is_eof() else asyncio.timeout(timeout)
    with reads.slot(request):
        try:
            async with bound:
                while chunk := await request.content.readany():
                    received += len(chunk)
                    if received > limit:
                        raise BodyTooLarge(f"request body over {limit} bytes")
                    sink(chunk)
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {timeout:g}s (server.body_timeout)"
            ) from None
        except web.RequestPayloadError as exc:  # broken chunked framing, a short body
            raise BadRequest(f"the request body is malformed: {exc}") from None


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
