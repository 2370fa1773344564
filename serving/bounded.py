"""What one client may make the server hold, bounded before anything else is done for it (the token
check included): the request head's size, its number of fields, the time a request may take
(serving.limits.Limits), and the body's size.

    head bytes    `BoundedH11`: uvicorn's h11 protocol (httptools, uvicorn's default, bounds no head)
                  refuses a head beyond `max_header_bytes` with 431 while it arrives, so a 64 MiB
                  header costs what the limit does, not 64 MiB
    head time     `BoundedH11`: a head that has not arrived `request_timeout_s` after the connection
                  opened (or the last answer) gets 408 and the connection closes (slow clients)
    head fields   `HeaderCount`: more than `max_headers` fields get 431
    request time  `RequestTimeout`: body and answer within `request_timeout_s` more; else 408 (the body
                  did not arrive) or 503 (the server did not answer in time)
    body bytes    `BodyLimit`: by its Content-Length, or while it streams (serving.http sets the limit)
"""
from __future__ import annotations

import json
from http import HTTPStatus

import anyio
import h11
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.limits import Limits


def bounded_h11(limits: Limits) -> type[H11Protocol]:
    """uvicorn's `http=` protocol class for `limits` (uvicorn makes one per connection)."""
    return type("BoundedH11", (BoundedH11,), {"limits": limits})


class BoundedH11(H11Protocol):
    """uvicorn's h11 protocol, whose connection refuses a head beyond `limits.max_header_bytes` (set
    as h11's `max_incomplete_event_size` by `slc serve`), answered here with 431 and a message
    instead of uvicorn's bare 400, and which times a head out after `limits.request_timeout_s`."""
    limits: Limits

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.head_timer = None
        self._time_head()

    def data_received(self, data: bytes) -> None:
        self._time_head()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.head_timer is not None:  # the head is in
            self.head_timer.cancel()
            self.head_timer = None

    def connection_lost(self, exc) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
            self.refuse(431, f"the request head (request line and header fields) is longer than "
                             f"{self.limits.max_header_bytes} bytes, which is all this server reads "
                             f"(serving.max_header_bytes); send fewer or shorter header fields")
        else:
            super().send_400_response(msg)

    def _time_head(self) -> None:
        if self.head_timer is None and self.conn.their_state is h11.IDLE:
            self.head_timer = self.loop.call_later(self.limits.request_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.conn.trailing_data[0]:
                self.refuse(408, f"the request head did not arrive within {self.limits.request_timeout_s:g} s "
                                 f"(serving.request_timeout_s)")
            else:  # an idle connection: nothing was asked, nothing to answer
                self.transport.close()

    def refuse(self, status: int, detail: str) -> None:
        """Answer in bytes of our own and close: h11 sends no response before a request head is in."""
        body = json.dumps({"detail": detail}).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()


def _answer(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


class HeaderCount:
    """ASGI middleware: more than `limit` header fields get 431 before anything else looks at them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and len(scope["headers"]) > self.limit:
            response = _answer(431, f"the request has {len(scope['headers'])} header fields, at most {self.limit} are "
                                    f"taken (serving.max_headers); send fewer", Connection="close")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class RequestTimeout:
    """ASGI middleware: a request not answered within `seconds` gets 408 when its body had not all
    arrived (a slow or stalled client), else 503 (the server was too slow: busy, or too large a batch)."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = body_done = False

        async def receive_noting_the_end():
            nonlocal body_done
            message = await receive()
            body_done = body_done or message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_noting_the_start(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        with anyio.move_on_after(self.seconds) as deadline:
            await self.app(scope, receive_noting_the_end, send_noting_the_start)
        if deadline.cancelled_caught and not started:
            if body_done:
                response = _answer(503, f"the server did not answer within {self.seconds:g} s (serving.request_timeout_s);"
                                        f" try again, or send fewer images per request", **{"Retry-After": "1"})
            else:
                response = _answer(408, f"the request body did not arrive within {self.seconds:g} s "
                                        f"(serving.request_timeout_s)", Connection="close")
            await response(scope, receive, send)


class BodyLimit:
    """Refuse a body that cannot hold an acceptable batch without reading it into memory: by its
    Content-Length before reading, or, when it has none (chunked), once what arrived passes the
    limit; the 413 then closes the connection, so the client stops sending. (FastAPI's own
    `max_body_size` answers a bare "Content Too Large" instead of saying what to change.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            error = self.too_large(f"{int(length)} bytes")
            await JSONResponse({"detail": error.detail}, error.status_code, error.headers)(scope, receive, send)
            return
        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # raised into the body's parser, which FastAPI lets through to its handler
                raise self.too_large(f"more than {self.limit} bytes")
            return message

        await self.app(scope, receive_within_limit, send)

    def too_large(self, size: str) -> HTTPException:
        return HTTPException(413, f"the request body has {size}; at most {self.limit} are read, what the largest batch "
                                  f"a request may send (serving.max_batch images) needs; send fewer images per request",
                             headers={"Connection": "close"})
