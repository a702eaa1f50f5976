"""What Ollama's listings say about a model file, read from its GGUF header once per
version of the file (off the event loop) and kept while the file is unchanged."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from datetime import UTC, datetime

import anyio

from modeld.errors import ModelInvalid, ModelsDirUnavailable
from modeld.gguf import FileIdentity, GgufMetadata, read_gguf_metadata
from modeld.registry import FS_TIMEOUT_S, ModelFile
from modeld.settings.config import Settings

__all__ = [
    "CHAT_TEMPLATE_KEY",
    "ModelFacts",
    "details",
    "has_chat_template",
    "human_count",
    "iso_time",
    "modified_at",
]

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"

_CACHED_FILES = 256


def iso_time(unix_s: float) -> str:
    """RFC 3339 in UTC with an explicit offset (``datetime.fromisoformat`` reads it on
    every Python; Go's RFC 3339 parser too)."""
    return datetime.fromtimestamp(unix_s, tz=UTC).isoformat()


def modified_at(model: ModelFile) -> str:
    return iso_time(model.identity.mtime_ns / 1e9)


def human_count(count: int) -> str:
    """A parameter count as Ollama prints it: ``268.10M``, ``8B``, ``7.6B``."""
    for scale, unit, decimals in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if count >= scale:
            value = count / scale
            return f"{value:.0f}{unit}" if value.is_integer() else f"{value:.{decimals}f}{unit}"
    return str(count)


def details(metadata: GgufMetadata | None) -> dict[str, object]:
    """Ollama's ``details``; a file whose header cannot be read gets the format alone."""
    if metadata is None:
        return {"parent_model": "", "format": "gguf", "family": "", "families": None,
                "parameter_size": "", "quantization_level": ""}  # fmt: skip
    family = metadata.architecture
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": human_count(metadata.parameter_count),
        "quantization_level": metadata.quantization,
    }


def identity_digest(identity: FileIdentity) -> str:
    """For a file whose header cannot be read: still stable while the file is unchanged."""
    key = f"{identity.device}:{identity.inode}:{identity.size_bytes}:{identity.mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()


class ModelFacts:
    """GGUF metadata per file version, read on a worker thread, the newest few kept."""

    def __init__(self, capacity: int = _CACHED_FILES) -> None:
        self._capacity = capacity
        self._cache: OrderedDict[tuple[str, FileIdentity], GgufMetadata] = OrderedDict()

    async def of(self, model: ModelFile) -> GgufMetadata:
        """Raises :class:`ModelInvalid` when the header cannot be read, and
        :class:`ModelsDirUnavailable` when the file does not answer in time."""
        key = (str(model.path), model.identity)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        try:
            with anyio.fail_after(FS_TIMEOUT_S):
                metadata = await anyio.to_thread.run_sync(
                    read_gguf_metadata, model.path, abandon_on_cancel=True
                )
        except TimeoutError:
            raise ModelsDirUnavailable(f"{model.id}: the file did not answer in time") from None
        if metadata.identity != model.identity:  # changed since it was looked up
            return metadata
        self._cache[key] = metadata
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return metadata

    async def of_or_none(self, model: ModelFile) -> GgufMetadata | None:
        try:
            return await self.of(model)
        except ModelInvalid:
            return None


def has_chat_template(settings: Settings, model_id: str, metadata: GgufMetadata | None) -> bool:
    """Whether chat works for the model: the operator configured a template for it, or
    its file has one (``tokenizer.chat_template``)."""
    if settings.model(model_id).chat_template is not None:
        return True
    return metadata is not None and isinstance(metadata.values.get(CHAT_TEMPLATE_KEY), str)
