"""modeld: serve several llama.cpp models from one process, inside a memory budget.

The library surface; ``modeld.api`` and ``modeld.server`` (Starlette, Hypercorn) are only
imported by whoever serves HTTP.
"""

from loguru import logger

from modeld import errors
from modeld.errors import ModeldError
from modeld.scheduling.choices import ChoiceRun
from modeld.scheduling.generation import Generation
from modeld.scheduling.manager import ManagerStatistics, ModelManager
from modeld.settings.config import Settings, load_settings
from modeld.settings.per_model import ModelSettings
from modeld.types import (
    ChatMessage,
    ChatRequest,
    Chunk,
    DoneReason,
    EmbeddingResult,
    GenerationMetrics,
    GenerationResult,
    InferRequest,
    InstanceState,
    LoopKind,
    SamplingParams,
)

__version__ = "0.1.0"

# A library stays quiet unless its user asks: `logger.enable("modeld")`, or the server's
# `configure_logging()`, turns modeld's log records on.
logger.disable("modeld")

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "ChoiceRun",
    "Chunk",
    "DoneReason",
    "EmbeddingResult",
    "Generation",
    "GenerationMetrics",
    "GenerationResult",
    "InferRequest",
    "InstanceState",
    "LoopKind",
    "ManagerStatistics",
    "ModelManager",
    "ModelSettings",
    "ModeldError",
    "SamplingParams",
    "Settings",
    "errors",
    "load_settings",
]
