"""The subprocess sandbox doing its ordinary work, with real processes: commands, files, limits
that a well-behaved tool meets, kill and close. Attacks are in test_sandbox_containment.py."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tools.sandbox import Limits, SandboxError, SubprocessSandbox

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="dropping to uid 65534 needs the service to run as root")


def _procs_matching(marker: str) -> list[int]:
    """Host pids whose command line starts with ``marker`` (arguments joined by spaces)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().replace(b"\0", b" ").startswith(marker.encode()):
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture
async def sandbox(tmp_path: Path):
    sb = await SubprocessSandbox.create(tmp_path / "sandboxes", "prog-1", Limits(wall_s=10, cpu_s=5))
    yield sb
    await sb.close()


async def test_runs_in_its_own_workspace(sandbox: SubprocessSandbox):
    r = await sandbox.exec(["sh", "-c", "pwd; echo $HOME; echo $TMPDIR; touch made-here"])
    assert r.ok, r
    ws = str(sandbox.workspace)
    assert r.stdout.split() == [ws, ws, f"{ws}/.tmp"]
    assert (sandbox.workspace / "made-here").exists()
    assert sandbox.workspace.parent == sandbox.workspace.parent.parent / "sandboxes"


@needs_root
async def test_runs_as_nobody_in_a_private_workspace(sandbox: SubprocessSandbox):
    r = await sandbox.exec(["id", "-u"])
    assert r.ok and r.stdout.strip() == "65534"
    st = sandbox.workspace.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o700)
    info = sandbox.info()
    assert info.kind == "subprocess" and info.labels["uid"] == "65534" and info.labels["uid_dropped"] == "true"
    # pytest's tmp_path sits under a 0700 directory the sandbox user could not traverse: the
    # mount namespace rebinds the workspace at its own path, so commands still reach it.
    assert any(not (p.stat().st_mode & stat.S_IXOTH) for p in sandbox.workspace.parents if p != Path("/"))
    assert (await sandbox.exec(["sh", "-c", 'echo ok > "$TMPDIR/t"; cat "$HOME/.tmp/t"'])).stdout == "ok\n"
    assert (await sandbox.exec(["rm", "-r", ".tmp"])).ok
    assert (await sandbox.exec(["sh", "-c", 'touch "$TMPDIR/again"'])).ok  # put back for the next command


async def test_environment_is_scrubbed_plus_callers(sandbox: SubprocessSandbox):
    r = await sandbox.exec(["env"], env={"FOO": "bar"})
    env = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(sandbox.workspace), "LANG": "C.UTF-8",
                   "TMPDIR": f"{sandbox.workspace}/.tmp", "PYTHONDONTWRITEBYTECODE": "1", "FOO": "bar"}


async def test_stdin_exit_codes_and_missing_commands(sandbox: SubprocessSandbox):
    interpreter = sandbox.python or "python3"
    r = await sandbox.exec([interpreter, "-"], stdin=b"import sys\nprint(sum(range(10)))\nsys.exit(3)\n")
    assert (r.exit_code, r.stdout, r.error, r.ok) == (3, "45\n", None, False)
    r = await sandbox.exec(["sh", "-c", "echo oops >&2; exit 0"])
    assert r.ok and r.stderr == "oops\n"
    r = await sandbox.exec(["no-such-command-xyz"])
    assert r.exit_code == 127 and "command not found" in r.stderr
    with pytest.raises(SandboxError):
        await sandbox.exec([])


async def test_python_for_tools_is_runnable(sandbox: SubprocessSandbox):
    assert sandbox.python is not None, "no python3 the sandbox user can run on the sandbox PATH"
    r = await sandbox.exec([sandbox.python, "-c", "import json, sqlite3; print('py ok')"])
    assert r.ok and r.stdout == "py ok\n", r


async def test_files_round_trip_and_commands_can_edit_them(sandbox: SubprocessSandbox):
    await sandbox.write_file("src/pkg/mod.py", b"x = 1\n")
    assert await sandbox.read_file("src/pkg/mod.py") == b"x = 1\n"
    assert await sandbox.read_file("./src//pkg/mod.py") == b"x = 1\n"
    if ROOT:
        for p in ("src", "src/pkg", "src/pkg/mod.py"):
            assert (sandbox.workspace / p).stat().st_uid == 65534
    r = await sandbox.exec(["sh", "-c", "echo 'y = 2' >> src/pkg/mod.py && mkdir -p out && echo hi > out/r.txt"])
    assert r.ok, r
    assert await sandbox.read_file("src/pkg/mod.py") == b"x = 1\ny = 2\n"
    assert await sandbox.read_file("out/r.txt") == b"hi\n"
    await sandbox.write_file("src/pkg/mod.py", b"z")  # replace, not append
    assert await sandbox.read_file("src/pkg/mod.py") == b"z"

    entries = await sandbox.list_files(recursive=True)
    assert [(e.path, e.is_dir) for e in entries if not e.path.startswith(".tmp")] == [
        ("out", True), ("src", True), ("out/r.txt", False), ("src/pkg", True), ("src/pkg/mod.py", False)]
    assert [e.path for e in await sandbox.list_files("src")] == ["src/pkg"]
    assert len(await sandbox.list_files(recursive=True, limit=2)) == 2

    with pytest.raises(SandboxError, match="no such file"):
        await sandbox.read_file("missing.txt")
    with pytest.raises(SandboxError, match="is a directory"):
        await sandbox.read_file("src")
    with pytest.raises(SandboxError, match="too large"):
        await sandbox.read_file("src/pkg/mod.py", max_bytes=0)
    with pytest.raises(SandboxError, match="file size limit"):
        await sandbox.write_file("big.bin", b"\0" * ((sandbox.limits.file_bytes or 0) + 1))


async def test_background_processes_end_with_the_command(sandbox: SubprocessSandbox):
    marker = "31.4159"
    task = asyncio.create_task(
        sandbox.exec(["sh", "-c", f"sleep {marker} & setsid sleep {marker} & sleep 0.5; echo started"]))
    seen: set[int] = set()
    while not task.done():
        seen.update(_procs_matching(f"sleep {marker}"))
        await asyncio.sleep(0.05)
    r = task.result()
    assert r.ok and r.stdout == "started\n"
    assert len(seen) == 2  # both ran, one in its own session
    await asyncio.sleep(0.2)
    assert _procs_matching(f"sleep {marker}") == []


async def test_kill_cancels_running_commands_and_the_sandbox_stays(sandbox: SubprocessSandbox):
    task = asyncio.create_task(sandbox.exec(["sleep", "27.18"]))
    await asyncio.sleep(0.3)
    assert _procs_matching("sleep 27.18")
    await sandbox.kill()
    r = await asyncio.wait_for(task, 5)
    assert (r.error, r.exit_code, r.ok) == ("killed", None, False)
    assert _procs_matching("sleep 27.18") == []
    assert (await sandbox.exec(["true"])).ok


async def test_commands_run_concurrently(sandbox: SubprocessSandbox):
    """Each command waits until all four have started: only concurrent ones can all finish."""
    wait_for_all = 'touch "started.$0"; while [ "$(ls started.* | wc -l)" -lt 4 ]; do sleep 0.05; done; echo all'
    results = await asyncio.gather(*(sandbox.exec(["sh", "-c", wait_for_all, str(i)], limits=Limits(wall_s=60))
                                     for i in range(4)))
    assert [(r.ok, r.stdout) for r in results] == [(True, "all\n")] * 4, results


async def test_workspace_full_is_reported_and_the_files_stay(tmp_path: Path):
    """With a workspace filesystem the write fails when it is full; without one (not root) it is
    measured after the command. Either way the command's error says so and the files stay."""
    sb = await SubprocessSandbox.create(tmp_path / "sb", "p", Limits(wall_s=10, workspace_bytes=1 << 20))
    try:
        r = await sb.exec(["sh", "-c", "head -c 3000000 /dev/urandom > blob && echo written"])
        if sb.info().labels["workspace_limit"] == "filesystem":
            assert (r.exit_code, r.error, r.stdout) == (1, "workspace_full", ""), r
            assert "No space left on device" in r.stderr and await sb.disk_bytes() <= 1 << 20
        else:
            assert (r.exit_code, r.error, r.stdout) == (0, "workspace_full", "written\n")
            assert await sb.disk_bytes() >= 3_000_000 and sb.info().disk_bytes >= 3_000_000
        assert (sb.workspace / "blob").exists()
        r = await sb.exec(["rm", "blob"])
        assert r.ok and await sb.disk_bytes() < 1 << 20
    finally:
        await sb.close()


async def test_close_deletes_the_workspace_and_is_idempotent(tmp_path: Path):
    sb = await SubprocessSandbox.create(tmp_path / "sb", "p")
    await sb.exec(["sh", "-c", "mkdir -p a/b && echo x > a/b/c && chmod 000 a/b"])
    task = asyncio.create_task(sb.exec(["sleep", "16.18"]))
    await asyncio.sleep(0.2)
    await sb.close()
    await sb.close()
    assert not sb.workspace.exists()
    assert (await asyncio.wait_for(task, 5)).error == "killed"
    with pytest.raises(SandboxError, match="closed"):
        await sb.exec(["true"])
    with pytest.raises(SandboxError, match="closed"):
        await sb.read_file("a")


async def test_ids_that_are_not_file_names_stay_under_the_root(tmp_path: Path):
    root = tmp_path / "sb"
    sb = await SubprocessSandbox.create(root, "../../etc/evil id")
    try:
        assert sb.workspace.parent == root and sb.id == "../../etc/evil id"
        assert (await sb.exec(["true"])).ok
    finally:
        await sb.close()


async def test_loopback_inside_the_sandbox_works(sandbox: SubprocessSandbox):
    code = ("import socket\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "c = socket.create_connection(s.getsockname(), timeout=2); a, _ = s.accept()\n"
            "c.sendall(b'ping'); print(a.recv(4).decode())\n")
    r = await sandbox.exec([sandbox.python or "python3", "-c", code])
    assert r.ok and r.stdout == "ping\n", r


async def test_cancelling_exec_kills_the_command(sandbox: SubprocessSandbox):
    """A cancelled run cancels its tool call: the command must not keep running."""
    task = asyncio.create_task(sandbox.exec(["sleep", "23.45"]))
    await asyncio.sleep(0.3)
    assert _procs_matching("sleep 23.45")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    assert _procs_matching("sleep 23.45") == []


async def test_labels_say_which_mechanisms_are_in_force(sandbox: SubprocessSandbox):
    f, labels = sandbox.features, sandbox.info().labels
    assert labels["filesystem"] == ("allowlist" if f.mnt else "host")
    assert labels["cgroup"] == (f.cgroups or "none") and labels["cgroup"] in ("v1", "v2", "v1+v2", "none")
    assert set(labels["cgroup_controllers"].split(",")) <= {"", "cpu", "memory", "pids"}
    assert labels["workspace_limit"] == ("filesystem" if f.volume else "accounting")
    if not ROOT:  # what an unprivileged service cannot have
        assert (labels["filesystem"], labels["workspace_limit"]) == ("host", "accounting")


async def test_the_sandbox_root_and_workspace_images_are_private(sandbox: SubprocessSandbox):
    assert (await sandbox.exec(["true"])).ok  # first use: the workspace's filesystem is made
    root = sandbox.workspace.parent
    assert stat.S_IMODE(root.stat().st_mode) == (0o700 if sandbox.features.mnt else 0o711)
    assert stat.S_IMODE(sandbox.workspace.stat().st_mode) == 0o700
    images = [p for p in root.iterdir() if p.name.endswith(".img")]
    assert [stat.S_IMODE(p.stat().st_mode) for p in images] == ([0o600] if sandbox.features.volume else [])


async def test_a_sandbox_made_again_finds_its_workspace(tmp_path: Path):
    """A run resumed after a restart gets a new sandbox object for the same id: the files are
    there whether the workspace's filesystem is still mounted (the service process died) or
    not (a new container: the image is mounted again)."""
    first = await SubprocessSandbox.create(tmp_path / "sb", "run-1")
    assert (await first.exec(["sh", "-c", "echo kept > notes.txt"])).ok
    again = await SubprocessSandbox.create(tmp_path / "sb", "run-1")  # `first` was never closed
    assert await again.read_file("notes.txt") == b"kept\n"
    if again.features.volume:
        assert os.path.ismount(again.workspace)
        assert subprocess.run(["umount", str(again.workspace)]).returncode == 0
        assert not os.path.ismount(again.workspace)
        again = await SubprocessSandbox.create(tmp_path / "sb", "run-1")
        assert (await again.exec(["cat", "notes.txt"])).stdout == "kept\n"
    await again.close()
    assert list((tmp_path / "sb").iterdir()) == []
