"""Per-component precision for exports: presets and `--precision vision=fp16,llm=int4` specs.

A FastVLM has four parts whose sensitivity to precision differs a lot: the convolutional vision
tower (fine at fp16, poor at naive int8 weights), the projector (two linears), the token-embedding
table (a lookup: fp16 halves it for free) and the decoder (the bulk of the bytes; weight-only
int8/int4 keeps greedy output close). Each target says which precisions it can produce.
"""

from __future__ import annotations

from ..errors import ConfigError

COMPONENTS = ("vision", "projector", "embed", "llm")
PRESETS: dict[str, dict[str, str]] = {
    "quality": {"vision": "fp32", "projector": "fp32", "embed": "fp32", "llm": "fp32"},
    "balanced": {"vision": "fp16", "projector": "fp16", "embed": "fp16", "llm": "int8"},
    "small": {"vision": "fp16", "projector": "fp16", "embed": "fp16", "llm": "int4"},
}
ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "q8": "int8", "q4": "int4"}


def resolve_precision(
    preset: str | None,
    spec: str | None,
    allowed: dict[str, tuple[str, ...]],
    target: str,
) -> dict[str, str]:
    """Preset (default "quality") overridden by `spec` pairs; checked against `allowed`."""
    name = preset or "quality"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    out = dict(PRESETS[name])
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), ALIASES.get(value.strip().lower(), value.strip().lower())
        if not sep or key not in COMPONENTS:
            raise ConfigError(
                f"bad --precision item {part!r}: use component=precision with components "
                f"{', '.join(COMPONENTS)} (e.g. vision=fp16,llm=int4)"
            )
        out[key] = value
    for key, value in out.items():
        ok = allowed.get(key, ())
        if value not in ok:
            raise ConfigError(
                f"{target} export cannot make {key}={value}: choose one of {', '.join(ok)}"
            )
    return out


def as_precision(
    precision: str | dict[str, str] | None, allowed: dict[str, tuple[str, ...]], target: str
) -> dict[str, str]:
    """A preset name, a spec ("vision=fp16,llm=int4", on top of "quality") or a dict → dict."""
    if isinstance(precision, dict):
        spec = ",".join(f"{k}={v}" for k, v in precision.items())
        return resolve_precision(None, spec, allowed, target)
    if precision is None or precision in PRESETS:
        return resolve_precision(precision, None, allowed, target)
    return resolve_precision(None, precision, allowed, target)


def describe(precision: dict[str, str]) -> str:
    return ",".join(f"{k}={precision[k]}" for k in COMPONENTS if k in precision)
