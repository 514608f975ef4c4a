"""OpenAI chat-completions wire format: request, response, stream-chunk and error schemas.

Design decisions:
* Requests forbid unknown fields, so a typo or a feature we do not implement is a clear 400
  naming the parameter instead of being silently ignored. OpenAI fields we know but do not
  support (tools, logprobs, response_format json, penalties, ...) are declared, so the schema
  documents them, and `unsupported_params` turns them into the same clear 400; harmless ones
  (`user`, `metadata`, `store`, `service_tier`, ...) are accepted and ignored.
* Content parts are a discriminated union on `type`: OpenAI's `text` / `image_url`, the
  Responses-style `input_text` / `input_image`, and vLLM-style `video_url`, so `/openapi.json`
  describes exactly what we accept.
* Extensions beyond OpenAI's fields are top-level request fields, as vLLM does (`top_k`,
  `repetition_penalty`, `ignore_eos`; `tokens_per_image` for token reduction; `fps` /
  `max_frames` for video sampling); the `openai` client sends them with `extra_body`.
* Responses mirror OpenAI's objects field for field so the official `openai` client parses them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- request
class TextPart(_Strict):
    type: Literal["text", "input_text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputImagePart(_Strict):
    """Responses-API style: `image_url` is the URL string itself."""

    type: Literal["input_image"]
    image_url: str | ImageURL
    detail: Literal["auto", "low", "high"] | None = None


class VideoURL(_Strict):
    url: str


class VideoURLPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[
    TextPart | ImageURLPart | InputImagePart | VideoURLPart, Field(discriminator="type")
]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # accepted; we never obfuscate


class ChatCompletionRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "fastvlm-tiny",
                    "messages": [{"role": "user", "content": "Describe a red square."}],
                    "max_tokens": 8,
                    "temperature": 0,
                }
            ]
        },
    )

    model: str = Field(examples=["fastvlm-tiny"])
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # vLLM-style extension
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10)  # vLLM extension
    ignore_eos: bool | None = None  # vLLM-style extension (benchmarks: fixed output length)
    # Extension: pool every image / video frame to this many tokens (validated by the server
    # against the model: a perfect square no larger than its native count).
    tokens_per_image: int | None = None
    # Extensions for video_url parts: frames per second to sample (default: spread max_frames
    # evenly over the clip) and the most frames per video (video frames count as images).
    fps: float | None = Field(default=None, gt=0, le=1000)
    max_frames: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Harmless: accepted and ignored.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # Known but unsupported: a 400 names them unless they are at their neutral value.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None


def unsupported_params(req: ChatCompletionRequest) -> list[str]:
    """Names of set parameters this server cannot honour (each would change the output)."""
    bad = []
    if req.n not in (None, 1):
        bad.append("n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            bad.append(name)
    if req.logit_bias:
        bad.append("logit_bias")
    if req.logprobs:
        bad.append("logprobs")
    if req.top_logprobs not in (None, 0):
        bad.append("top_logprobs")
    if req.response_format and req.response_format.get("type") != "text":
        bad.append("response_format")
    for name in ("tools", "functions", "audio", "prediction", "web_search_options"):
        if getattr(req, name):
            bad.append(name)
    if req.tool_choice not in (None, "none"):
        bad.append("tool_choice")
    if req.function_call not in (None, "none"):
        bad.append("function_call")
    if req.modalities and set(req.modalities) != {"text"}:
        bad.append("modalities")
    if req.reasoning_effort is not None:
        bad.append("reasoning_effort")
    return bad


# ---------------------------------------------------------------------- responses
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    image_tokens: int = 0  # extension: how many of prompt_tokens are image placeholders


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastvlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """A failure to report as an OpenAI error object with HTTP `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "error")
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=kind, param=self.param, code=self.code)
        ).model_dump()
