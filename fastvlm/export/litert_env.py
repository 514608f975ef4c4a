"""Importing the LiteRT toolchain (litert-torch, ai-edge-litert, litert-lm-builder, litert-lm-api).

These packages pin transformers / jax and downgrade pydantic, so they live in their own
virtualenv (README "Export"); everything here imports them lazily and turns a missing package
into a `ConfigError` that says how to install it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

from ..errors import ConfigError

# Versions the export was written and checked against (README "Export", docs/litertlm.md).
PINS = "litert-torch==0.10.0 ai-edge-litert==2.3.0 litert-lm-builder==0.18.1 litert-lm-api==0.18.1"
INSTALL = (
    "LiteRT-LM export needs litert-torch, ai-edge-litert and litert-lm-builder (and litert-lm-api "
    "to run the bundle), which pin packages (pydantic, transformers) that may clash with your "
    "environment; install them in a virtualenv: python -m venv --system-site-packages "
    f"venv-litert && venv-litert/bin/pip install {PINS}"
)


def _alias_tflite_schema() -> None:
    """litert-torch 0.10 imports `tensorflow.lite.python.schema_py_generated` (generative/layers/
    lora.py) without depending on TensorFlow; ai-edge-litert ships the same generated module."""
    try:
        importlib.import_module("tensorflow.lite.python.schema_py_generated")
        return
    except ImportError:
        pass
    schema = importlib.import_module("ai_edge_litert.schema_py_generated")
    for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            # torch._dynamo probes `find_spec("tensorflow")`: a stub without a spec breaks it
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            mod.__path__ = []
            sys.modules[name] = mod
    sys.modules["tensorflow.lite.python.schema_py_generated"] = schema


def require_converter():
    """The litert_torch module (with its generative API importable), or a ConfigError."""
    try:
        importlib.import_module("ai_edge_litert.interpreter")
        importlib.import_module("litert_lm_builder")
        _alias_tflite_schema()
        return importlib.import_module("litert_torch")
    except ImportError as e:
        raise ConfigError(f"{INSTALL} (missing: {e.name or e})") from e


def have_runtime() -> bool:
    """Whether the LiteRT-LM Python API (`litert_lm`) can be imported."""
    try:
        importlib.import_module("litert_lm")
        return True
    except ImportError:
        return False
