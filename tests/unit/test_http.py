"""node/http.py: the pure parser and router without sockets, then a real HttpServer on a
loopback port driven by raw sockets and urllib."""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from node.http import (
    MAX_BODY_BYTES,
    HttpError,
    HttpServer,
    Request,
    Response,
    Router,
    decode_segments,
    json_response,
    parse_chunk_size,
    parse_head,
    split_target,
)
from node.logs import EventLogger


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- pure half ----------------------------------------------------------------------------


def test_parse_head_basics() -> None:
    head = parse_head(b"GET /api/x?a=1 HTTP/1.1\r\nHost: h\r\nX-Thing: 1\r\nx-thing: 2")
    assert head.method == "GET"
    assert head.target == "/api/x?a=1"
    assert head.headers == {"host": "h", "x-thing": "1, 2"}
    assert head.keep_alive
    assert head.content_length == 0
    assert not parse_head(b"GET / HTTP/1.0").keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close").keep_alive


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE", 400),
        (b"GET /", 400),
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTX/1.1", 400),
        (b"G(T / HTTP/1.1", 400),
        (b"GET / HTTP/1.1\r\nNo-Colon", 400),
        (b"GET / HTTP/1.1\r\nBad Name: x", 400),
        (b"GET / HTTP/1.1\r\nA: b\r\n folded", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: %d" % (MAX_BODY_BYTES + 1), 413),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip", 501),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3", 400),
        (b"GET / HTTP/1.1\r\nExpect: teapot", 417),
    ],
)
def test_parse_head_rejects(data: bytes, status: int) -> None:
    with pytest.raises(HttpError) as info:
        parse_head(data)
    assert info.value.status == status


def test_targets_and_segments() -> None:
    assert split_target("/api/queues/%2F/q?x=1&y=") == ("/api/queues/%2F/q", {"x": "1", "y": ""})
    assert split_target("http://h:1/a/b?c=d") == ("/a/b", {"c": "d"})
    assert decode_segments("/api/queues/%2F/a%20b/") == ("api", "queues", "/", "a b")
    with pytest.raises(HttpError):
        split_target("*")
    with pytest.raises(HttpError):
        decode_segments("/%ff")
    assert parse_chunk_size(b"1f;ext=1") == 31
    with pytest.raises(HttpError):
        parse_chunk_size(b"zz")


async def _noop(request: Request, params: dict[str, str]) -> Response:
    return json_response(200, params)


def test_router_precedence_and_validation() -> None:
    router = Router()
    router.add("GET", "/api/queues/{vhost}/{name}", _noop)
    router.add("GET", "/api/queues/{vhost}/special", _noop)
    router.add("DELETE", "/api/queues/{vhost}/{name}", _noop)
    resolved = router.resolve("GET", ("api", "queues", "/", "special"))
    assert resolved.route is not None
    assert resolved.route.pattern == "/api/queues/{vhost}/special"
    assert router.resolve("HEAD", ("api", "queues", "/", "q")).params == {"vhost": "/", "name": "q"}
    miss = router.resolve("PUT", ("api", "queues", "/", "q"))
    assert miss.route is None
    assert miss.allowed == {"GET", "HEAD", "DELETE"}
    assert router.resolve("GET", ("nope",)).allowed == frozenset()
    with pytest.raises(ValueError, match="already routed"):
        router.add("GET", "/api/queues/{a}/{b}", _noop)
    with pytest.raises(ValueError, match="whole segment"):
        router.add("GET", "/api/x{y}", _noop)
    with pytest.raises(ValueError, match="repeats"):
        router.add("GET", "/api/{y}/{y}", _noop)


# --- over a socket ------------------------------------------------------------------------


async def _echo(request: Request, params: dict[str, str]) -> Response:
    return json_response(
        200,
        {
            "method": request.method,
            "path": request.path,
            "params": params,
            "query": request.query,
            "user": request.user,
            "body": request.body.decode(),
        },
    )


async def _boom(request: Request, params: dict[str, str]) -> Response:
    raise RuntimeError("handler bug")


def _router() -> Router:
    router = Router()
    router.add("GET", "/api/queues/{vhost}/{name}", _echo)
    router.add("PUT", "/api/queues/{vhost}/{name}", _echo)
    router.add("GET", "/api/overview", _echo)
    router.add("POST", "/api/echo", _echo)
    router.add("GET", "/metrics", _echo, auth=False)
    router.add("GET", "/boom", _boom)
    return router


def _check_user(user: str, password: str) -> bool:
    return (user, password) == ("guest", "guest")


@asynccontextmanager
async def running_server(log: EventLogger | None = None) -> AsyncIterator[HttpServer]:
    log = log or EventLogger(logging.getLogger("test.http"))
    server = HttpServer(_router(), host="127.0.0.1", port=0, log=log, check_user=_check_user)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        assert server.port != 0
        yield server
        tg.cancel_scope.cancel()


AUTH = "Authorization: Basic " + base64.b64encode(b"guest:guest").decode()


def _get(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: t", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _read_response(reader: BufferedByteReceiveStream) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.receive_until(b"\r\n\r\n", 65536)).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    body = await reader.receive_exactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        return await _read_response(BufferedByteReceiveStream(stream))


async def _at_eof(stream: SocketStream) -> bool:
    with anyio.fail_after(5):
        try:
            await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return True
    return False


@pytest.mark.anyio
async def test_routing_with_path_params_and_percent_2f() -> None:
    async with running_server() as server:
        status, headers, body = await _exchange(
            server.port, _get("/api/queues/%2F/my%20q?x=1", AUTH)
        )
        assert status == 200
        assert headers["content-type"] == "application/json"
        value = json.loads(body)
        assert value["params"] == {"vhost": "/", "name": "my q"}
        assert value["path"] == "/api/queues/%2F/my%20q"
        assert value["query"] == {"x": "1"}
        assert value["user"] == "guest"


@pytest.mark.anyio
async def test_auth_401_and_200_with_urllib() -> None:
    async with running_server() as server:
        url = f"http://127.0.0.1:{server.port}/api/overview"

        def fetch(auth: str | None) -> tuple[int, dict[str, str], bytes]:
            request = urllib.request.Request(url)
            if auth is not None:
                request.add_header(
                    "Authorization", "Basic " + base64.b64encode(auth.encode()).decode()
                )
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    return answer.status, dict(answer.headers), answer.read()
            except urllib.error.HTTPError as exc:
                with exc:
                    return exc.code, dict(exc.headers), exc.read()

        status, headers, body = await anyio.to_thread.run_sync(fetch, None)
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Basic realm="Warren"'
        assert json.loads(body)["error"] == "not_authorized"
        status, _, body = await anyio.to_thread.run_sync(fetch, "guest:wrong")
        assert status == 401
        assert json.loads(body) == {"error": "not_authorized", "reason": "Login failed"}
        status, _, body = await anyio.to_thread.run_sync(fetch, "guest:guest")
        assert status == 200
        assert json.loads(body)["user"] == "guest"
        # an auth=False route needs no credentials
        status, _, body = await _exchange(server.port, _get("/metrics"))
        assert status == 200
        assert json.loads(body)["user"] is None


@pytest.mark.anyio
async def test_404_405_and_head() -> None:
    async with running_server() as server:
        status, _, body = await _exchange(server.port, _get("/api/nothing", AUTH))
        assert status == 404
        assert json.loads(body) == {"error": "Object Not Found", "reason": "Not Found"}
        status, headers, _ = await _exchange(
            server.port, _get("/api/queues/%2F/q", AUTH, method="DELETE")
        )
        assert status == 405
        assert headers["allow"] == "GET, HEAD, PUT"
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            await stream.send(_get("/api/overview", AUTH, method="HEAD"))
            reader = BufferedByteReceiveStream(stream)
            head = await reader.receive_until(b"\r\n\r\n", 65536)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"Content-Length: " in head
            await stream.send(_get("/api/overview", AUTH))  # no HEAD body before this answer
            status, _, body = await _read_response(reader)
            assert status == 200
            assert json.loads(body)["method"] == "GET"


@pytest.mark.anyio
async def test_malformed_request_is_400_and_closed() -> None:
    async with running_server() as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            await stream.send(b"GARBAGE\r\n\r\n")
            reader = BufferedByteReceiveStream(stream)
            status, headers, body = await _read_response(reader)
            assert status == 400
            assert headers["connection"] == "close"
            assert json.loads(body)["error"] == "bad_request"
            assert await _at_eof(stream)
        # oversized head and body
        status, _, _ = await _exchange(server.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000)
        assert status == 431
        too_big = _get("/api/echo", AUTH, f"Content-Length: {MAX_BODY_BYTES + 1}", method="POST")
        status, _, _ = await _exchange(server.port, too_big)
        assert status == 413
        # the listener is still fine
        status, _, _ = await _exchange(server.port, _get("/api/overview", AUTH))
        assert status == 200


@pytest.mark.anyio
async def test_handler_exception_is_500_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="test.http")
    async with (
        running_server() as server,
        await anyio.connect_tcp("127.0.0.1", server.port) as stream,
    ):
        reader = BufferedByteReceiveStream(stream)
        await stream.send(_get("/boom", AUTH))
        status, _, body = await _read_response(reader)
        assert status == 500
        assert json.loads(body)["error"] == "internal_server_error"
        await stream.send(_get("/api/overview", AUTH))  # the connection survives
        status, _, _ = await _read_response(reader)
        assert status == 200
    failures = [r for r in caplog.records if r.getMessage() == "http.handler_failed"]
    assert len(failures) == 1
    assert failures[0].exc_info is not None


@pytest.mark.anyio
async def test_keep_alive_bodies_chunked_and_continue() -> None:
    async with running_server() as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            await stream.send(_get("/api/echo", AUTH, "Content-Length: 2", method="POST") + b"hi")
            status, headers, body = await _read_response(reader)
            assert status == 200
            assert "connection" not in headers
            assert json.loads(body)["body"] == "hi"
            chunked = _get("/api/echo", AUTH, "Transfer-Encoding: chunked", method="POST")
            await stream.send(chunked + b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            status, _, body = await _read_response(reader)
            assert json.loads(body)["body"] == "abcde"
            expect = _get(
                "/api/echo", AUTH, "Content-Length: 2", "Expect: 100-continue", method="POST"
            )
            await stream.send(expect)
            assert await reader.receive_until(b"\r\n\r\n", 1024) == b"HTTP/1.1 100 Continue"
            await stream.send(b"ok")
            status, _, body = await _read_response(reader)
            assert json.loads(body)["body"] == "ok"
            await stream.send(_get("/api/overview", AUTH, "Connection: close"))
            status, headers, _ = await _read_response(reader)
            assert status == 200
            assert headers["connection"] == "close"
            assert await _at_eof(stream)


@pytest.mark.anyio
async def test_idle_connection_is_closed() -> None:
    log = EventLogger(logging.getLogger("test.http"))
    server = HttpServer(_router(), host="127.0.0.1", port=0, log=log, idle_timeout=0.2)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            assert await _at_eof(stream)
        tg.cancel_scope.cancel()
