"""OpenAI chat-completions wire format: request, response, stream-chunk and error schemas.

Design decisions:
* Requests forbid unknown fields and are validated strictly (`max_tokens: true` or
  `temperature: "1"` is a 400, not silently coerced), so a typo or a feature we do not implement
  is a clear 400 naming the parameter instead of being silently ignored.
* OpenAI fields we know but do not support (tools, logprobs, reasoning_effort, ...) are declared
  from ONE table, `REFUSED`, with a type that admits only their neutral value: `/openapi.json`
  therefore advertises exactly what is accepted, and anything else is a 400 naming the field.
  Harmless ones (`user`, `metadata`, `store`, `service_tier`, ...) are accepted and ignored.
* Bodies are parsed by `parse_json_body`, one gate for every malformed input: invalid UTF-8,
  lone surrogates in any string (`"\ud800"`: not Unicode, the tokenizer cannot take it),
  NaN/Infinity, out-of-range numbers, nesting deeper than `MAX_JSON_DEPTH`, non-object bodies.
* Content parts are a discriminated union on `type`: OpenAI's `text` / `image_url`, the
  Responses-style `input_text` / `input_image`, and vLLM-style `video_url`, so `/openapi.json`
  describes exactly what we accept.
* Extensions beyond OpenAI's fields are top-level request fields, as vLLM does (`top_k`,
  `repetition_penalty`, `ignore_eos`; `tokens_per_image` for token reduction; `fps` /
  `max_frames` for video sampling); the `openai` client sends them with `extra_body`.
* Responses mirror OpenAI's objects field for field so the official `openai` client parses them.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

MAX_JSON_DEPTH = 32  # a chat request nests about 6 deep; deeper is an attack, not a request
MAX_INT = 2**64  # the largest integer field (seed) is a uint64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


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


class TextResponseFormat(_Strict):
    type: Literal["text"]


_Zero = Annotated[float, Field(ge=0, le=0)]
_Empty = Annotated[list[dict[str, Any]], Field(max_length=0)]

# Known OpenAI fields this server cannot honour (each would change the output), with the only
# values accepted: their neutral ones. The request schema below is generated from this table.
REFUSED: dict[str, Any] = {
    "n": Literal[1],
    "frequency_penalty": _Zero,
    "presence_penalty": _Zero,
    "logit_bias": Annotated[dict[str, float], Field(max_length=0)],
    "logprobs": Literal[False],
    "top_logprobs": Annotated[int, Field(ge=0, le=0)],
    "response_format": TextResponseFormat,
    "tools": _Empty,
    "tool_choice": Literal["none"],
    "functions": _Empty,
    "function_call": Literal["none"],
    "modalities": list[Literal["text"]],
    "audio": None,
    "prediction": None,
    "reasoning_effort": None,
    "web_search_options": None,
}
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")


class _ChatCompletionRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
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
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)  # vLLM-style extension
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10)  # vLLM extension
    ignore_eos: bool | None = None  # vLLM-style extension (benchmarks: fixed output length)
    # Extension: pool every image / video frame to this many tokens (validated by the server
    # against the model: a perfect square no larger than its native count).
    tokens_per_image: int | None = Field(default=None, ge=-MAX_INT, le=MAX_INT)
    # Extensions for video_url parts: frames per second to sample (default: spread max_frames
    # evenly over the clip) and the most frames per video (video frames count as images).
    fps: float | None = Field(default=None, gt=0, le=1000)
    max_frames: int | None = Field(default=None, ge=1, le=MAX_INT)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Harmless (IGNORED): accepted and ignored.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None


ChatCompletionRequest = create_model(
    "ChatCompletionRequest",
    __base__=_ChatCompletionRequest,
    **{
        name: (Optional[kind], Field(default=1 if name == "n" else None))  # noqa: UP045
        for name, kind in REFUSED.items()
    },
)
SUPPORTED = tuple(
    n for n in ChatCompletionRequest.model_fields if n not in REFUSED and n not in IGNORED
)


def refused_message(name: str) -> str:
    return (
        f"unsupported parameter: {name} (only its neutral value is accepted; this server "
        f"supports {', '.join(SUPPORTED)}, and n=1)"
    )


# ---------------------------------------------------------------------- body parsing
class _BadNumber(ValueError):
    pass


def _parse_int(s: str) -> int:
    if len(s.lstrip("-")) > 20 or abs(v := int(s)) > MAX_INT:  # before int(): it is quadratic
        raise _BadNumber(f"integer {s[:24]}{'...' if len(s) > 24 else ''} is out of range")
    return v


def _parse_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise _BadNumber(f"number {s[:24]} is out of range")
    return v


def _parse_constant(s: str) -> float:
    raise _BadNumber(f"{s} is not valid JSON (numbers must be finite)")


def _bad_string(s: str) -> int | None:
    """Index of the first lone surrogate in `s`, or None when `s` is valid Unicode."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def _check_tree(data: Any) -> None:
    """Depth bound and valid Unicode for every string, keys included (iterative: no recursion)."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(
                400,
                f"request body is nested deeper than {MAX_JSON_DEPTH} levels",
                code="invalid_json",
            )
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            where = ".".join(map(str, (*path, k)))
            for s in (k, v):
                if isinstance(s, str) and (i := _bad_string(s)) is not None:
                    raise APIError(
                        400,
                        f"invalid value for {where}: the string holds a lone UTF-16 surrogate "
                        f"({s[i]!a} at character {i}), which is not valid Unicode",
                        param=where,
                        code="invalid_unicode",
                    )
            if isinstance(v, (dict, list)):
                stack.append((v, (*path, k), depth + 1))


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}  # fmt: skip


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Request bytes → a JSON object, or an `APIError(400)` saying what is wrong with them."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(
            400, f"request body is not valid UTF-8 (at byte {e.start})", code="invalid_json"
        ) from None
    try:
        data = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except _BadNumber as e:
        raise APIError(400, f"request body is not valid: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(
            400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        ) from None
    except ValueError as e:  # json.JSONDecodeError
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(
            400,
            f"request body must be a JSON object, got {_JSON_TYPES.get(type(data), 'a value')}",
            code="invalid_json",
        )
    _check_tree(data)
    return data


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
    # what serves it (fastvlm extension): backend name, device, weight dtype, and whether the
    # backend runs requests one at a time (no batching engine)
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    requests_serialized: bool | None = None
    max_model_len: int | None = None


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
    408: "invalid_request_error",
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
        self.message = _printable(message)  # messages echo client input, which may be invalid
        self.param = None if param is None else _printable(param)
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "error")
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=kind, param=self.param, code=self.code)
        ).model_dump()


def _printable(s: str) -> str:
    """`s` with lone surrogates written as escapes, so the error itself can always be sent."""
    return s if _bad_string(s) is None else s.encode("utf-8", "backslashreplace").decode()
