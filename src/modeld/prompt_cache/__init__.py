"""The prompt cache: sequence states kept in memory and on disk (see cache.py)."""

from modeld.prompt_cache.cache import CacheStatistics, ModelPromptCache, PromptCache
from modeld.prompt_cache.namespace import Namespace

__all__ = ["CacheStatistics", "ModelPromptCache", "Namespace", "PromptCache"]
