"""Read deadlines: a client gets a bounded time to send each request (slowloris defence).

Design decisions:
* Two layers, because uvicorn only times out idle keep-alive connections:
  - `read_deadline_protocol(S)`: uvicorn's h11 protocol plus one timer per request. A new
    connection or the next keep-alive request has S seconds to complete its headers (past it:
    a 408 if any byte came, then close); once the headers are in, the client has S + GRACE_S
    seconds to finish the body, even one the app never reads (past it: close).
  - `body_deadline(receive, S)` (used by guard.py): the app's body reads share S seconds from
    the headers on; past it the request is answered with a 408 `request_timeout` OpenAI error
    and the connection is closed. GRACE_S lets this answer go out before the protocol closes.
* The deadline is per request, not per read, so a body trickled one byte at a time gains nothing.
* h11 is used even where httptools is installed: one parser whose states we can watch.
"""

from __future__ import annotations

import asyncio
import json

from .protocol import APIError

GRACE_S = 0.5


def timeout_error(seconds: float) -> APIError:
    return APIError(
        408,
        f"request not received within {seconds:g} s (--request-read-timeout): send the "
        "headers and body promptly",
        code="request_timeout",
        headers={"Connection": "close"},
    )


class BodyTimeout(Exception):
    """The request body did not arrive within the read deadline."""


def body_deadline(receive, seconds: float):
    """`receive` that raises `BodyTimeout` if the body is not complete `seconds` after this
    call. Once it is, reads are not timed: they only wait for a disconnect (during a long
    generation or stream)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = False

    async def receive_by_deadline():
        nonlocal done
        if done:
            return await receive()
        left = end - loop.time()
        if left <= 0:
            raise BodyTimeout
        try:
            msg = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            raise BodyTimeout from None
        done = msg["type"] != "http.request" or not msg.get("more_body", False)
        return msg

    return receive_by_deadline


def read_deadline_protocol(seconds: float):
    """An uvicorn `http=` protocol class that bounds the time to read each request."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    err = timeout_error(seconds)
    body = json.dumps(err.body()).encode()
    reply = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )

    class ReadDeadlineH11(H11Protocol):
        read_timeout = seconds
        _phase: str | None = None  # "head" (waiting for headers), "body" or None (all read)
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._sync()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._sync()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start the next (pipelined) request
            self._sync()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _sync(self) -> None:
            # Re-arm only on a phase change, so bytes trickling in never extend a deadline.
            state = self.conn.their_state
            phase = {h11.IDLE: "head", h11.SEND_BODY: "body"}.get(state)
            if phase == self._phase or self.transport.is_closing():
                return
            self._disarm()
            self._phase = phase
            if phase is not None:
                delay = self.read_timeout + (GRACE_S if phase == "body" else 0.0)
                self._timer = self.loop.call_later(delay, self._expire)

        def _expire(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._phase == "head" and self.conn.trailing_data[0]:
                self.transport.write(reply)  # part of a request came: say why it is closed
            self.transport.close()

    return ReadDeadlineH11
