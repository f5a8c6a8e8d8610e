"""The sandbox pool over real subprocess sandboxes: prepare/acquire, bounds, release, accounting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tools.sandbox import Limits, Sandbox, SandboxError, SandboxPool, SubprocessSandbox


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "sandboxes"


def factory(root: Path, delay: float = 0.0, fail: set[str] | None = None):
    async def make(program_id: str) -> Sandbox:
        await asyncio.sleep(delay)  # stands for a slow start (a pod, say)
        if fail and program_id in fail:
            raise RuntimeError(f"cannot create {program_id}")
        return await SubprocessSandbox.create(root, program_id, Limits(wall_s=10))
    return make


async def test_prepare_then_acquire_finds_it_ready(root: Path):
    pool = SandboxPool(factory(root))
    try:
        assert pool.prepare("p1") is True and pool.prepare("p1") is True   # idempotent
        assert not pool.is_ready("p1")
        for _ in range(100):
            if pool.is_ready("p1"):
                break
            await asyncio.sleep(0.01)
        sb = await pool.acquire("p1")
        assert sb is await pool.acquire("p1")
        assert (await sb.exec(["true"])).ok and (root / "p1").is_dir()
        assert (pool.stats.prepared, pool.stats.created, pool.stats.acquired_ready, pool.stats.acquired_cold) \
            == (1, 1, 2, 0)
        assert pool.stats.creation_seconds > 0
        assert pool.state_counts() == {"creating": 0, "ready": 1, "failed": 0, "warm": 0}
    finally:
        await pool.close()
    assert list(root.iterdir()) == []


async def test_acquire_waits_for_a_creation_in_progress_or_creates_cold(root: Path):
    pool = SandboxPool(factory(root, delay=0.3))
    try:
        pool.prepare("p1")
        sb = await pool.acquire("p1")
        assert sb.id == "p1"
        await pool.acquire("cold")
        assert (pool.stats.acquired_waited, pool.stats.acquired_cold, pool.stats.created) == (1, 1, 2)
    finally:
        await pool.close()


async def test_release_kills_deletes_and_is_idempotent(root: Path):
    pool = SandboxPool(factory(root))
    try:
        sb = await pool.acquire("p1")
        await sb.write_file("left.txt", b"x")
        running = asyncio.create_task(sb.exec(["sleep", "30"]))
        await asyncio.sleep(0.2)
        await pool.release("p1")
        await pool.release("p1")
        await pool.release("never-existed")
        assert (await asyncio.wait_for(running, 5)).error == "killed"
        assert not (root / "p1").exists() and "p1" not in pool and pool.stats.released == 1
        again = await pool.acquire("p1")  # a new, empty one
        assert again is not sb and [e.path for e in await again.list_files()] == [".tmp"]
    finally:
        await pool.close()


async def test_release_during_creation_still_deletes_the_workspace(root: Path):
    pool = SandboxPool(factory(root, delay=0.2))
    pool.prepare("p1")
    await pool.release("p1")
    assert not (root / "p1").exists() and not pool.is_ready("p1")
    await pool.close()


async def test_kill_cancels_a_programs_commands(root: Path):
    pool = SandboxPool(factory(root))
    try:
        sb = await pool.acquire("p1")
        running = asyncio.create_task(sb.exec(["sleep", "30"]))
        await asyncio.sleep(0.2)
        await pool.kill("p1")
        await pool.kill("unknown")
        assert (await asyncio.wait_for(running, 5)).error == "killed"
        assert (await sb.exec(["true"])).ok
    finally:
        await pool.close()


async def test_bounded_number_of_sandboxes(root: Path):
    pool = SandboxPool(factory(root), max_sandboxes=2)
    try:
        await pool.acquire("a")
        pool.prepare("b")
        assert pool.prepare("c") is False
        with pytest.raises(SandboxError, match="sandbox limit reached"):
            await pool.acquire("c")
        await pool.release("a")
        assert (await pool.acquire("c")).id == "c"
    finally:
        await pool.close()


async def test_creation_failure_is_a_sandbox_error_and_forgotten(root: Path):
    pool = SandboxPool(factory(root, fail={"bad"}))
    try:
        pool.prepare("bad")
        with pytest.raises(SandboxError, match="could not create the sandbox: cannot create bad"):
            await pool.acquire("bad")
        assert "bad" not in pool and pool.stats.failed == 1
        assert (await pool.acquire("good")).id == "good"
    finally:
        await pool.close()


async def test_exec_slots_bound_concurrency_across_programs(root: Path):
    pool = SandboxPool(factory(root), max_concurrent_exec=2)
    active = peak = 0

    async def tool(program: str) -> None:
        nonlocal active, peak
        sb = await pool.acquire(program)
        async with pool.exec_slot():
            active += 1
            peak = max(peak, active)
            assert (await sb.exec(["sleep", "0.2"])).ok
            active -= 1

    try:
        await asyncio.gather(*(tool(f"p{i % 3}") for i in range(6)))
        assert peak == 2
        assert pool.snapshot()["exec_active"] == 0
    finally:
        await pool.close()


async def test_disk_usage_per_program(root: Path):
    pool = SandboxPool(factory(root))
    try:
        a = await pool.acquire("a")
        await pool.acquire("b")
        await a.write_file("data.bin", b"x" * 300_000)
        usage = await pool.disk_usage()
        assert set(usage) == {"a", "b"}
        assert usage["a"] >= 300_000 > usage["b"]
        assert pool.total_disk_bytes == usage["a"] + usage["b"]
        await pool.release("a")
        assert pool.total_disk_bytes == usage["b"]
    finally:
        await pool.close()


async def test_warm_spares_are_handed_out_and_refilled(root: Path):
    pool = SandboxPool(factory(root), warm=1)
    try:
        await pool.start()
        assert pool.state_counts()["warm"] == 1
        sb = await pool.acquire("p1")
        assert sb.id.startswith("warm-") and pool.stats.warm_used == 1 and pool.stats.acquired_cold == 0
        assert (await sb.exec(["true"])).ok
        await pool.start()  # the refill started by acquire
        assert pool.state_counts() == {"creating": 0, "ready": 1, "failed": 0, "warm": 1}
        await pool.release("p1")
    finally:
        await pool.close()
    assert list(root.iterdir()) == []
    with pytest.raises(SandboxError, match="closed"):
        await pool.acquire("p2")
