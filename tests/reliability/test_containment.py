"""Containment end to end: a real ``agent`` run of the service (``POST /v1/runs``), its tool calls
scripted by the simulator's SGLang-compatible server, attacking through the ``shell`` tool:

- tenant A's shell cannot read tenant B's run input (the SQLite database, its WAL, the data
  directory, any path): the sandbox sees an allow-list of the host, and the service's files
  are 0600;
- a 3,000-level directory tree breaks neither later tool calls nor the deletion of the workspace;
- writing past ``workspace_mb`` fails at the write (ENOSPC), and the workspace never holds more;
- several processes together cannot exceed ``memory_mb``;
- a run asking for more than its tenant's ceiling is refused with a 422, and no run exists.

Assertions are on what the kernel and the service did, never on how long it took. Where a
mechanism needs what this machine lacks (root, cgroups, loop devices) the test says so and skips.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
from sqlalchemy import text

from agents.spec import SandboxSpec
from orchestrator import Settings
from orchestrator.db import create_engine
from orchestrator.settings import SandboxCeilings
from tests.servers import SimServerProcess, running_server
from tests.tools import attacks
from tools.sandbox import SubprocessSandbox

pytestmark = pytest.mark.slow

KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
SECRET = "tenant-b-secret-7f3a91c2"
PATIENCE = 120.0  # seconds a run may take on a loaded machine; waits return as soon as it is done


def _turn(tool: str, **arguments: Any) -> dict[str, Any]:
    return {"output_tokens": 20, "tool": tool, "arguments": arguments}


FINAL = _turn("final_answer", answer="done")


@asynccontextmanager
async def service(tmp_path: Path, trace: list[dict[str, Any]], **settings: Any) -> AsyncIterator[str]:
    """The service (data directory ``tmp_path/data``) with the simulator playing ``trace``."""
    script = tmp_path / "trace.json"
    script.write_text(json.dumps({"turns": trace}))
    sim = SimServerProcess("--speed", "50", "--script", str(script)).start()
    data = tmp_path / "data"
    config = Settings(database_url=f"sqlite+aiosqlite:///{data}/orchestrator.db", log_json=False,
                      api_keys={KEY_A: "tenant-a", KEY_B: "tenant-b"}, worker_poll_seconds=0.1,
                      sandbox_root=str(data / "sandboxes"),
                      backends=[{"name": "sim", "kind": "sglang", "url": sim.url}], **settings)
    try:
        async with running_server(config) as url:
            yield url
    finally:
        sim.kill()


async def _run(url: str, key: str, workflow: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Submit a run and wait for its end; the run and its events."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=PATIENCE + 10) as http:
        created = await http.post("/v1/runs", json={"workflow": workflow, "input": inp})
        assert created.status_code == 201, created.text
        run = (await http.get(f"/v1/runs/{created.json()['id']}", params={"wait": PATIENCE})).json()
        events = (await http.get(f"/v1/runs/{run['id']}/events", params={"limit": 100})).json()["data"]
    return {**run, "events": events}


def _tools(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["data"] for e in run["events"] if e["type"] == "agent.tool"]


async def _labels(tmp_path: Path) -> dict[str, str]:
    """What the subprocess sandbox enforces on this machine (its info labels)."""
    sandbox = await SubprocessSandbox.create(tmp_path / "probe", "probe")
    try:
        return sandbox.info().labels
    finally:
        await sandbox.close()


def _skip_unless(labels: dict[str, str], key: str, value: str, why: str) -> None:
    if labels[key] != value:
        pytest.skip(f"{why}; here: {key}={labels[key]}")


# -- 1. nothing of the host but an allow-list ---------------------------------------------------

async def test_a_tenants_shell_cannot_read_another_tenants_run_input(tmp_path: Path):
    _skip_unless(await _labels(tmp_path), "filesystem", "allowlist",
                 "the allow-listed root needs a mount namespace (root, unshare)")
    data = tmp_path / "data"
    db = data / "orchestrator.db"
    pattern = f'"{SECRET[:8]}""{SECRET[8:]}"'  # the shell joins it; the command's text never holds it
    snoop = (f"cat {db} {db}-wal {db}-shm; echo listing; ls -A {data}; echo searching; "
             f"grep -rsl {pattern} / --exclude-dir=usr --exclude-dir=proc --exclude-dir=sys; echo scanned")
    async with service(tmp_path, [_turn("shell", command=snoop), FINAL]) as url:
        theirs = await _run(url, KEY_B, "echo", {"message": SECRET})
        assert theirs["status"] == "succeeded" and SECRET in json.dumps(theirs["input"])
        mine = await _run(url, KEY_A, "agent", {"task": "Look around."})
        # on the host the service's files are its own: the database, its WAL and shared memory
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE((data / "sandboxes").stat().st_mode) == 0o700
    assert mine["status"] == "succeeded", mine["error"]
    (shell, _final) = _tools(mine)
    assert SECRET not in json.dumps(mine), shell["content"]
    for path in (db, f"{db}-wal", f"{db}-shm"):
        assert f"{path}: No such file or directory" in shell["content"], shell["content"]
    # the data directory holds, as far as the command can see, only the way to its workspace
    listing = shell["content"].split("listing\n", 1)[1].split("searching\n", 1)[0]
    assert listing.split() == ["sandboxes"] and "scanned" in shell["content"], shell["content"]


# -- 2. any tree the sandbox can make is measured and deleted -----------------------------------

async def test_a_3000_level_tree_breaks_no_later_call_and_is_deleted(tmp_path: Path):
    trace = [_turn("write_file", path="deep.py", content=attacks.DEEP),
             _turn("shell", command=f"python3 deep.py {attacks.DEPTH}"),
             _turn("shell", command="echo still working"),
             _turn("read_file", path=attacks.deep_path()),
             _turn("list_files", path="d"),
             FINAL]
    async with service(tmp_path, trace) as url:
        run = await _run(url, KEY_A, "agent", {"task": "Dig.", "sandbox": {"wall_s": 120, "cpu_s": 60},
                                               "max_tokens_per_turn": 16384})  # the path is 6,000 characters
    assert run["status"] == "succeeded", run["error"]
    tools = _tools(run)
    assert [t["ok"] for t in tools] == [True] * 6, tools
    assert f"depth {attacks.DEPTH}" in tools[1]["content"] and "still working" in tools[2]["content"]
    assert tools[3]["content"] == "the bottom" and tools[4]["content"] == "d/d/"
    assert list((tmp_path / "data" / "sandboxes").iterdir()) == []  # the workspace (and its image) went


# -- 3. limits hold in total ---------------------------------------------------------------------

async def test_writing_past_workspace_mb_fails_at_the_write(tmp_path: Path):
    _skip_unless(await _labels(tmp_path), "workspace_limit", "filesystem",
                 "a workspace filesystem needs root, mkfs.ext4 and loop devices")
    fill = ("head -c 20000000 /dev/zero > a; echo rc=$?; head -c 20000000 /dev/zero > b; echo rc=$?; "
            "du -sk . | cut -f1")
    trace = [_turn("shell", command=fill), _turn("shell", command="head -c 1000000 /dev/zero > c; echo rc=$?"),
             FINAL]
    async with service(tmp_path, trace) as url:
        run = await _run(url, KEY_A, "agent", {"task": "Fill it.", "sandbox": {"workspace_mb": 8}})
    assert run["status"] == "succeeded", run["error"]
    first, second, _final = _tools(run)
    assert "No space left on device" in first["content"] and first["error"] == "workspace_full", first
    out = first["content"].split("stdout:\n", 1)[1].split()
    assert out[:2] == ["rc=1", "rc=1"] and int(out[2]) <= 8 << 10, out  # KiB held: never past 8 MiB
    assert "rc=1" in second["content"]  # still full for the next command


async def test_processes_together_cannot_exceed_memory_mb(tmp_path: Path):
    _skip_unless(await _labels(tmp_path), "cgroup_controllers", "cpu,memory,pids",
                 "a memory limit over all processes needs a memory cgroup (root)")
    trace = [_turn("write_file", path="hog.py", content=attacks.HOG),
             _turn("shell", command=attacks.hogs(4, 150)), FINAL]
    async with service(tmp_path, trace) as url:
        run = await _run(url, KEY_A, "agent", {"task": "Hog.", "sandbox": {"memory_mb": 256, "wall_s": 120}})
    assert run["status"] == "succeeded", run["error"]
    _write, hogs, _final = _tools(run)
    assert hogs["error"] == "memory", hogs
    assert all(total <= 256 for total in attacks.anon_totals_mb(hogs["content"])), hogs["content"]


# -- 4. tenants' ceilings --------------------------------------------------------------------------

async def test_a_run_above_its_tenants_ceiling_is_refused_and_not_written(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    config = Settings(database_url=f"sqlite+aiosqlite:///{data}/orchestrator.db", log_json=False,
                      api_keys={KEY_A: "tenant-a", KEY_B: "tenant-b"}, worker_enabled=False,
                      sandbox_root=str(data / "sandboxes"),
                      tenant_limits={"tenant-a": {"sandbox": {"memory_mb": 512, "workspace_mb": 64}}})
    asks = [(KEY_A, {"memory_mb": 1024}, "input.sandbox.memory_mb"),
            (KEY_A, {}, "input.sandbox.memory_mb"),  # the default, 1024, is above this tenant's ceiling too
            (KEY_A, {"memory_mb": 256, "workspace_mb": 65536}, "input.sandbox.workspace_mb"),
            (KEY_B, {"memory_mb": 65536}, "input.sandbox.memory_mb"),  # the default ceilings: 4096
            (KEY_B, {"cpu_s": 3600}, "input.sandbox.cpu_s")]
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        for key, sandbox, param in asks:
            r = await http.post("/v1/runs", headers={"Authorization": f"Bearer {key}"},
                                json={"workflow": "agent", "input": {"task": "x", "sandbox": sandbox}})
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert (error["type"], error["code"], error["param"]) == \
                ("invalid_request_error", "sandbox_limit_exceeded", param), error
            assert "at most" in error["message"]
        for key in (KEY_A, KEY_B):
            listed = await http.get("/v1/runs", headers={"Authorization": f"Bearer {key}"})
            assert listed.json()["data"] == []
        with sqlite3.connect(data / "orchestrator.db") as conn:
            assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)
        ok = await http.post("/v1/runs", headers={"Authorization": f"Bearer {KEY_A}"},
                             json={"workflow": "agent", "input": {"task": "x", "sandbox": {"memory_mb": 512,
                                                                                             "workspace_mb": 64}}})
        assert ok.status_code == 201, ok.text  # at the ceiling is allowed


def test_every_sandbox_limit_a_run_can_ask_for_has_a_ceiling():
    """A limit added to the agent's input without a tenant ceiling would be the tenant's to set."""
    assert set(SandboxSpec.model_fields) == set(SandboxCeilings.model_fields)
    for name, field in SandboxSpec.model_fields.items():
        default_ceiling = SandboxCeilings.model_fields[name].default
        assert field.default <= default_ceiling, name  # a run that sets nothing is never refused by default


async def test_the_database_files_are_private_whatever_the_umask(tmp_path: Path):
    """0600 files in a 0700 directory: also with umask 0, and for a database an older version
    left world-readable."""
    old = os.umask(0)
    try:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/data/orchestrator.db")
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x)"))
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "data").iterdir()}
        await engine.dispose()
        legacy = tmp_path / "legacy.db"
        legacy.touch(mode=0o644)
        create_engine(f"sqlite+aiosqlite:///{legacy}")
    finally:
        os.umask(old)
    assert modes == {"orchestrator.db": 0o600, "orchestrator.db-wal": 0o600, "orchestrator.db-shm": 0o600}
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE(legacy.stat().st_mode) == 0o600
