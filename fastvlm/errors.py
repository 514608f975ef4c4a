"""Typed exceptions for user mistakes.

Every error a user can cause (bad image, unknown model, broken checkpoint, bad config, missing
tokenizer) is a `FastVLMError` subclass whose message says what to do. The CLI prints the message
on one line and exits non-zero; the server maps them to 4xx responses. Internal invariants use
`assert`.
"""

from __future__ import annotations


class FastVLMError(Exception):
    """Base class of every user-facing fastvlm error."""


class ImageError(FastVLMError, ValueError):
    """An image could not be read or decoded (missing file, corrupt bytes, too large)."""


class ModelNotFoundError(FastVLMError, FileNotFoundError):
    """A model id or folder could not be resolved (typo, offline, gated repo)."""


class CheckpointError(FastVLMError, ValueError):
    """Weights are missing, unexpected, mis-shaped, or in a refused format (pickle)."""


class ConfigError(FastVLMError, ValueError):
    """A config.json is missing, unreadable or describes something we do not support."""


class TokenizerError(FastVLMError, RuntimeError):
    """Text encoding was asked for but the model folder has no usable tokenizer."""


class VideoError(ImageError):
    """A video could not be read (missing, corrupt, no video stream, too large, PyAV missing).

    `kind` lets the server answer without repeating FFmpeg's words: "container" (not an accepted
    container), "pixels" (frames over the pixel limit), "invalid" (anything else)."""

    def __init__(self, message: str = "", kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class PromptError(FastVLMError, ValueError):
    """Message text cannot be encoded (invalid Unicode, an image token typed as text)."""
