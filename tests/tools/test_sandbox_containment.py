"""A hostile command against the subprocess sandbox, with real processes and real limits.

Each test ends with the attack reported as a clear error (a failed command, an ``error`` name or
a ``SandboxError``) and with the service, i.e. this test process and this machine, unharmed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import secrets
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.tools import attacks
from tools.sandbox import Limits, SandboxError, SubprocessSandbox

ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(not ROOT, reason="uid drop, NPROC and namespaces need the service to run as root")


def _host_procs(uid: int | None = None, marker: str | None = None) -> list[int]:
    """Host pids owned by ``uid`` and/or whose command line starts with ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if uid is not None and os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if marker is None or cmd.startswith(marker.encode()):
            found.append(int(entry))
    return found


def _descendants(pids: list[int], root: int) -> list[int]:
    """Those of ``pids`` whose parent chain reaches ``root`` (not other tests' sandboxes on the host)."""
    def parent(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return 0
    out = []
    for pid in pids:
        p = pid
        while p > 1 and p != root:
            p = parent(p)
        if p == root:
            out.append(pid)
    return out


def _service_is_fine() -> None:
    """This process can still fork, exec and allocate, and nothing of the sandbox user is left."""
    assert subprocess.run(["true"], timeout=10).returncode == 0
    assert len(bytearray(64 << 20)) == 64 << 20
    if ROOT:  # ours only: other test processes on this machine may run sandboxes meanwhile
        deadline = time.monotonic() + 10
        while _descendants(_host_procs(uid=65534), os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _descendants(_host_procs(uid=65534), os.getpid()) == []


def _py(sandbox: SubprocessSandbox) -> str:
    return sandbox.python or "python3"


@pytest.fixture
async def sandbox(tmp_path: Path):
    sb = await SubprocessSandbox.create(tmp_path / "sandboxes", "hostile",
                                        Limits(wall_s=3, cpu_s=2, memory_bytes=256 << 20, file_bytes=1 << 20,
                                               processes=32, output_bytes=64 << 10))
    yield sb
    await sb.close()
    _service_is_fine()


# -- the filesystem ----------------------------------------------------------------------------

@needs_root
async def test_commands_cannot_write_outside_the_workspace(sandbox: SubprocessSandbox):
    name = f"orch-sandbox-test-{uuid.uuid4().hex[:8]}"
    targets = [f"/etc/{name}", f"/root/{name}", f"{REPO}/{name}", f"{sandbox.workspace.parent}/{name}"]
    script = "; ".join(f"echo pwned > {t}" for t in targets) + "; exit 0"
    r = await sandbox.exec(["sh", "-c", script])
    assert all(t in r.stderr for t in targets), r.stderr  # each one refused
    for t in targets:
        assert not os.path.exists(t), t
    r = await sandbox.exec(["sh", "-c", f"cp /bin/true /usr/bin/{name}"])
    assert r.exit_code != 0 and not os.path.exists(f"/usr/bin/{name}")


async def test_write_file_refuses_paths_outside_the_workspace(sandbox: SubprocessSandbox, tmp_path: Path):
    for path in ("../escaped", "a/../../escaped", "/etc/escaped", f"{tmp_path}/escaped", "a/../../../x"):
        with pytest.raises(SandboxError, match="not allowed"):
            await sandbox.write_file(path, b"x")
        with pytest.raises(SandboxError, match="not allowed"):
            await sandbox.read_file(path)
    with pytest.raises(SandboxError, match="not allowed"):
        await sandbox.list_files("..")
    assert not (sandbox.workspace.parent / "escaped").exists() and not Path("/etc/escaped").exists()
    assert not (tmp_path / "escaped").exists()


@pytest.fixture
def host_secret(tmp_path: Path):
    """A 0600 root file outside any sandbox, and the bytes it holds."""
    value = secrets.token_hex(16).encode()
    path = tmp_path / "host-secret.txt"
    path.write_bytes(value)
    path.chmod(0o600)
    yield path, value
    assert path.read_bytes() == value, "the host file was changed"


async def test_symlinks_planted_by_a_command_are_not_followed(sandbox: SubprocessSandbox, host_secret):
    secret_path, value = host_secret
    r = await sandbox.exec(["sh", "-c", f"ln -s {secret_path} leak && ln -s /etc/passwd passwd && ln -s / rootdir "
                                        f"&& ln -s {secret_path.parent} outside && mkdir d && ln -s ../.. d/up"])
    assert r.ok, r
    for path in ("leak", "passwd", "rootdir/etc/passwd", f"outside/{secret_path.name}", "d/up/x"):
        with pytest.raises(SandboxError, match="symbolic link|not a directory"):
            await sandbox.read_file(path)
    for path in ("leak", "passwd", f"outside/{secret_path.name}", "outside/new-file", "d/up/new-file"):
        with pytest.raises(SandboxError, match="symbolic link|not a directory"):
            await sandbox.write_file(path, b"overwritten")
    with pytest.raises(SandboxError, match="symbolic link|not a directory"):
        await sandbox.list_files("outside")
    listed = {e.path: e.is_dir for e in await sandbox.list_files(recursive=True)}
    assert listed["leak"] is False and listed["outside"] is False and "outside/host-secret.txt" not in listed
    assert not (secret_path.parent / "new-file").exists()


@needs_root
async def test_a_hard_link_to_a_host_file_is_not_read_or_written(sandbox: SubprocessSandbox, host_secret):
    secret_path, value = host_secret
    # protected_hardlinks stops the sandbox user from linking files it does not own; this link
    # is made by root, as if that protection were off, to check the service's own guard.
    r = await sandbox.exec(["ln", str(secret_path), "hl"])
    assert r.exit_code != 0
    if sandbox.info().labels["workspace_limit"] == "filesystem":
        # the workspace is a filesystem of its own: no hard link can join it to a host file
        with pytest.raises(OSError) as caught:
            os.link(secret_path, sandbox.workspace / "hl")
        assert caught.value.errno == errno.EXDEV
        return
    os.link(secret_path, sandbox.workspace / "hl")
    with pytest.raises(SandboxError, match="not a regular file of the workspace"):
        await sandbox.read_file("hl")
    with pytest.raises(SandboxError, match="not a regular file of the workspace"):
        await sandbox.write_file("hl", b"overwritten")


@needs_root
async def test_service_files_are_not_readable(sandbox: SubprocessSandbox):
    value = secrets.token_hex(16)
    var = REPO / "var"
    var.mkdir(exist_ok=True)
    files = [Path(f"/root/orch-sandbox-secret-{uuid.uuid4().hex[:8]}"),
             var / f"orch-sandbox-secret-{uuid.uuid4().hex[:8]}"]
    try:
        for f in files:
            f.write_text(value)
            f.chmod(0o600)
        r = await sandbox.exec(["sh", "-c", "; ".join(f"cat {f}" for f in files) + "; ls /root; exit 0"])
        assert value not in r.stdout + r.stderr
        # each read is refused: by permissions, or (the allow-listed root) because the file is
        # not there at all
        for f in files:
            line = next(x for x in r.stderr.splitlines() if x.startswith(f"cat: {f}"))
            assert line.endswith(("Permission denied", "No such file or directory")), r.stderr
        assert ("ls: cannot open directory '/root': Permission denied" in r.stderr
                or "ls: cannot access '/root': No such file or directory" in r.stderr)
    finally:
        for f in files:
            f.unlink(missing_ok=True)


@needs_root
async def test_other_programs_workspaces_are_out_of_sight(tmp_path: Path, sandbox: SubprocessSandbox):
    other = await SubprocessSandbox.create(tmp_path / "sandboxes", "neighbour")
    try:
        await other.write_file("notes.txt", b"neighbour's secret")  # owned by the same uid 65534
        r = await sandbox.exec(["sh", "-c", "ls ..; cat ../neighbour/notes.txt; exit 0"])
        assert "neighbour" not in r.stdout and "secret" not in r.stdout
        assert "No such file" in r.stderr
    finally:
        await other.close()


# -- the service's process and secrets ---------------------------------------------------------

async def test_the_services_environment_is_not_visible(sandbox: SubprocessSandbox, monkeypatch):
    secret = f"sk-{secrets.token_hex(12)}"
    monkeypatch.setenv("ORCH_SECRET_TEST", secret)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    me = os.getpid()
    script = (f"env; cat /proc/self/environ; cat /proc/1/environ; cat /proc/{me}/environ; "
              "for f in /proc/[0-9]*/environ; do cat $f; done; "
              f"cat /proc/{me}/cmdline; kill -0 {me} && echo CAN-SIGNAL; exit 0")
    r = await sandbox.exec(["sh", "-c", script])
    out = r.stdout + r.stderr
    assert secret not in out and "ORCH_SECRET_TEST" not in out
    assert "CAN-SIGNAL" not in r.stdout


# -- the network -------------------------------------------------------------------------------

async def test_no_network_connection_reaches_the_host(sandbox: SubprocessSandbox):
    if sandbox.info().labels["network_isolated"] != "true":
        pytest.skip("no network namespace here (needs root and unshare); commands have the host's network")
    accepted: list[object] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # sanity: the listener answers this process
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
        await asyncio.sleep(0.05)
        assert len(accepted) == 1
        code = ("import socket, sys\n"
                "for host in ('127.0.0.1', '1.1.1.1', 'example.com'):\n"
                "    try:\n"
                f"        socket.create_connection((host, {port} if host == '127.0.0.1' else 443), timeout=1)\n"
                "        print('CONNECTED', host)\n"
                "    except OSError as e:\n"
                "        print('refused', host, e.__class__.__name__)\n")
        r = await sandbox.exec([_py(sandbox), "-c", code])
        assert "CONNECTED" not in r.stdout and r.stdout.count("refused") == 3, r
        await asyncio.sleep(0.05)
        assert len(accepted) == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_unix_sockets_under_run_are_hidden(sandbox: SubprocessSandbox):
    """PostgreSQL's /run/postgresql socket (trust auth on a dev machine) must be out of reach too:
    a network namespace does not cover sockets in the filesystem; the tmpfs over /run does."""
    if sandbox.info().labels["mount_namespace"] != "true":
        pytest.skip("no mount namespace here (needs root): sockets under /run are reachable")
    path = Path(f"/run/orch-sandbox-test-{uuid.uuid4().hex[:8]}.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o777)
    srv.listen()
    srv.setblocking(False)
    try:
        code = (f"import socket\ns = socket.socket(socket.AF_UNIX)\n"
                f"try:\n    s.connect({str(path)!r}); print('CONNECTED')\n"
                f"except OSError as e:\n    print('refused', e.__class__.__name__)\n")
        r = await sandbox.exec([_py(sandbox), "-c", code])
        assert r.stdout.startswith("refused"), r
        with pytest.raises(BlockingIOError):
            srv.accept()
    finally:
        srv.close()
        path.unlink()


# -- resources ---------------------------------------------------------------------------------

@needs_root
async def test_fork_bomb_is_bounded_and_cleaned_up(sandbox: SubprocessSandbox):
    code = ("import os, time\nn = 0\nwhile True:\n"
            "    try:\n        os.fork(); n += 1\n    except OSError:\n        time.sleep(0.01)\n")
    task = asyncio.create_task(sandbox.exec([_py(sandbox), "-c", code], limits=Limits(wall_s=2, processes=24)))
    peak = 0
    while not task.done():
        peak = max(peak, len(_descendants(_host_procs(uid=65534), os.getpid())))
        await asyncio.sleep(0.05)
    r = task.result()
    assert r.error == "timeout" and r.exit_code is None
    assert 1 < peak <= 24
    _service_is_fine()


async def test_unbounded_allocation_fails_fast_in_the_command(sandbox: SubprocessSandbox):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = await sandbox.exec([_py(sandbox), "-c", "chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))\n"])
    assert r.exit_code not in (0, None) and "MemoryError" in r.stderr
    assert r.error == "memory"
    r = await sandbox.exec([_py(sandbox), "-c", "b = bytearray(8 << 30)"])
    assert r.exit_code != 0 and "MemoryError" in r.stderr
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB: < 100 MiB here


async def test_infinite_loop_hits_the_wall_timeout_and_its_group_is_gone(sandbox: SubprocessSandbox):
    r = await sandbox.exec(["sh", "-c", "setsid sleep 97.31 & sleep 97.32 & while :; do :; done"],
                           limits=Limits(wall_s=1, cpu_s=None))
    assert (r.error, r.timed_out, r.exit_code, r.ok) == ("timeout", True, None, False)
    await asyncio.sleep(0.1)
    if sandbox.info().labels["pid_namespace"] == "true":
        assert _host_procs(marker="sleep 97.3") == []  # the setsid one too
    else:
        assert _host_procs(marker="sleep 97.32") == []


async def test_cpu_loop_hits_the_cpu_limit(sandbox: SubprocessSandbox):
    """What the kernel did, not how long it took: on a loaded machine one CPU second can take
    many seconds of wall time (wall_s is far away for that reason)."""
    r = await sandbox.exec([_py(sandbox), "-c", "while True: pass"], limits=Limits(wall_s=120, cpu_s=1))
    assert (r.error, r.signal, r.timed_out, r.ok) == ("cpu", signal.SIGXCPU, False, False), r


async def test_printing_gigabytes_is_cut_and_killed(sandbox: SubprocessSandbox):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = await sandbox.exec(["yes", "all work and no play"])
    assert r.error == "output" and r.exit_code is None and r.stdout_truncated
    assert len(r.stdout.encode()) == 64 << 10 and r.stdout.startswith("all work and no play\n")
    r = await sandbox.exec([_py(sandbox), "-c", "import sys\nwhile True: sys.stderr.write('e' * 65536)"])
    assert r.error == "output" and r.stderr_truncated and len(r.stderr) == 64 << 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 << 10  # KiB
    # over the kept bytes but not far over: truncated, and not an error
    r = await sandbox.exec(["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x"])
    assert r.ok and r.stdout_truncated and len(r.stdout) == 64 << 10


async def test_writing_a_huge_file_hits_the_file_size_limit(sandbox: SubprocessSandbox):
    r = await sandbox.exec(["sh", "-c", "head -c 50000000 /dev/zero > big"])
    assert r.error == "file_size" and not r.ok, r
    assert (sandbox.workspace / "big").stat().st_size <= 1 << 20
    r = await sandbox.exec([_py(sandbox), "-c", "open('big2', 'wb').write(bytes(50_000_000))"])
    assert r.error == "file_size" and "File too large" in r.stderr
    r = await sandbox.exec(["dd", "if=/dev/zero", "of=big3", "bs=1M", "count=50"])
    assert r.error == "file_size" and r.signal == signal.SIGXFSZ


# -- what the sandbox sees of the host: an allow-list ------------------------------------------

def _needs_label(sandbox: SubprocessSandbox, label: str, want: str, why: str) -> None:
    if sandbox.info().labels[label] != want:
        pytest.skip(f"{why} (labels: {sandbox.info().labels})")


async def test_only_an_allow_list_of_the_host_is_visible(sandbox: SubprocessSandbox, tmp_path: Path):
    """A data directory nobody listed (here: a world-readable SQLite file, as the service's own
    once was) is not there at all, nor is the repository, /root, /etc/shadow or the host's
    accounts; the runtime is there, read-only, and /tmp is private and writable."""
    _needs_label(sandbox, "filesystem", "allowlist", "no mount namespace here (needs root): the host's tree is visible")
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "orchestrator.db").write_text("tenant B's input")
    (data / "orchestrator.db").chmod(0o644)
    script = (f"cat {data}/orchestrator.db {REPO}/README.md /etc/shadow; ls /; echo --; ls /dev; echo --; "
              "cut -d: -f1 /etc/passwd; echo --; touch /usr/x /etc/x; echo private > /tmp/t && cat /tmp/t; "
              "awk 'BEGIN { print \"awk ok\" }'; python3 -c 'import json, sqlite3, ssl; print(\"python ok\")'")
    r = await sandbox.exec(["sh", "-c", script])
    assert "tenant B" not in r.stdout and "Agentic orchestrator" not in r.stdout
    for path in (f"{data}/orchestrator.db", f"{REPO}/README.md", "/etc/shadow"):
        assert f"cat: {path}: No such file or directory" in r.stderr, r.stderr
    top, dev, users, rest = (part.split() for part in r.stdout.split("--\n"))
    runtime = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"}
    assert set(top) <= runtime | {sandbox.workspace.parts[1]} and {"usr", "etc", "proc", "tmp"} <= set(top), top
    assert set(dev) <= {"fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom",
                        "zero"}, dev
    assert set(users) <= {"root", "nobody", "sandbox"}, users
    assert "Read-only file system" in r.stderr
    assert rest == ["private", "awk", "ok", "python", "ok"], r


# -- limits over the whole sandbox: cgroups and the workspace's own filesystem ------------------

@pytest.fixture
async def roomy(tmp_path: Path):
    """A sandbox with room per process (each hog fits its RLIMIT_AS) but not for all together."""
    sb = await SubprocessSandbox.create(tmp_path / "sandboxes", "roomy",
                                        Limits(wall_s=60, cpu_s=30, memory_bytes=256 << 20, workspace_bytes=8 << 20))
    await sb.write_file("hog.py", attacks.HOG.encode())
    await sb.write_file("burn.py", attacks.BURN.encode())
    yield sb
    await sb.close()
    _service_is_fine()


async def test_processes_together_cannot_exceed_the_memory_limit(roomy: SubprocessSandbox):
    """Four processes of 150 MiB each, each under its 256 MiB address-space limit: the memory
    cgroup holds all of them to 256 MiB together (the OOM killer acts inside the sandbox)."""
    _needs_label(roomy, "cgroup_controllers", "cpu,memory,pids", "no memory cgroup here (needs root and cgroups)")
    r = await roomy.exec(["sh", "-c", attacks.hogs(4, 150)])
    assert r.error == "memory", r
    totals = attacks.anon_totals_mb(r.stdout)
    assert all(t <= 256 for t in totals), totals
    r = await roomy.exec(["sh", "-c", attacks.hogs(1, 150)])  # alone it fits: the limit is a total
    assert r.ok and len(attacks.anon_totals_mb(r.stdout)) == 1, r


async def test_processes_together_cannot_exceed_the_cpu_time(roomy: SubprocessSandbox):
    """Four processes that each burn 0.8 CPU s, under RLIMIT_CPU = 1 s each: the command is
    stopped once they have used more than 1 s (+ the 1 s grace) together."""
    _needs_label(roomy, "cgroup_controllers", "cpu,memory,pids", "no CPU accounting cgroup here (needs root)")
    r = await roomy.exec(["sh", "-c", attacks.burners(4, 0.8)], limits=Limits(wall_s=120, cpu_s=1))
    assert (r.error, r.exit_code) == ("cpu", None), r
    assert r.stdout.count("burnt") < 4 and "finished" not in r.stdout


@needs_root
async def test_the_process_limit_is_the_sandboxs_not_the_uids(tmp_path: Path):
    """RLIMIT_NPROC counts every process of uid 65534, all sandboxes together: one program's
    fork bomb would stop every other program's commands. The pids cgroup counts its own."""
    bomb = await SubprocessSandbox.create(tmp_path / "sandboxes", "bomb", Limits(wall_s=60, processes=12))
    other = await SubprocessSandbox.create(tmp_path / "sandboxes", "other", Limits(wall_s=30, processes=12))
    try:
        _needs_label(bomb, "cgroup_controllers", "cpu,memory,pids", "no pids cgroup here")
        code = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"
        task = asyncio.create_task(bomb.exec([_py(bomb), "-c", code]))
        while len(_descendants(_host_procs(uid=65534), os.getpid())) < 12 and not task.done():
            await asyncio.sleep(0.05)
        r = await other.exec(["sh", "-c", "sleep 0 & sleep 0 & wait; echo forked"])
        assert r.ok and r.stdout == "forked\n", r
        await bomb.kill()
        assert (await task).error == "killed"
    finally:
        await bomb.close()
        await other.close()
    _service_is_fine()


async def test_writing_past_the_workspace_size_fails_at_the_write(roomy: SubprocessSandbox):
    """The workspace is a filesystem of workspace_bytes: the write itself fails (ENOSPC), and
    two commands together cannot hold more than one could."""
    _needs_label(roomy, "workspace_limit", "filesystem", "no workspace filesystem here (needs root, mkfs.ext4, loop)")
    limit = 8 << 20
    for name in ("a", "b"):
        r = await roomy.exec(["sh", "-c", f"head -c 20000000 /dev/zero > {name}"], limits=Limits(file_bytes=None))
        assert r.exit_code != 0 and "No space left on device" in r.stderr and r.error == "workspace_full", r
        assert await roomy.disk_bytes() <= limit
    with pytest.raises(SandboxError, match="no space left"):
        await roomy.write_file("c", b"x" * (1 << 20))
    assert (await roomy.exec(["rm", "a", "b"])).ok
    assert (await roomy.exec(["sh", "-c", "head -c 4000000 /dev/zero > c"])).ok  # the space is back


async def test_a_3000_level_tree_is_measured_listed_read_and_deleted(tmp_path: Path):
    """Accounting, listing, reading and deletion walk iteratively, by descriptor: a tree of any
    depth (paths far past PATH_MAX) neither breaks later commands nor outlives the sandbox."""
    sb = await SubprocessSandbox.create(tmp_path / "sandboxes", "deep", Limits(wall_s=120, cpu_s=60))
    await sb.write_file("deep.py", attacks.DEEP.encode())
    r = await sb.exec([_py(sb), "deep.py", str(attacks.DEPTH)])
    assert r.ok and r.stdout == f"depth {attacks.DEPTH}\n", r
    assert (await sb.exec(["true"])).ok
    assert await sb.disk_bytes() >= attacks.DEPTH * 512
    listed = await sb.list_files("d", recursive=True, limit=50)
    assert [e.path for e in listed][:3] == ["d/d", "d/d/d", "d/d/d/d"]
    assert await sb.read_file(attacks.deep_path()) == b"the bottom"
    await sb.close()
    assert not sb.workspace.exists() and list(sb.workspace.parent.iterdir()) == []
