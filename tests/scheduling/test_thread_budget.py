"""The thread budget on real llama.cpp (and its arithmetic on instances without engines):
after several models ran with all the cores, the process's OpenMP threads stay within
the cores (idle pools freed), generations stay correct across the pool releases, work
running at the same moment shares the cores, and a set ``threads`` wins."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import pytest
from loguru import logger

from modeld.engine.base import TokenLoop
from modeld.engine.cpu_cores import cgroup_cpu_limit, usable_cores
from modeld.engine.openmp import pool_release_available
from modeld.gguf import FileIdentity
from modeld.registry import ModelFile
from modeld.scheduling.instance import Instance, ModelCounters
from modeld.scheduling.manager import ModelManager
from modeld.scheduling.threads import ThreadBudget
from modeld.settings.config import load_settings
from modeld.settings.live import LiveSettings
from modeld.types import InferRequest
from tests.scheduling.conftest import ConstantProbe
from tests.support.poll import poll

CORES = usable_cores()
# threads not set: each model runs on all the cores when it runs alone
FLAGS = {"n_ctx": "256", "max_wait_ms": "600000"}


def openmp_threads() -> int:
    """The process's threads that Python did not start (OpenMP's pool threads, and any
    other native thread already there: compare against a baseline)."""
    python = {t.native_id for t in threading.enumerate()}
    return sum(1 for tid in os.listdir("/proc/self/task") if int(tid) not in python)


@pytest.mark.anyio
@pytest.mark.skipif(CORES < 2, reason="one core: no model ever starts an OpenMP pool")
@pytest.mark.skipif(not pool_release_available(), reason="llama.cpp built without OpenMP")
async def test_models_that_ran_on_all_cores_keep_openmp_within_them(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    settings = load_settings(FLAGS | {"models_dir": str(models_dir)}, env={})
    baseline = openmp_threads()
    ask = {m: InferRequest(prompt="hello", model=m, max_tokens=16, temperature=0) for m in "abc"}
    async with ModelManager(settings, token_loop=token_loop, probe=ConstantProbe()) as manager:
        texts = []
        for model in ["a", "b", "c", "a", "b"]:
            request = ask[model]
            request = InferRequest(
                prompt="hello", model=f"tiny-{model}.gguf", max_tokens=16, temperature=0
            )
            text, result = await manager.complete(request)
            assert result.metrics.completion_tokens == 16
            texts.append(text)
            extra = poll(
                lambda: openmp_threads() - baseline,
                lambda n: n <= CORES - 1,
                timeout_s=10,
                what="idle OpenMP pools freed",
            )
            assert extra <= CORES - 1
        stats = {i.model_id: i for i in manager.statistics().instances}
    assert texts[3] == texts[0]  # the same after its pool was freed
    assert texts[4] == texts[1]
    assert texts[0] != texts[1]  # different models: the comparison above means something
    assert {s.threads for s in stats.values()} == {CORES}
    assert all(s.threads_lease == 0 for s in stats.values())  # nothing runs now
    assert 1 + sum(s.openmp_pool_threads - 1 for s in stats.values()) <= CORES


@pytest.mark.anyio
@pytest.mark.skipif(CORES < 2, reason="one core: nothing to share")
async def test_generations_at_the_same_moment_share_the_cores_and_stay_correct(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    settings = load_settings(FLAGS | {"models_dir": str(models_dir)}, env={})
    models = ["tiny-a.gguf", "tiny-b.gguf", "tiny-c.gguf"]

    def ask(model: str) -> InferRequest:
        return InferRequest(prompt="hello", model=model, max_tokens=200, temperature=0)

    async with ModelManager(settings, token_loop=token_loop, probe=ConstantProbe()) as manager:
        alone = [(await manager.complete(ask(model)))[0] for model in models]
        together: dict[str, str] = {}
        leases: list[tuple[int, ...]] = []

        async def one(model: str) -> None:
            async with manager.stream(ask(model)) as generation:
                parts = []
                async for chunk in generation:
                    parts.append(chunk.text)
                    running = [i.threads_lease for i in manager.statistics().instances]
                    leases.append(tuple(sorted(n for n in running if n)))
                together[model] = "".join(parts)

        async with anyio.create_task_group() as group:
            for model in models:
                group.start_soon(one, model)
        idle = [i.threads_lease for i in manager.statistics().instances]
    assert [together[model] for model in models] == alone  # retuned mid-way: same tokens
    assert all(sum(lease) <= max(CORES, len(lease)) for lease in leases)
    assert any(len(lease) > 1 for lease in leases)  # they did run at the same moment
    assert idle == [0, 0, 0]


def _instance(model_id: str, last_used_s: float) -> Instance:
    identity = FileIdentity(device=0, inode=0, size_bytes=0, mtime_ns=0)
    model = ModelFile(id=model_id, path=Path(model_id), identity=identity)
    return Instance(model=model, counters=ModelCounters(), last_used_s=last_used_s)


def _budget(cores: int, instances: list[Instance], **flags: str) -> ThreadBudget:
    settings = load_settings({"models_dir": "/nonexistent", **flags}, env={})
    return ThreadBudget(LiveSettings(settings), lambda: instances, cores=cores)


def test_work_at_the_same_moment_shares_the_cores() -> None:
    a, b, c = _instance("a", 1.0), _instance("b", 2.0), _instance("c", 3.0)
    budget = _budget(4, [a, b, c])
    assert budget.lease(a) == 4  # alone: all the cores
    assert budget.lease(b) == 2  # a, running, is retuned to the other half
    assert (a.threads.lease, a.threads.pool) == (2, 2)
    assert budget.lease(c) == 1  # 4 cores among 3: the earlier started keep more
    assert (a.threads.lease, b.threads.lease) == (2, 1)
    budget.give_back(a)
    assert (b.threads.lease, c.threads.lease) == (2, 2)
    budget.give_back(b)
    assert c.threads.lease == 4
    # c's pool of 4 next to b's idle one of 2 would be 1 + 1 + 3 OpenMP threads; a's
    # pool (2, idle longest) went first: 1 + 1 + 1 + 3 was still too many
    assert (a.threads.pool, b.threads.pool, c.threads.pool) == (1, 1, 4)
    assert budget.pools_released == 2
    budget.give_back(c)
    assert budget.lease(b) == 4
    assert c.threads.pool == 1  # freed for b
    assert (b.threads.configured, b.threads.lease) == (4, 4)


def test_the_longest_unused_idle_pool_is_freed_first() -> None:
    old, recent, runner = _instance("old", 1.0), _instance("recent", 5.0), _instance("r", 9.0)
    old.threads.pool = recent.threads.pool = 2
    budget = _budget(4, [old, recent, runner], threads="2")
    assert budget.lease(runner) == 2  # 1 + 1 + 1 + 1 = 4 OpenMP threads: all fit
    assert (old.threads.pool, recent.threads.pool) == (2, 2)
    budget.give_back(runner)
    budget = _budget(4, [old, recent, runner], threads="3")
    assert budget.lease(runner) == 3  # 1 + 1 + 1 + 2 = 5: one idle pool must go
    assert (old.threads.pool, recent.threads.pool) == (1, 2)
    budget.give_back(runner)
    budget = _budget(4, [old, recent, runner])
    assert budget.lease(runner) == 4  # all the cores: 1 + 1 + 3 = 5
    assert (old.threads.pool, recent.threads.pool) == (1, 1)


def test_a_set_threads_wins_and_oversubscribes_with_one_warning() -> None:
    warnings: list[str] = []
    logger.enable("modeld")  # a library keeps its log off until enabled
    sink = logger.add(
        lambda message: warnings.append(message.record["extra"]["model"]),
        level="WARNING",
        filter=lambda record: "oversubscribe" in record["message"],
    )
    try:
        a, b = _instance("a", 1.0), _instance("b", 2.0)
        budget = _budget(2, [a, b], threads="2")
        assert budget.lease(a) == 2
        assert warnings == []
        assert budget.lease(b) == 2  # set: not cut to fit, though both run
        assert (a.threads.pool, b.threads.pool) == (2, 2)
        assert warnings == ["b"]
        budget.give_back(b)
        assert budget.lease(b) == 2  # still oversubscribing: told once, not every lease
        assert warnings == ["b"]
        budget.give_back(a)
        budget.give_back(b)
        a.threads.pool = 1  # a's pool freed: b alone fits again
        assert budget.lease(b) == 2
        assert warnings == ["b"]
        assert budget.lease(a) == 2  # with b running: oversubscribing again, told again
        assert warnings == ["b", "a"]
    finally:
        logger.remove(sink)
        logger.disable("modeld")


def test_one_thread_work_frees_its_own_pool_only_when_it_must() -> None:
    a, b = _instance("a", 1.0), _instance("b", 2.0)
    budget = _budget(2, [a, b])
    assert budget.lease(a) == 2
    b.threads.pool = 2  # b ran alone before
    assert budget.lease(b) == 1  # 2 cores, 2 generations: 1 each
    assert (a.threads.lease, a.threads.pool) == (1, 2)  # a 1-thread region keeps a pool
    assert b.threads.pool == 1  # its pool of 2 next to a's would be 3 OpenMP threads
    budget.give_back(b)
    assert a.threads.lease == 2  # the cores back


def test_the_cgroup_quota_caps_the_cores(tmp_path: Path) -> None:
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2, tmp_path / "none", tmp_path / "none") == 1.5
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit(v2, tmp_path / "none", tmp_path / "none") is None
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("-1\n")
    period.write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "none", quota, period) is None
    quota.write_text("200000\n")
    assert cgroup_cpu_limit(tmp_path / "none", quota, period) == 2.0
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
