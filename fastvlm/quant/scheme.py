"""Quantization schemes and specs: `Scheme` (one component's bits / group size), `parse_spec`
(a preset name, `"llm=int4,projector=int8"` or config.json's `quantization` dict) and
`spec_to_config` (what config.json records)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

COMPONENTS = ("llm", "projector", "vision")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
FORMAT_VERSION = 1
PRESETS = {
    "none": "llm=none,projector=none,vision=none",
    "int8": "llm=int8,projector=int8",
    "int4": "llm=int4,projector=int8",  # group size: --group-size, default 128
    "int4-g32": "llm=int4-g32,projector=int8",
    "int4-g64": "llm=int4-g64,projector=int8",
    "int4-g128": "llm=int4-g128,projector=int8",
}


@dataclass(frozen=True, slots=True)
class Scheme:
    """One component's quantization: bits 0 (float), 8 (per-channel) or 4 (group-wise)."""

    bits: int = 0
    group_size: int = 0
    symmetric: bool = True

    def __str__(self) -> str:
        if self.bits == 0:
            return "none"
        if self.bits == 8:
            return "int8"
        return f"int4-g{self.group_size}" + ("-sym" if self.symmetric else "")

    @classmethod
    def parse(cls, text: str, group_size: int | None = None) -> Scheme:
        """`none | int8 | int4[-gN][-sym]`; `group_size` is the default N for a bare `int4`."""
        t = text.strip().lower()
        if t in ("none", "fp", "float", ""):
            return cls()
        if t == "int8":
            return cls(bits=8)
        parts = t.split("-")
        if parts[0] != "int4":
            raise ConfigError(
                f"unknown quantization scheme {text!r}: use none, int8, int4, int4-g32/g64/g128, "
                "optionally with -sym (e.g. int4-g64-sym)"
            )
        g, sym = group_size or DEFAULT_GROUP_SIZE, False
        for p in parts[1:]:
            if p == "sym":
                sym = True
            elif p.startswith("g") and p[1:].isdigit():
                g = int(p[1:])
            else:
                raise ConfigError(f"unknown int4 option {p!r} in {text!r} (use -gN and/or -sym)")
        if g not in GROUP_SIZES:
            raise ConfigError(f"int4 group size must be one of {GROUP_SIZES}, not {g}")
        return cls(bits=4, group_size=g, symmetric=sym)


def parse_spec(spec: str | dict[str, Any], group_size: int | None = None) -> dict[str, Scheme]:
    """A preset name, `"llm=int4,projector=int8"` or a config.json `quantization` dict → schemes.

    Components left out are not quantized. `group_size` is the default for a bare `int4`.
    """
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size must be one of {GROUP_SIZES}, not {group_size}")
    if isinstance(spec, dict):
        d = dict(spec)
        version = d.pop("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"quantization format version {version} is not supported")
        items = [(str(k), str(v)) for k, v in d.items()]
    else:
        text = PRESETS.get(spec.strip().lower(), spec)
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in part:
                raise ConfigError(
                    f"bad quantization spec {spec!r}: expected a preset ({', '.join(PRESETS)}) "
                    "or component=scheme pairs like llm=int4,projector=int8"
                )
            k, v = part.split("=", 1)
            items.append((k.strip().lower(), v))
    out = {c: Scheme() for c in COMPONENTS}
    seen = set()
    for k, v in items:
        if k not in COMPONENTS:
            raise ConfigError(f"unknown component {k!r} in quantization spec: use {COMPONENTS}")
        if k in seen:
            raise ConfigError(f"component {k!r} given twice in quantization spec")
        seen.add(k)
        out[k] = Scheme.parse(v, group_size)
    return out


def spec_to_config(schemes: dict[str, Scheme]) -> dict[str, Any]:
    return {"version": FORMAT_VERSION, **{c: str(schemes[c]) for c in COMPONENTS}}
