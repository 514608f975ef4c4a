"""The chat service: OpenAI request → messages + verified images → FastVLM → completion or SSE
chunks. No HTTP here (app.py owns routes); errors are `APIError`s carrying their status.

Design decisions:
* Generation runs in a worker thread per request (runs.py); cancelling frees its engine slot.
* When the model's backend batches concurrent requests (`vlm.backend.batches_concurrently`:
  the torch engine), workers run at once and are batched by it; otherwise (reference decoder,
  ONNX Runtime) a lock runs them one at a time. Either way the HTTP side is the same.
* Admission control is a counter, not a queue: more than `max_concurrency` admitted requests
  → 429 with Retry-After at once, so overload is visible to clients instead of piling up.
* Everything a request can get wrong (params, images, videos, context length) is checked before
  the first byte is sent, so it gets a 4xx status, not an error inside a 200 stream.
* A `video_url` part is fetched like an image (media.py), decoded to its sampled frames here
  (`fps` / `max_frames` request fields, library defaults otherwise) and handed to the library as
  an already-decoded video part (frames + timestamps), so the prompt carries the timestamps
  exactly as `FastVLM.chat` would write them. Frames count as images against `max_images`.
* `tokens_per_image` is validated against the model up front and goes to `stream_chunks`, which
  pools every image and frame; the prompt count (context check, usage) uses the pooled runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import FastVLMError
from ..model.fastvlm import check_tokens_per_image
from .media import (
    MediaError,
    MediaPolicy,
    check_video_support,
    load_media_image,
    load_media_video,
)
from .mediapool import MediaPool
from .metrics import Metrics
from .protocol import (
    APIError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    PromptTokensDetails,
    Usage,
    new_id,
)
from .runs import Job, Run, Ticket

log = logging.getLogger("fastvlm.server")

DEFAULT_MAX_FRAMES = 16  # frames per video when a request sets no max_frames (as the library)


@dataclass(slots=True)
class ServeLimits:
    max_concurrency: int = 64  # admitted requests (running + waiting); more → 429
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    max_prompt_chars: int = 1_000_000  # text characters over all messages; more → 413
    max_images: int = 16  # images per request, video frames included
    max_messages: int = 1024  # messages per request (each adds template tokens)
    retry_after_s: int = 1


def _error_from(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, MediaError):
        return APIError(e.status, str(e), param="messages", code=e.code)
    if isinstance(e, (FastVLMError, ValueError, TypeError)):
        return APIError(400, str(e), code="invalid_request")
    log.exception("generation failed", exc_info=e)
    return APIError(500, f"internal error during generation ({type(e).__name__})", code="internal")


class ChatService:
    def __init__(
        self,
        vlm,
        model_name: str,
        limits: ServeLimits | None = None,
        media: MediaPolicy | None = None,
        metrics: Metrics | None = None,
        serialize: bool | None = None,
        allow_special_tokens: bool = False,
    ) -> None:
        self.vlm = vlm
        self.allow_special_tokens = allow_special_tokens  # else message text is only text
        self.model_name = model_name
        self.limits = limits or ServeLimits()
        self.media = media or MediaPolicy()
        self.media_pool = MediaPool(self.media)
        self.metrics = metrics or Metrics()
        if serialize is None:
            serialize = not vlm.backend.batches_concurrently
        self.gen_lock = threading.Lock() if serialize else None
        self.admitted = 0
        self.runs: set[Run] = set()
        self.context_len = vlm.config.text.max_position_embeddings

    # ------------------------------------------------------------------ admission
    def admit(self) -> Ticket:
        """Take a concurrency slot or fail fast with 429 + Retry-After."""
        if self.admitted >= self.limits.max_concurrency:
            raise APIError(
                429,
                f"server busy: {self.admitted} requests in flight (limit "
                f"{self.limits.max_concurrency}); retry after {self.limits.retry_after_s} s",
                code="server_busy",
                headers={"Retry-After": str(self.limits.retry_after_s)},
            )
        self.admitted += 1
        return Ticket(self._release)

    def _release(self) -> None:
        self.admitted -= 1

    def cancel_all(self) -> None:
        for r in list(self.runs):
            r.cancel()

    # ------------------------------------------------------------------ request → job
    async def prepare(self, req: ChatCompletionRequest) -> Job:
        t0 = time.perf_counter()  # TTFT / latency metrics include image fetching and tokenizing
        if req.model != self.model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves {self.model_name!r} "
                "(see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        tpi = self._tokens_per_image(req)
        messages, parts, urls = self._messages(req)
        max_frames = self._max_frames(req, parts)
        if any(p["type"] == "video" for p in parts):
            try:
                check_video_support()  # before fetching anything
            except MediaError as e:
                raise _error_from(e) from e

        # one deadline for all of this request's media, started now: queueing for a worker counts
        deadline = time.monotonic() + self.media.fetch_timeout_s

        def load(part: dict, url: str):
            if part["type"] == "video":
                return load_media_video(url, self.media, req.fps, max_frames, deadline)
            return load_media_image(url, self.media, deadline)

        try:  # on the media pool: text-only requests never queue behind downloads
            loaded = await self.media_pool.map(load, list(zip(parts, urls, strict=True)))
        except MediaError as e:
            retry = {"Retry-After": str(self.limits.retry_after_s)} if e.status == 429 else None
            raise APIError(e.status, str(e), param="messages", code=e.code, headers=retry) from e
        for item in loaded:
            if isinstance(item, BaseException):
                raise _error_from(item)
        n_images = 0
        for p, item in zip(parts, loaded, strict=True):
            if p["type"] == "video":
                p["frames"] = [f.image for f in item]
                p["timestamps"] = [f.time for f in item]
                n_images += len(item)
            else:
                p["image"] = item
                n_images += 1
        self._check_image_count(n_images, videos=sum(p["type"] == "video" for p in parts))
        n_prompt = await asyncio.to_thread(self._count_prompt, messages, tpi)
        sampling = self._sampling(req, n_prompt)
        vision: dict[str, Any] = {}
        if self.allow_special_tokens:
            vision["allow_special_tokens"] = True
        if tpi is not None:
            vision["tokens_per_image"] = tpi
        proc_limit = getattr(getattr(self.vlm, "processor", None), "max_images", None)
        if proc_limit is not None and n_images > proc_limit:  # the server's limit wins
            vision["max_images"] = n_images
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Job(
            new_id(), messages, sampling, bool(req.stream), include_usage, vision=vision, t0=t0
        )

    def _tokens_per_image(self, req: ChatCompletionRequest) -> int | None:
        if req.tokens_per_image is None:
            return None
        try:
            return check_tokens_per_image(req.tokens_per_image, self.vlm.num_image_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param="tokens_per_image", code="invalid_value") from e

    def _max_frames(self, req: ChatCompletionRequest, parts: list[dict]) -> int:
        """Frames per video: the request's `max_frames` (≤ the image limit), else the library's
        default, lowered so that the request's videos and images fit the image limit."""
        limit = self.limits.max_images
        if req.max_frames is not None:
            if req.max_frames > limit:
                raise APIError(
                    400,
                    f"max_frames={req.max_frames} is more than this server's limit of {limit} "
                    "images per request (video frames count as images)",
                    param="max_frames",
                    code="too_many_images",
                )
            return req.max_frames
        videos = sum(p["type"] == "video" for p in parts)
        room = (limit - (len(parts) - videos)) // max(videos, 1)
        return max(1, min(DEFAULT_MAX_FRAMES, room))

    def _check_image_count(self, n: int, videos: int = 0) -> None:
        if n > self.limits.max_images:
            hint = " (video frames count as images: lower max_frames or fps)" if videos else ""
            raise APIError(
                400,
                f"{n} images in one request, more than the limit of {self.limits.max_images}{hint}",
                param="messages",
                code="too_many_images",
            )

    def _messages(self, req: ChatCompletionRequest) -> tuple[list[dict], list[dict], list[str]]:
        """(library messages, their image / video parts still to fill, the URLs to load)."""
        if len(req.messages) > self.limits.max_messages:
            raise APIError(
                400,
                f"{len(req.messages)} messages in one request, more than the limit of "
                f"{self.limits.max_messages}",
                param="messages",
                code="too_many_messages",
            )
        out: list[dict] = []
        media: list[dict] = []
        urls: list[str] = []
        chars = 0
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            if m.content is None or isinstance(m.content, str):
                chars += len(m.content or "")
                out.append({"role": role, "content": m.content or ""})
                continue
            parts: list[dict] = []
            for p in m.content:
                if p.type in ("text", "input_text"):
                    chars += len(p.text)
                    parts.append({"type": "text", "text": p.text})
                else:
                    if role != "user":
                        raise APIError(
                            400,
                            "images and videos are only allowed in user messages",
                            param=f"messages[{i}].content",
                        )
                    if p.type == "video_url":
                        urls.append(p.video_url.url)
                        part = {"type": "video", "frames": None, "timestamps": None}
                    else:
                        urls.append(
                            p.image_url if isinstance(p.image_url, str) else p.image_url.url
                        )
                        part = {"type": "image", "image": None}
                    parts.append(part)
                    media.append(part)
            out.append({"role": role, "content": parts})
        if chars > self.limits.max_prompt_chars:
            raise APIError(
                413,
                f"messages hold {chars} characters of text, more than the limit of "
                f"{self.limits.max_prompt_chars}",
                param="messages",
                code="prompt_too_large",
            )
        # each video yields at least one frame: refuse before fetching anything
        videos = sum(p["type"] == "video" for p in media)
        self._check_image_count(len(urls), videos)
        return out, media, urls

    def _count_prompt(self, messages: list[dict], tokens_per_image: int | None = None) -> int:
        """Prompt length in tokens, (pooled) image placeholders included (no pixels)."""
        try:
            ids, _ = self.vlm.processor.encode_messages(
                messages,
                tokens_per_image=tokens_per_image,
                allow_special_tokens=self.allow_special_tokens,
            )
            return len(ids)
        except (FastVLMError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from e

    def _sampling(self, req: ChatCompletionRequest, n_prompt: int) -> dict[str, Any]:
        room = self.context_len - n_prompt
        if room < 1:
            raise APIError(
                400,
                f"the prompt is {n_prompt} tokens (images included), which leaves no room in "
                f"the model's context of {self.context_len} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.limits.max_tokens_limit, room)
        elif max_tokens > self.limits.max_tokens_limit:
            raise APIError(
                400,
                f"{param}={max_tokens} is more than this server's limit of "
                f"{self.limits.max_tokens_limit}",
                param=param,
                code="max_tokens_too_large",
            )
        elif max_tokens > room:
            raise APIError(
                400,
                f"prompt ({n_prompt} tokens, images included) + {param} ({max_tokens}) exceeds "
                f"the model's context of {self.context_len} tokens",
                param=param,
                code="context_length_exceeded",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        stop = [s for s in stop if s]
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop")
        s: dict[str, Any] = {
            "max_tokens": max_tokens,
            # OpenAI's default is 1. Below 1e-4 sampling equals argmax but dividing logits by
            # such a temperature overflows to inf/nan, so it is greedy decoding outright.
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "stop": stop,
        }
        if s["temperature"] < 1e-4:
            s["temperature"] = 0.0
        # top_p below float32's range rounds to 0 in the sampler and drops every token; any
        # top_p this small keeps only the most likely token, as 1e-6 does.
        s["top_p"] = max(s["top_p"], 1e-6)
        for name in ("top_k", "repetition_penalty", "seed", "ignore_eos"):
            if getattr(req, name) is not None:
                s[name] = getattr(req, name)
        return s

    # ------------------------------------------------------------------ generation
    def _start(self, job: Job, ticket: Ticket) -> Run:
        run = Run(self.vlm, self.gen_lock, job, ticket)
        self.runs.add(run)
        self.metrics.waiting += 1
        return run

    def _on_first(self, run: Run) -> None:
        run.first_seen = True
        self.metrics.waiting -= 1
        self.metrics.running += 1
        self.metrics.ttft.observe(time.perf_counter() - run.job.t0)

    def finish(self, run: Run, last=None, outcome: str = "cancelled") -> None:
        """Account for a run exactly once and give its slot back (idempotent). `outcome` is
        what happened: "completed", "failed" (generation raised) or "cancelled" (the client
        went away or the server is stopping): each has its own counter."""
        if run.finished:
            return
        run.finished = True
        self.runs.discard(run)
        run.ticket.release()
        m = self.metrics
        if run.first_seen:
            m.running -= 1
        else:
            m.waiting -= 1
        if outcome != "completed":
            run.cancel()
            if outcome == "failed":
                m.failed += 1
            else:
                m.cancelled += 1
        if last is not None:
            m.prompt_tokens += last.stats.prompt_tokens
            m.image_tokens += last.stats.image_tokens
            m.generation_tokens += last.stats.generation_tokens
            if outcome == "completed":
                m.latency.observe(time.perf_counter() - run.job.t0)

    @staticmethod
    def _usage(stats) -> Usage:
        return Usage(
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.generation_tokens,
            total_tokens=stats.prompt_tokens + stats.generation_tokens,
            prompt_tokens_details=PromptTokensDetails(image_tokens=stats.image_tokens),
        )

    async def complete(
        self,
        job: Job,
        ticket: Ticket,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> ChatCompletion:
        """Run to the end; a disconnect noticed while waiting cancels the generation."""
        run = self._start(job, ticket)
        texts: list[str] = []
        last = None
        getter: asyncio.Task | None = None
        next_check = time.monotonic() + 0.5
        outcome = "cancelled"  # until the run ends or fails: a disconnect, or shutdown
        try:
            while True:
                getter = getter or asyncio.ensure_future(run.get())
                done, _ = await asyncio.wait({getter}, timeout=0.5)
                if is_disconnected is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.5  # tokens keep coming: check by time
                    if await is_disconnected():
                        raise APIError(499, "client disconnected", code="client_disconnected")
                if not done:
                    continue
                kind, item = getter.result()
                getter = None
                if kind == "done":  # completed only if the last chunk said why it stopped
                    break
                if kind == "error":
                    outcome = "failed"
                    raise _error_from(item)
                if not run.first_seen:
                    self._on_first(run)
                texts.append(item.text)
                last = item
                if item.finish_reason:
                    outcome = "completed"
        finally:
            if getter is not None:
                getter.cancel()
            self.finish(run, last, outcome)
        if last is None:
            raise APIError(500, "generation produced no output", code="internal")
        return ChatCompletion(
            id=job.id,
            created=job.created,
            model=self.model_name,
            choices=[
                Choice(
                    message=AssistantMessage(content="".join(texts)),
                    finish_reason=last.finish_reason or "stop",
                )
            ],
            usage=self._usage(last.stats),
        )

    async def stream(self, job: Job, ticket: Ticket) -> tuple[AsyncIterator[str], Run]:
        """Start generating; return (SSE event stream, run). The first chunk (or the error) is
        awaited here, so failures before any token still become a proper 4xx response. The
        caller must call `finish(run)` if the stream is never iterated to the end."""
        run = self._start(job, ticket)
        kind, item = await run.get()
        if kind == "error":
            self.finish(run, outcome="failed")
            raise _error_from(item)
        if kind == "chunk":
            self._on_first(run)
        return self._events(job, run, (kind, item)), run

    def _frame(self, job: Job, choices: list[dict], usage: Usage | None = None) -> str:
        d: dict[str, Any] = {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": job.created,
            "model": self.model_name,
            "choices": choices,
        }
        if job.include_usage:  # OpenAI: usage null on every chunk, filled on the last one
            d["usage"] = usage.model_dump() if usage is not None else None
        return f"data: {json.dumps(d, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def _events(self, job: Job, run: Run, first: tuple[str, Any]) -> AsyncIterator[str]:
        def choice(delta: dict, finish: str | None = None) -> list[dict]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        last = None
        outcome = "cancelled"  # until the run ends or fails: a disconnect, or shutdown
        try:
            yield self._frame(job, choice({"role": "assistant", "content": ""}))
            kind, item = first
            while kind != "done":
                if kind == "error":  # after the 200 went out: report in-band, then end
                    outcome = "failed"
                    yield f"data: {json.dumps(_error_from(item).body())}\n\n"
                    break
                last = item
                if item.finish_reason:
                    outcome = "completed"
                if item.text:
                    yield self._frame(job, choice({"content": item.text}))
                if item.finish_reason:
                    yield self._frame(job, choice({}, item.finish_reason))
                kind, item = await run.get()
            if last is not None and job.include_usage:
                yield self._frame(job, [], usage=self._usage(last.stats))
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects (the task is cancelled mid-await)
            self.finish(run, last, outcome)
