"""orthrus-engines: batched, lossless dual-view (Orthrus) decoding with a paged KV cache."""

from orthrus_engines.config import EngineArgs
from orthrus_engines.engine.async_engine import AsyncEngine
from orthrus_engines.engine.engine_core import EngineCore
from orthrus_engines.errors import EngineDeadError, EngineOverloaded, OrthrusInputError
from orthrus_engines.llm import LLM
from orthrus_engines.outputs import RequestOutput
from orthrus_engines.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineCore", "EngineArgs", "SamplingParams", "RequestOutput", "OrthrusInputError",
           "EngineOverloaded", "EngineDeadError"]
