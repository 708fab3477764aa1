"""A tiny HTTP/1.1 JSON server on anyio, for the management API and /metrics.

Rules: the parsing half (`parse_head`, `parse_chunk_size`, `split_target`, `encode_response`,
`Router.resolve`) is pure: bytes and strings in, values or `HttpError` out, no I/O. The I/O
half (`HttpServer`) reads one request at a time per connection, calls one handler, writes
one response (keep-alive; no pipelining concurrency). Every limit is a named constant.
A client's mistake is a 4xx response and, when the stream can no longer be trusted, a
closed connection, logged at info without a traceback; a handler's exception is a 500,
logged once with `log.exception`; one connection's failure never reaches the listener.
The server owns framing: handlers cannot set Content-Length, Transfer-Encoding or
Connection. This module imports nothing from the broker, the protocol or the cluster.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from node.logs import EventLogger

# A request head (request line and headers) larger than this is refused with 431: the
# management API's heads are a few hundred bytes; this bounds memory per connection.
MAX_HEAD_BYTES = 64 * 1024
# A request body larger than this is refused with 413 (definitions imports are the
# biggest bodies the management API takes).
MAX_BODY_BYTES = 8 * 1024 * 1024
# One chunk-size line of a chunked body ("1f4;ext=1"): anything longer is malformed.
MAX_CHUNK_LINE_BYTES = 1024
# A keep-alive connection with no new request for this long is closed.
IDLE_TIMEOUT_S = 60.0
# Reading one request's body, or writing one response, may take at most this long.
IO_TIMEOUT_S = 30.0
# After an error response that closes the connection, unread input is drained for at most
# this long / this many bytes so that the close does not reset the response away.
LINGER_S = 1.0
LINGER_BYTES = 256 * 1024
# Bodies up to this size are sent in the same write as the head.
COALESCE_BYTES = 64 * 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_BAD_VALUE_CHARS = ("\r", "\n", "\x00")
# Headers whose values the server computes itself.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


class HttpError(Exception):
    """The client's request is unacceptable (the remote's fault): answer `status`. Raised
    while reading a request, it also closes the connection: the stream may be out of step."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a handler sees it. `path` is still percent-encoded (the path
    parameters handed to the handler are decoded); `headers` have lower-case names, repeated
    headers joined with ", "; `user` is the authenticated user name, or None."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    user: str | None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]


def json_response(status: int, value: object) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode())


def error_response(status: int, error: str, reason: str) -> Response:
    """RabbitMQ's management API error shape."""
    return json_response(status, {"error": error, "reason": reason})


# --- the pure half ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    version: tuple[int, int]
    headers: dict[str, str]
    content_length: int
    chunked: bool
    keep_alive: bool
    expect_continue: bool


def parse_head(data: bytes) -> RequestHead:
    """Parse a request line and its headers (without the blank line that ends them)."""
    text = data.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version_text = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "malformed method")
    version_match = _VERSION.fullmatch(version_text)
    if version_match is None:
        raise HttpError(400, "malformed HTTP version")
    version = (int(version_match[1]), int(version_match[2]))
    if version[0] != 1:
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if not target or any(c in target for c in " \t\x00") or any(ord(c) > 126 for c in target):
        raise HttpError(400, "malformed request target")

    headers: dict[str, str] = {}
    lengths: list[str] = []
    for line in lines[1:]:
        if not line or line[0] in " \t":
            raise HttpError(400, "malformed header line")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header name")
        value = value.strip(" \t")
        if any(c in value for c in _BAD_VALUE_CHARS):
            raise HttpError(400, "malformed header value")
        key = name.lower()
        if key == "content-length":
            lengths.append(value)
        headers[key] = f"{headers[key]}, {value}" if key in headers else value

    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "keep-alive" in connection if version == (1, 0) else "close" not in connection

    chunked = False
    if "transfer-encoding" in headers:
        if version == (1, 0):
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if headers["transfer-encoding"].strip().lower() != "chunked":
            raise HttpError(501, "only the chunked transfer coding is supported")
        chunked = True

    content_length = 0
    if lengths:
        values = {v.strip() for part in lengths for v in part.split(",")}
        if len(values) != 1:
            raise HttpError(400, "conflicting Content-Length values")
        (length_text,) = values
        if not length_text.isdigit() or not length_text.isascii() or len(length_text) > 18:
            raise HttpError(400, "malformed Content-Length")
        content_length = int(length_text)
        if content_length > MAX_BODY_BYTES:
            raise HttpError(413, f"request body larger than {MAX_BODY_BYTES} bytes")

    expect = headers.get("expect", "").lower()
    if expect and expect != "100-continue":
        raise HttpError(417, "only Expect: 100-continue is supported")
    return RequestHead(
        method=method,
        target=target,
        version=version,
        headers=headers,
        content_length=content_length,
        chunked=chunked,
        keep_alive=keep_alive,
        expect_continue=expect == "100-continue" and version == (1, 1),
    )


def parse_chunk_size(line: bytes) -> int:
    """The size in a chunked body's size line (extensions after ";" are ignored)."""
    size = line.split(b";", 1)[0].strip(b" \t")
    if not _HEX.fullmatch(size):
        raise HttpError(400, "malformed chunk size")
    return int(size, 16)


def split_target(target: str) -> tuple[str, dict[str, str]]:
    """(percent-encoded path, decoded query) of an origin-form or absolute-form target."""
    if target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        path, query = parts.path or "/", parts.query
    elif target.startswith("/"):
        path, _, query = target.partition("?")
        path = path.partition("#")[0]
        query = query.partition("#")[0]
    else:
        raise HttpError(400, "malformed request target")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise HttpError(400, "malformed query string") from None
    return path, dict(pairs)


def decode_segments(path: str) -> tuple[str, ...]:
    """Split a percent-encoded path into decoded segments; one trailing slash is ignored
    ("/api/queues/%2F/" is "/api/queues/%2F" is ("api", "queues", "/"))."""
    if path != "/" and path.endswith("/"):
        path = path[:-1]
    try:
        return tuple(unquote(s, errors="strict") for s in path.split("/")[1:])
    except UnicodeDecodeError:
        raise HttpError(400, "malformed percent-encoding in the path") from None


def encode_response(response: Response, *, close: bool) -> bytes:
    """The status line and headers (with the blank line) for `response`; for HEAD the
    caller sends these alone (Content-Length still that of the body)."""
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [
        f"HTTP/1.1 {response.status} {phrase}",
        "Server: Warren",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
    ]
    for name, value in response.headers:
        if not _TOKEN.fullmatch(name) or any(c in value for c in _BAD_VALUE_CHARS):
            raise ValueError(f"invalid response header {name!r}")
        if name.lower() not in _FRAMING_HEADERS:
            lines.append(f"{name}: {value}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    segments: tuple[str, ...]  # literal segments, or "{name}" for a parameter
    handler: Handler
    auth: bool

    def match(self, path: tuple[str, ...]) -> dict[str, str] | None:
        if len(path) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.segments, path, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params

    @property
    def shape(self) -> tuple[str, ...]:
        """The pattern with its parameter names erased: two routes of one shape collide."""
        return tuple("{}" if s.startswith("{") else s for s in self.segments)

    @property
    def specificity(self) -> tuple[bool, ...]:
        """Literal segments beat parameters, position by position."""
        return tuple(not s.startswith("{") for s in self.segments)


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a path and method resolve to: a route and its parameters, or (route None)
    the methods the path allows (empty: no such path)."""

    route: Route | None
    params: dict[str, str]
    allowed: frozenset[str]


class Router:
    """Routes by method and path pattern ("/api/queues/{vhost}/{name}"). A parameter is one
    whole, non-empty, percent-decoded segment. HEAD falls back to GET."""

    __slots__ = ("_routes",)

    def __init__(self) -> None:
        self._routes: list[Route] = []

    def add(self, method: str, pattern: str, handler: Handler, *, auth: bool = True) -> None:
        method = method.upper()
        if not _TOKEN.fullmatch(method):
            raise ValueError(f"invalid method {method!r}")
        if not pattern.startswith("/"):
            raise ValueError(f"pattern {pattern!r} must start with '/'")
        segments = tuple(pattern.split("/")[1:]) if pattern != "/" else ("",)
        names: list[str] = []
        for segment in segments:
            if "{" in segment or "}" in segment:
                param = _PARAM.fullmatch(segment)
                if param is None:
                    raise ValueError(f"pattern {pattern!r}: a parameter must be a whole segment")
                names.append(param[1])
        if len(names) != len(set(names)):
            raise ValueError(f"pattern {pattern!r} repeats a parameter name")
        shape = tuple("{}" if s.startswith("{") else s for s in segments)
        for route in self._routes:
            if route.method == method and route.shape == shape:
                raise ValueError(f"{method} {pattern} is already routed (as {route.pattern})")
        self._routes.append(Route(method, pattern, segments, handler, auth))

    def resolve(self, method: str, segments: tuple[str, ...]) -> Resolved:
        candidates = [(r, p) for r in self._routes if (p := r.match(segments)) is not None]
        allowed = frozenset(r.method for r, _ in candidates)
        for wanted in (method, "GET") if method == "HEAD" else (method,):
            fitting = [(r, p) for r, p in candidates if r.method == wanted]
            if fitting:
                route, params = max(fitting, key=lambda rp: rp[0].specificity)
                return Resolved(route, params, allowed)
        if "GET" in allowed:
            allowed |= {"HEAD"}
        return Resolved(None, {}, allowed)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an Authorization header, or None if absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


_UNAUTHORIZED_HEADERS = (("WWW-Authenticate", 'Basic realm="Warren"'),)


def _unauthorized(reason: str) -> Response:
    response = error_response(401, "not_authorized", reason)
    return Response(response.status, response.body, headers=_UNAUTHORIZED_HEADERS)


_ERROR_NAMES = {
    400: "bad_request",
    413: "payload_too_large",
    417: "expectation_failed",
    431: "request_header_fields_too_large",
    501: "not_implemented",
    505: "http_version_not_supported",
}


# --- the I/O half -------------------------------------------------------------------------


class _Hangup(Exception):
    """The client went away or stalled: close without answering."""


class HttpServer:
    """Serves `router` on host:port. With `check_user`, routes added with auth=True need HTTP
    Basic credentials it accepts; without it, every route is open."""

    def __init__(
        self,
        router: Router,
        *,
        host: str,
        port: int,
        log: EventLogger,
        check_user: Callable[[str, str], bool] | None = None,
        idle_timeout: float = IDLE_TIMEOUT_S,
    ) -> None:
        self._router = router
        self._host = host
        self._port = port
        self._log = log
        self._check_user = check_user
        self._idle_timeout = idle_timeout

    @property
    def port(self) -> int:
        """The port listened on (the real one once listening, when asked for port 0)."""
        return self._port

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report started, and serve until cancelled."""
        listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        async with listener:
            self._port = int(listener.listeners[0].extra(SocketAttribute.local_port))
            self._log.info("http.listening", host=self._host, port=self._port)
            task_status.started()
            await listener.serve(self._handle_connection)

    async def _handle_connection(self, stream: SocketStream) -> None:
        try:
            peer = _peer(stream)
        except Exception:  # the socket is already gone
            peer = "?"
        log = self._log.bind(peer=peer)
        async with stream:
            try:
                await self._serve_connection(stream, log)
            except (_Hangup, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the client went away: nothing to answer, nothing to log
            except Exception:
                log.exception("http.connection_failed")

    async def _serve_connection(self, stream: SocketStream, log: EventLogger) -> None:
        reader = BufferedByteReceiveStream(stream)
        while True:
            try:
                head = await self._read_head(reader)
                if head is None:
                    return
                body = await self._read_body(stream, reader, head)
            except HttpError as exc:
                log.info("http.bad_request", status=exc.status, reason=exc.reason)
                error = error_response(
                    exc.status, _ERROR_NAMES.get(exc.status, "error"), exc.reason
                )
                await self._send(stream, error, close=True, head_only=False)
                await _linger(stream, reader)
                return
            response = await self._respond(head, body, log)
            close = not head.keep_alive
            await self._send(stream, response, close=close, head_only=head.method == "HEAD")
            if close:
                return

    async def _read_head(self, reader: BufferedByteReceiveStream) -> RequestHead | None:
        """The next request's head, or None when the client closed or idled out between
        requests."""
        data = b""
        with anyio.move_on_after(self._idle_timeout):
            while not data:
                try:
                    data = await reader.receive_until(b"\r\n\r\n", MAX_HEAD_BYTES)
                except anyio.IncompleteRead:
                    return None
                except anyio.DelimiterNotFound:
                    raise HttpError(
                        431, f"request head larger than {MAX_HEAD_BYTES} bytes"
                    ) from None
                data = data.lstrip(b"\r\n")  # stray blank lines between requests
            return parse_head(data)
        return None

    async def _read_body(
        self, stream: SocketStream, reader: BufferedByteReceiveStream, head: RequestHead
    ) -> bytes:
        if head.expect_continue and (head.chunked or head.content_length):
            with anyio.fail_after(IO_TIMEOUT_S):
                await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            with anyio.fail_after(IO_TIMEOUT_S):
                if not head.chunked:
                    return await reader.receive_exactly(head.content_length)
                return await _read_chunked(reader)
        except (TimeoutError, anyio.IncompleteRead):
            raise _Hangup from None

    async def _respond(self, head: RequestHead, body: bytes, log: EventLogger) -> Response:
        try:
            path, query = split_target(head.target)
            segments = decode_segments(path)
        except HttpError as exc:
            return error_response(exc.status, "bad_request", exc.reason)
        resolved = self._router.resolve(head.method, segments)
        route = resolved.route
        if route is None:
            if resolved.allowed:
                allow = ", ".join(sorted(resolved.allowed))
                response = error_response(405, "Method Not Allowed", "Method Not Allowed")
                return Response(405, response.body, headers=(("Allow", allow),))
            return error_response(404, "Object Not Found", "Not Found")
        try:
            user = self._authenticate(head.headers.get("authorization"))
            if route.auth and self._check_user is not None and user is None:
                if "authorization" in head.headers:
                    return _unauthorized("Login failed")
                return _unauthorized("Not_Authorized")
            request = Request(head.method, path, query, head.headers, body, user)
            response = await route.handler(request, resolved.params)
            if not isinstance(response, Response):
                raise TypeError(f"handler returned {type(response).__name__}, not Response")
            encode_response(response, close=False)  # a bad header is the handler's bug
        except Exception:
            log.exception("http.handler_failed", method=head.method, path=path)
            return error_response(500, "internal_server_error", "Internal Server Error")
        log.debug("http.request", method=head.method, path=path, status=response.status)
        return response

    def _authenticate(self, header: str | None) -> str | None:
        credentials = basic_credentials(header)
        if credentials is None or self._check_user is None:
            return None
        user, password = credentials
        return user if self._check_user(user, password) else None

    @staticmethod
    async def _send(
        stream: SocketStream, response: Response, *, close: bool, head_only: bool
    ) -> None:
        head = encode_response(response, close=close)
        body = b"" if head_only else response.body
        try:
            with anyio.fail_after(IO_TIMEOUT_S):
                if len(body) <= COALESCE_BYTES:
                    await stream.send(head + body)
                else:
                    await stream.send(head)
                    await stream.send(body)
        except TimeoutError:
            raise _Hangup from None


async def _read_chunked(reader: BufferedByteReceiveStream) -> bytes:
    parts: list[bytes] = []
    total = 0
    try:
        while True:
            size = parse_chunk_size(await reader.receive_until(b"\r\n", MAX_CHUNK_LINE_BYTES))
            if size == 0:
                break
            total += size
            if total > MAX_BODY_BYTES:
                raise HttpError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            parts.append(await reader.receive_exactly(size))
            if await reader.receive_exactly(2) != b"\r\n":
                raise HttpError(400, "malformed chunk")
        trailer_bytes = 0
        while line := await reader.receive_until(b"\r\n", MAX_HEAD_BYTES):
            trailer_bytes += len(line) + 2
            if trailer_bytes > MAX_HEAD_BYTES:
                raise HttpError(431, "trailers too large")
    except anyio.DelimiterNotFound:
        raise HttpError(400, "malformed chunked body") from None
    return b"".join(parts)


async def _linger(stream: SocketStream, reader: BufferedByteReceiveStream) -> None:
    """Half-close, then drain what the client still sends, so that closing with unread
    input does not reset the connection before the client has read our error response."""
    try:
        await stream.send_eof()
        drained = 0
        with anyio.move_on_after(LINGER_S):
            while drained < LINGER_BYTES:
                drained += len(await reader.receive())
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


def _peer(stream: SocketStream) -> str:
    address = stream.extra(SocketAttribute.remote_address)
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)
