"""fastvlm: run Apple's FastVLM vision-language models fast and everywhere.

>>> import fastvlm
>>> vlm = fastvlm.load()                     # embedded tiny demo model, offline
>>> vlm.describe("examples/shapes1.png")
>>> vlm = fastvlm.load("apple/FastVLM-0.5B")  # downloads on demand (research licence)
"""

from .api import FastVLM, load
from .engine.generate import Chunk, Stats
from .engine.sampling import SamplingParams
from .errors import (
    CheckpointError,
    ConfigError,
    FastVLMError,
    ImageError,
    ModelNotFoundError,
    TokenizerError,
)

__version__ = "0.1.0"

__all__ = [
    "FastVLM",
    "load",
    "SamplingParams",
    "Chunk",
    "Stats",
    "FastVLMError",
    "ImageError",
    "ModelNotFoundError",
    "CheckpointError",
    "ConfigError",
    "TokenizerError",
]
