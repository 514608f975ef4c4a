"""`fastvlm serve` options checked before the socket opens, and the one-line load error.

Design decisions:
* The model loads lazily, after the server listens (app.py); a bad option found then would
  leave a server that never becomes ready. So every option is checked here first, with the
  same functions `load()` uses (hub.resolve, resolve_device/dtype, load_config), and a bad one
  is a `ConfigError` (the CLI prints one `error:` line and exits 1). Only reading and
  validating config.json happens here; weights load later.
* A failure of the lazy load itself is reported as one line (`load_error_message`), and by
  /health; FASTVLM_TRACEBACK=1 also logs the traceback.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from ..cli import user_error
from ..errors import ConfigError

# ServerConfig / ServeLimits / MediaPolicy fields that must be > 0, with their flag names.
POSITIVE = {
    "max_request_bytes": "--max-request-mb",
    "request_read_timeout": "--request-read-timeout",
    "limits.max_concurrency": "--max-concurrency",
    "limits.max_tokens_limit": "--max-tokens-limit",
    "limits.max_images": "--max-images",
    "media.max_image_bytes": "--max-image-mb",
    "media.max_video_bytes": "--max-video-mb / --max-video-bytes",
    "media.max_image_pixels": "--max-image-pixels",
    "media.fetch_timeout_s": "--fetch-timeout",
    "media.media_workers": "--media-workers",
}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_server_options(cfg) -> None:
    """Limits, port, log level and the local media folder of a `ServerConfig`."""
    for name, flag in POSITIVE.items():
        v = _get(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{flag} must be a positive number (got {v!r})")
    if cfg.slots is not None and cfg.slots < 1:
        raise ConfigError(f"--slots must be 1 or more (got {cfg.slots})")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"--port must be 0 to 65535 (got {cfg.port})")
    if cfg.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level {cfg.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    local = cfg.media.allowed_local_media_path
    if local is not None and not Path(local).is_dir():
        raise ConfigError(f"--allowed-local-media-path {local}: not an existing folder")


def check_model_options(cfg) -> None:
    """Model, device, dtype and image size exactly as `fastvlm.api.load` will judge them."""
    from .. import hub  # torch comes with these: not imported for `fastvlm serve -h`
    from ..backends import refuse_foreign_export
    from ..device import resolve_device, resolve_dtype
    from ..weights import load_config

    folder = hub.resolve(cfg.model)  # a typo or an offline miss fails here
    refuse_foreign_export(folder)
    if (folder / "fastvlm_export.json").exists():
        return  # an ONNX export: its loader checks the image size against the export
    try:
        dev = resolve_device(cfg.device)
    except RuntimeError:  # torch.device's own message lists every backend torch knows
        raise ConfigError(
            f"unknown device {cfg.device!r}: use auto, cpu, cuda, cuda:N or mps"
        ) from None
    with warnings.catch_warnings():  # the load warns about slow dtypes itself, once
        warnings.simplefilter("ignore")
        resolve_dtype(cfg.dtype, dev)
    load_config(folder, cfg.image_size)


def check_options(cfg) -> None:
    """Every option of `fastvlm serve`; a `ConfigError` (or the loader's own error) if bad."""
    check_server_options(cfg)
    try:
        check_model_options(cfg)
    except ValueError as e:  # resolve_device / resolve_dtype raise plain ValueErrors
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def load_error_message(e: BaseException) -> str:
    """One line for a failed lazy load: the user-facing message, or the kind of bug."""
    msg = user_error(e)
    if msg is None:
        msg = f"unexpected {type(e).__name__}: {e} (FASTVLM_TRACEBACK=1 logs where)"
    return " ".join(msg.split())  # one line, whatever the exception text holds
