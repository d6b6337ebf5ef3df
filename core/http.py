"""A small HTTP/1.1 server over trio streams, with h11 doing the parsing.

Used by the admin listener (health, metrics, the approvals API). Requests are read whole, up to a
limit, handed to a handler, and answered; connections are kept alive between requests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

log = logging.getLogger("bastion.http")

# admin requests are small JSON documents; anything bigger is a mistake or an attack
MAX_REQUEST_BODY = 1024 * 1024
# a client that opens a connection and sends nothing must not hold a task for ever
REQUEST_TIMEOUT = 30.0
READ_SIZE = 16384


@attrs.frozen
class HTTPRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client: str

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else {}


@attrs.frozen
class HTTPResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, value: Any) -> HTTPResponse:
        return cls(status, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    @classmethod
    def error(cls, status: int, message: str) -> HTTPResponse:
        return cls.json(status, {"error": message})


Handler = Callable[[HTTPRequest], Awaitable[HTTPResponse]]


async def serve_http(stream: trio.abc.Stream, handler: Handler, client: str) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    while True:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await _read_request(stream, conn, client)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except _BadRequest as exc:
            await _send(stream, conn, HTTPResponse.error(exc.status, exc.message))
            return
        if request is None:
            return
        try:
            response = await handler(request)
        except Exception:
            log.exception("admin handler failed for %s %s", request.method, request.path)
            response = HTTPResponse.error(500, "internal error")
        if not await _send(stream, conn, response):
            return
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection, client: str) -> HTTPRequest | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _BadRequest(exc.error_status_hint, "malformed request") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(READ_SIZE)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BODY:
                raise _BadRequest(413, "request body too large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = urlsplit(head.target.decode("latin-1"))
            return HTTPRequest(
                method=head.method.decode("ascii"),
                path=target.path,
                query=parse_qs(target.query),
                headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers},
                body=bytes(body),
                client=client,
            )


async def _send(stream: trio.abc.Stream, conn: h11.Connection, response: HTTPResponse) -> bool:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("cache-control", "no-store"),
        *response.headers,
    ]
    try:
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        data += conn.send(h11.Data(data=response.body)) + conn.send(h11.EndOfMessage())
        await stream.send_all(data)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True
