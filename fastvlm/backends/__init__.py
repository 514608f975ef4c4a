"""Runtimes behind the `FastVLM` API (see base.py for the protocol every backend implements)."""

from .base import Backend, Generation

__all__ = ["Backend", "Generation"]
