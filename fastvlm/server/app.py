"""FastAPI routes + lifespan for `fastvlm serve`; everything else lives in serving / media.

Design decisions:
* The model loads in a background task after the socket is open, so `/health` can say
  "loading" (503) until it is ready and orchestrators see the difference from "dead". Options
  are checked before that (preflight.py); a load that fails anyway is one log line and a 500
  "error" from `/health`, which no amount of waiting fixes.
* Read deadlines (deadline.py): uvicorn's h11 protocol bounds the time to send headers, the
  guard the time to send the body, so slow clients cannot hold connections open.
* CORS wraps the guard, so preflights (sent without credentials) need no key and a 401 to an
  allowed origin carries the CORS headers the page needs to read it.
* One small ASGI guard in front of the app (guard.py) does the checks that must happen before a
  body is read (API key, size cap), turns unhandled errors into one logged 500 and counts
  responses per status for /metrics.
* Every error, including FastAPI's validation errors and unknown routes, is rendered as an
  OpenAI error object `{"error": {"message", "type", "param", "code"}}`. Client errors (4xx)
  are never logged with a traceback; JSON bodies are parsed by `protocol.parse_json_body`
  (routes use `_strict_json_route`), so malformed bytes, lone surrogates, NaN or deep nesting
  are a 400 before validation starts.
"""

import argparse
import asyncio
import logging
import os
import signal
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from typing import Any

from ..cli.args import add_model_args, check_backend
from .deadline import read_deadline_protocol
from .guard import Guard, error_json
from .media import MediaPolicy
from .metrics import Metrics
from .preflight import check_options, load_error_message
from .protocol import (
    REFUSED,
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    ModelList,
    parse_json_body,
    refused_message,
)
from .serving import ChatService, ServeLimits

log = logging.getLogger("fastvlm.server")

DEFAULT_MODEL_NAME = "fastvlm-tiny"


@dataclass(slots=True)
class ServerConfig:
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    image_size: int | None = None
    trust_pickle: bool = False
    engine: str = "fast"  # "fast" = continuous batching, "reference" = the slow oracle decoder
    backend: str = "auto"  # fastvlm.load's backend: auto or a name in backends.BACKENDS
    vision_dtype: str = "fp32"  # CPU compute dtypes (fastvlm.fast_cpu)
    prefill_dtype: str | None = None
    slots: int | None = None  # requests the engine decodes together (None: its default)
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    request_read_timeout: float = 30.0  # seconds for a request's headers, and again for its body
    cors_origins: list[str] = field(default_factory=list)
    allow_special_tokens: bool = False  # trusted callers: control tokens in text are kept
    limits: ServeLimits = field(default_factory=ServeLimits)
    media: MediaPolicy = field(default_factory=MediaPolicy)
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model or DEFAULT_MODEL_NAME


HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
}


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """FastAPI/pydantic errors → (message, param, code) the way OpenAI phrases them."""
    e = errors[0] if errors else {}
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        return "request body is not valid JSON", None, "invalid_json"
    if loc and loc[0] in REFUSED:
        return refused_message(loc[0]), loc[0], "unsupported_parameter"
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param, "unsupported_parameter"
    if kind == "missing":
        return f"missing required parameter: {param}", param, "missing_required_parameter"
    msg = e.get("msg", "invalid request")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"invalid value for {param or 'body'}: {msg}{more}", param, "invalid_value"


def _strict_json_route():
    """An APIRoute whose JSON bodies are parsed by `parse_json_body` (FastAPI's own parser takes
    lone surrogates and NaN, and answers other failures with a vague message)."""
    from fastapi.routing import APIRoute
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    class BodyError(HTTPException):  # FastAPI re-raises HTTPExceptions from body parsing as is
        def __init__(self, error: APIError) -> None:
            super().__init__(error.status, error.message)
            self.error = error

    class StrictJSONRequest(Request):
        async def json(self):
            if not hasattr(self, "_json"):
                try:
                    self._json = parse_json_body(await self.body())
                except APIError as e:
                    raise BodyError(e) from None
            return self._json

    class StrictJSONRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request: Request):
                return await handler(StrictJSONRequest(request.scope, request.receive))

            return route

    return StrictJSONRoute, BodyError


def model_card(svc: ChatService) -> dict[str, Any]:
    """`/v1/models` entry: the served name plus what serves it."""
    be = svc.vlm.backend
    return {
        "id": svc.model_name,
        "created": 0,
        "backend": be.name,
        "device": str(be.device),
        "dtype": str(be.dtype),
        "requests_serialized": svc.gen_lock is not None,
        "max_model_len": svc.context_len,
    }


def log_ready(svc: ChatService) -> None:
    card = model_card(svc)
    log.info(
        "model %s loaded on %s (device %s, dtype %s); requests %s; ready",
        card["id"], card["backend"], card["device"], card["dtype"],
        "serialised (one at a time)" if card["requests_serialized"] else "batched concurrently",
    )  # fmt: skip


def create_app(cfg: ServerConfig | None = None, vlm=None):
    """The ASGI app. `vlm` = an already loaded FastVLM (tests); otherwise loaded at start-up."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException
    from starlette.responses import StreamingResponse

    cfg = cfg or ServerConfig()
    metrics = Metrics()
    state: dict[str, Any] = {"service": None, "error": None}

    def make_service(model) -> ChatService:
        return ChatService(
            model,
            cfg.model_name,
            cfg.limits,
            cfg.media,
            metrics,
            allow_special_tokens=cfg.allow_special_tokens,
        )

    async def load() -> None:
        try:
            from ..api import load as load_model

            model = await asyncio.to_thread(
                load_model,
                cfg.model,
                device=cfg.device,
                dtype=cfg.dtype,
                trust_pickle=cfg.trust_pickle,
                image_size=cfg.image_size,
                engine=cfg.engine,
                engine_options={"slots": cfg.slots} if cfg.slots else None,
                backend=cfg.backend,
                vision_dtype=cfg.vision_dtype,
                prefill_dtype=cfg.prefill_dtype,
            )
            state["service"] = make_service(model)
            log_ready(state["service"])
        except Exception as e:  # reported by /health and every request, logged as one line
            state["error"] = load_error_message(e)
            log.error("model failed to load: %s", state["error"])
            if os.environ.get("FASTVLM_TRACEBACK") == "1":
                log.error("traceback of the load failure", exc_info=e)

    @asynccontextmanager
    async def lifespan(app):
        task = None
        if vlm is not None:
            state["service"] = make_service(vlm)
            log_ready(state["service"])
        else:
            task = asyncio.create_task(load())
        yield
        if task is not None and not task.done():
            task.cancel()
        svc = state["service"]
        if svc is not None:  # uvicorn already waited for in-flight responses; stop the rest
            svc.cancel_all()
            svc.media_pool.shutdown()

    app = FastAPI(
        title="fastvlm",
        version="1",
        description="OpenAI-compatible chat completions for FastVLM vision-language models.",
        lifespan=lifespan,
    )
    app.router.route_class, BodyError = _strict_json_route()  # before any route is added
    app.add_middleware(Guard, cfg=cfg, metrics=metrics)
    if cfg.cors_origins:  # added last = outermost: preflights need no key, a 401 gets CORS headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )

    def service() -> ChatService:
        if state["service"] is None:
            if state["error"]:  # permanent: no Retry-After
                msg = f"model failed to load: {state['error']}"
                raise APIError(503, msg, code="model_load_failed")
            msg = "model is still loading; retry shortly (GET /health says when it is ready)"
            raise APIError(503, msg, code="model_not_ready", headers={"Retry-After": "2"})
        return state["service"]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(BodyError)
    async def _body_error(request: Request, e):
        return JSONResponse(e.error.body(), status_code=e.error.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        msg, param, code = _validation_message(list(e.errors()))
        return JSONResponse(error_json(400, msg, code, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return JSONResponse(
            error_json(e.status_code, str(e.detail), HTTP_CODES.get(e.status_code)),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    errors = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 503)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        html = resources.files("fastvlm.server").joinpath("playground.html").read_text("utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", escape(cfg.model_name)))

    @app.get("/health")
    async def health():
        if state["service"] is not None:
            return {"status": "ok", "model": cfg.model_name}
        if state["error"]:  # 500, not 503: waiting will not help, the server needs a restart
            return JSONResponse({"status": "error", "detail": state["error"]}, status_code=500)
        return JSONResponse({"status": "loading", "detail": None}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(
            metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/models", response_model=ModelList, responses=errors)
    async def models():
        service()
        return {"object": "list", "data": [model_card(service())]}

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={
            **errors,
            200: {"content": {"text/event-stream": {}}, "description": "completion or SSE"},
        },
    )
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        svc = service()
        ticket = svc.admit()
        try:
            job = await svc.prepare(req)
            if not job.stream:
                out = await svc.complete(job, ticket, request.is_disconnected)
                return JSONResponse(out.model_dump(exclude_none=True))
            events, run = await svc.stream(job, ticket)
        except BaseException:
            ticket.release()
            raise

        async def cleanup() -> None:  # runs after the stream, also after a disconnect
            await events.aclose()
            svc.finish(run)

        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(cleanup),
        )

    app.state.fastvlm = state
    app.state.metrics = metrics
    return app


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastvlm serve", description="OpenAI-compatible chat-completions server."
    )
    add_model_args(p, compile=False, model_help="repo id or folder")
    p.add_argument("--served-model-name", default=None, help="model id clients must send")
    p.add_argument("--slots", type=int, default=None, help="batch size of the engine (default 8)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--api-key",
        default=os.environ.get("FASTVLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $FASTVLM_API_KEY)",
    )
    p.add_argument("--max-concurrency", type=int, default=64, help="in-flight requests; more → 429")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens allowed")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="request body cap")
    p.add_argument(
        "--request-read-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send a request's headers, and again its body (→ 408)",
    )
    p.add_argument("--max-image-mb", type=float, default=20.0, help="encoded image size cap")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000)
    p.add_argument(
        "--max-images", type=int, default=16, help="images per request, video frames included"
    )
    video = p.add_mutually_exclusive_group()
    video.add_argument("--max-video-mb", type=float, default=50.0, help="encoded video size cap")
    video.add_argument(
        "--max-video-bytes", type=int, default=None, help="the same cap in bytes (overrides)"
    )
    p.add_argument(
        "--fetch-timeout",
        type=float,
        default=10.0,
        help="total seconds per image/video URL fetch (DNS, connect, headers, body, redirects)",
    )
    p.add_argument(
        "--media-workers", type=int, default=8, help="threads that fetch and decode media"
    )
    p.add_argument(
        "--no-remote-media", action="store_true", help="refuse http(s) media URLs altogether"
    )
    p.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="serve file:// and path images/videos from under this folder only (default: none)",
    )
    p.add_argument(
        "--allowed-media-domains",
        nargs="*",
        default=[],
        help="hosts that may be fetched even if they resolve to private/loopback addresses",
    )
    p.add_argument("--cors-origins", nargs="*", default=[], help="origins allowed by CORS")
    p.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="trusted callers only: control tokens such as <|im_start|> typed in message text "
        "are kept as control tokens (default: text is tokenized as text)",
    )
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(a: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model=a.model,
        device=a.device,
        dtype=a.dtype,
        image_size=a.image_size,
        trust_pickle=a.trust_pickle,
        engine=a.engine,
        backend=check_backend(a.backend),
        vision_dtype=a.vision_dtype,
        prefill_dtype=a.prefill_dtype,
        slots=a.slots,
        served_model_name=a.served_model_name,
        host=a.host,
        port=a.port,
        api_key=a.api_key or None,
        max_request_bytes=int(a.max_request_mb * 1024 * 1024),
        request_read_timeout=a.request_read_timeout,
        cors_origins=list(a.cors_origins),
        allow_special_tokens=a.allow_special_tokens,
        limits=ServeLimits(
            max_concurrency=a.max_concurrency,
            max_tokens_limit=a.max_tokens_limit,
            max_images=a.max_images,
        ),
        media=MediaPolicy(
            max_image_bytes=int(a.max_image_mb * 1024 * 1024),
            max_image_pixels=a.max_image_pixels,
            max_video_bytes=(
                a.max_video_bytes
                if a.max_video_bytes is not None
                else int(a.max_video_mb * 1024 * 1024)
            ),
            fetch_timeout_s=a.fetch_timeout,
            media_workers=a.media_workers,
            allowed_local_media_path=a.allowed_local_media_path,
            allowed_media_domains=list(a.allowed_media_domains),
            allow_remote=not a.no_remote_media,
        ),
        log_level=a.log_level,
    )


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("error: the server needs extra packages: pip install 'fastvlm[server]'")
        return 1
    cfg = config_from_args(a)
    check_options(cfg)  # a bad option fails here, not as a server that never becomes ready
    logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", a.host)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the
    # handler it found; with this one, a clean stop by signal exits 0 instead of dying by it.
    stops: list[int] = []
    previous = {s: signal.signal(s, lambda n, _: stops.append(n)) for s in _STOP_SIGNALS}
    try:
        uvicorn.run(
            create_app(cfg),
            host=cfg.host,
            port=cfg.port,
            log_level=cfg.log_level.lower(),
            timeout_graceful_shutdown=30,
            http=read_deadline_protocol(cfg.request_read_timeout),
        )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stops:
        log.info("stopped by %s", signal.Signals(stops[0]).name)
    return 0


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


if __name__ == "__main__":
    raise SystemExit(main())
