"""The ASGI layer in front of the FastAPI app: checks that must happen before a body is read,
the one place unhandled errors become a 500, and the per-status request count for /metrics.

Design decisions:
* API key (401) and request-size cap (413, counted while streaming the body, so a lying or
  absent Content-Length does not help) are answered here, before any route code runs.
* The body must arrive within `--request-read-timeout` (deadline.py): a late body is a 408
  `request_timeout` (with `Connection: close`), whatever route was reading it.
* An exception nobody handled is logged once, here, answered with an OpenAI 500 error object
  and counted as 500. Starlette's own last-resort handler would log it and then re-raise it to
  uvicorn, which logs it again, and the counter below would have seen no status at all.
* A request that ends without any response (the client went away first) counts as 499.
"""

from __future__ import annotations

import hmac
import json
import logging

from .deadline import BodyTimeout, body_deadline, timeout_error
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("fastvlm.server")


def error_json(status: int, message: str, code: str | None = None, param: str | None = None):
    return APIError(status, message, code=code, param=param).body()


def too_large(limit: int) -> dict:
    return error_json(
        413, f"request body is larger than the limit of {limit} bytes", code="request_too_large"
    )


class Guard:
    """ASGI middleware: API key, request-size cap, last-resort 500, per-status counter."""

    def __init__(self, app, cfg, metrics: Metrics) -> None:
        self.app = app
        self.cfg = cfg  # ServerConfig: api_key, max_request_bytes, request_read_timeout
        self.metrics = metrics

    @staticmethod
    async def _reply(send, status: int, body: dict, headers=()) -> None:
        raw = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": raw})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        counted = path.startswith("/v1/chat/")
        status_box: list[int] = []

        async def snd(msg) -> None:
            if msg["type"] == "http.response.start":
                status_box.append(msg["status"])
            await send(msg)

        try:
            await self._guarded(scope, receive, snd, path)
        except Exception as e:  # noqa: BLE001 - the last resort: logged once, answered, counted
            log.error("unhandled error on %s %s", scope.get("method"), path, exc_info=e)
            if not status_box:
                await self._reply(snd, 500, error_json(500, "internal server error", "internal"))
            elif status_box[0] < 500:  # the status line was already sent: the body is cut off
                status_box[0] = 500
        finally:
            if counted:
                self.metrics.requests[str(status_box[0] if status_box else 499)] += 1

    async def _guarded(self, scope, receive, send, path: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.cfg.api_key
        if key and path.startswith("/v1/"):
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return await self._reply(
                    send,
                    401,
                    error_json(
                        401,
                        "missing or wrong API key: send 'Authorization: Bearer <key>'",
                        code="invalid_api_key",
                    ),
                    [(b"www-authenticate", b"Bearer")],
                )
        limit = self.cfg.max_request_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await self._reply(send, 413, too_large(limit))
        seen = 0
        receive_timed = body_deadline(receive, self.cfg.request_read_timeout)

        async def receive_capped():
            nonlocal seen
            try:
                msg = await receive_timed()
            except BodyTimeout:  # an HTTPException, as the 413 below: FastAPI passes it through
                from starlette.exceptions import HTTPException

                err = timeout_error(self.cfg.request_read_timeout)
                raise HTTPException(408, err.message, headers=err.headers) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:  # FastAPI passes HTTPExceptions from body reads through
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, too_large(limit)["error"]["message"])
            return msg

        await self.app(scope, receive_capped, send)
