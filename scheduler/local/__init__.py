"""The local engine: a real small chat model (SmolLM2-135M-Instruct) on CPU, the embedded default."""

from scheduler.local.engine import LocalEngine
from scheduler.local.model import LoadedModel, load_model
from scheduler.local.prefix_cache import PrefixKVCache

__all__ = ["LoadedModel", "LocalEngine", "PrefixKVCache", "load_model"]
