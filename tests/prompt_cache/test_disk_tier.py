"""A disk entry is handed to llama.cpp only when every header field, its size and its
checksum match; any other file is removed and the request evaluates afresh."""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from modeld.engine.base import TokenLoop
from modeld.prompt_cache.cache import PromptCache
from modeld.prompt_cache.disk_tier import DiskTier
from modeld.sizes import MIB
from tests.engine.test_prompt_reuse import answer, words
from tests.prompt_cache.test_restore import GREEDY, make_engine, namespace_of
from tests.support.prompts import long_prompt


def _saved_entry(path: Path, loop: TokenLoop, directory: Path) -> tuple[list[int], bytes]:
    """An engine's exchange saved at close into ``directory``: (its resumed prompt, the
    fresh answer to it)."""
    cache = PromptCache(64 * MIB, disk=DiskTier(directory, 64 * MIB))
    engine = make_engine(path, loop)
    engine.attach_prompt_cache(cache.for_model(namespace_of(engine, path)))
    _, outcome = answer(engine, engine.tokenize(long_prompt(6)), GREEDY)
    assert outcome.kv_tokens is not None
    resumed = [*outcome.kv_tokens, *words(engine, " and the world")]
    engine.close()
    assert cache.close(60.0) == 0  # the writer's queue drained: the file is in place
    fresh = make_engine(path, loop, reuse=False)
    try:
        text, _ = answer(fresh, resumed, GREEDY)
    finally:
        fresh.close()
    return resumed, text


def _only_file(directory: Path) -> Path:
    (entry,) = [p for p in directory.iterdir() if p.suffix == ".pc"]
    return entry


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 4096)


def _zero_file(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(1 << 16))


def _header_for_another_model(path: Path) -> None:
    """Same size and checksum, header naming another model: a hostile rename."""
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"model_id":"tiny-a.gguf"', b'"model_id":"tiny-b.gguf"'))


def _huge_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10:14] = (1 << 31).to_bytes(4, "little")
    path.write_bytes(bytes(data))


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "bit-flipped": _flip_payload_byte,
    "truncated": _truncate,
    "empty": _zero_file,
    "garbage": _garbage,
    "another-model": _header_for_another_model,
    "huge-header": _huge_header,
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_damaged_entry_is_removed_and_never_restored(
    tiny_model_path: Path, token_loop: TokenLoop, tmp_path: Path, corrupt: Callable[[Path], None]
) -> None:
    resumed, fresh_text = _saved_entry(tiny_model_path, token_loop, tmp_path)
    entry = _only_file(tmp_path)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    corrupt(entry)
    cache = PromptCache(64 * MIB, disk=DiskTier(tmp_path, 64 * MIB))  # a restart
    engine = make_engine(tiny_model_path, token_loop)
    engine.attach_prompt_cache(cache.for_model(namespace_of(engine, tiny_model_path)))
    try:
        text, outcome = answer(engine, resumed, GREEDY)
    finally:
        engine.attach_prompt_cache(None)
        engine.close()
    assert outcome.cached_tokens == 0
    assert text == fresh_text
    assert not entry.exists()
    stats = cache.statistics()
    assert (stats.hits_disk, stats.restore_failures, stats.invalid_removed) == (0, 0, 1)


def test_an_entry_for_another_context_size_is_not_used(
    tiny_model_path: Path, token_loop: TokenLoop, tmp_path: Path
) -> None:
    _saved_entry(tiny_model_path, token_loop, tmp_path)
    tier = DiskTier(tmp_path, 64 * MIB)
    engine = make_engine(tiny_model_path, token_loop)
    try:
        other = dataclasses.replace(namespace_of(engine, tiny_model_path), n_ctx=2048)
        (entry,) = tier.entries(namespace_of(engine, tiny_model_path).digest())
        assert tier.entries(other.digest()) == []
        assert tier.load(entry, other, 64 * MIB) is None  # every field is compared
        assert not entry.path.exists()
    finally:
        engine.close()


def test_the_disk_bound_keeps_the_most_recent_entries(tmp_path: Path) -> None:
    from modeld.gguf import FileIdentity
    from modeld.prompt_cache.namespace import Namespace

    namespace = Namespace.of("m.gguf", FileIdentity(1, 2, 3, 4), 512, 64, 64)
    tier = DiskTier(tmp_path, 3 * MIB)
    for i in range(5):
        assert tier.save(namespace, tuple(range(i, i + 40)), bytes([i]) * MIB)
    kept = sorted(e.tokens[0] for e in tier.entries(namespace.digest()))
    assert kept == [3, 4]
    assert tier.used_bytes <= 3 * MIB
    assert len(list(tmp_path.iterdir())) == 2  # no temporaries left behind
