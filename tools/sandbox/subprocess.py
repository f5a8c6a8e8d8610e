"""A sandbox made of a workspace directory and short-lived, confined child processes.

Each command is started by ``_launch.py`` (see there for the order of steps): when the service
runs as root, in fresh network, PID and mount namespaces, in a new root that holds only an
allow-list of the host (``rootfs.py``), as an unprivileged uid (65534, nobody), in the sandbox's
cgroups (``cgroups.py``: memory, processes and CPU over all its commands' processes together),
with rlimits and a scrubbed environment; the workspace is then a filesystem of its own size
(``volume.py``). The service keeps the wall clock, the output cap, the sandbox's total CPU time
and the disk accounting. File operations run in the service (as root), so they never follow a
symlink and never leave the workspace. What is and is not enforced is in docs/sandboxes.md.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.sandbox import tree
from tools.sandbox import volume as volumes
from tools.sandbox.base import ExecResult, FileEntry, Limits, Sandbox, SandboxError, SandboxInfo
from tools.sandbox.cgroups import SandboxCgroup, host_layout
from tools.sandbox.rootfs import root_plan
from tools.sandbox.volume import Volume, VolumeError

log = logging.getLogger(__name__)

LAUNCHER = str(Path(__file__).with_name("_launch.py"))
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
NOBODY = 65534
OUTPUT_KILL_FACTOR = 16          # output beyond 16x the kept bytes: the command is killed
CPU_POLL_S = 0.25                # how often a command's total CPU time is read from its cgroup
CPU_GRACE_S = 1.0                # over cpu_s by this much in total: killed (as RLIMIT_CPU's hard limit)
_CHUNK = 1 << 16
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
_PROBE_CODE = "import sys; print(sys.executable)"
_KILLED = ("timeout", "output", "cpu", "killed")  # reasons the service killed a command for


@dataclass(frozen=True)
class Features:
    """What this machine lets the sandbox enforce; probed once per (interpreter, uid)."""

    net: bool = False
    pid: bool = False
    mnt: bool = False            # with it, commands see only the allow-listed root
    uid: int | None = None       # the uid commands run as when it differs from ours
    gid: int | None = None
    python: str | None = None    # a python3 the sandbox user can run
    cgroups: str = ""            # "v1", "v2", "v1+v2" (per controller) or "": none usable
    volume: bool = False         # workspaces are filesystems of their own size
    notes: tuple[str, ...] = ()


def _run_launcher(spec: dict, argv: list[str], cwd: str) -> dict:
    """Run one command through the launcher synchronously (used by the probe only); its status."""
    rfd, wfd = os.pipe()
    try:
        subprocess.run([sys.executable, "-I", "-S", LAUNCHER, json.dumps(spec), str(wfd), "--", *argv],
                       cwd=cwd, env=_base_env(cwd), capture_output=True, timeout=30, pass_fds=(wfd,))
    finally:
        os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        return _parse_status(f.read())


def _probe_isolation(stage: str, uid: int | None, gid: int | None, python: str | None,
                     notes: list[str]) -> tuple[dict, dict]:
    """The namespaces (and the new root) a command gets here, trying less each time one fails;
    the launcher spec that worked and the features it reported."""
    workspace = os.path.join(stage, "w")
    os.mkdir(workspace)
    spec: dict = {"uid": uid, "gid": gid, "net": "try", "pid": "try", "mnt": "try", "stage": stage,
                  "workspace": workspace, "root": root_plan(workspace, network=False, python=python, uid=uid, gid=gid)}
    status = _run_launcher(spec, ["python3", "-c", _PROBE_CODE], workspace)
    if "setup_error" in status:
        notes.append(f"mount namespace unavailable: {status['setup_error']}")
        spec.update(mnt="off")
        status = _run_launcher(spec, ["python3", "-c", _PROBE_CODE], workspace)
    if "setup_error" in status:
        notes.append(f"namespaces unavailable: {status['setup_error']}")
        spec.update(net="off", pid="off")
        status = _run_launcher(spec, ["python3", "-c", _PROBE_CODE], workspace)
    if status.get("exit") != 0:
        notes.append("no python3 on the sandbox PATH runs as the sandbox user")
    return spec, status


def _probe_cgroups(spec: dict, notes: list[str]) -> str:
    """The cgroup layout, if the launcher can put a command in a group made for it."""
    layout = host_layout()
    if not layout.dirs:
        return ""
    group = SandboxCgroup(layout, f"probe-{os.getpid()}")
    try:
        group.create()
        status = _run_launcher({**spec, "cgroups": group.procs_files()}, ["true"], spec["workspace"])
    except OSError as exc:
        status = {"setup_error": str(exc)}
    finally:
        group.remove()
    if status.get("exit") != 0:
        notes.append(f"cgroups unusable: {status.get('setup_error', status)}")
        return ""
    return layout.version


@functools.cache
def probe(uid: int | None, gid: int | None) -> Features:
    """Find out once what this machine lets a sandbox enforce: which namespaces work, whether
    cgroups and workspace filesystems can be made, which python3 the sandbox user can run.

    Cached for the life of the process: the answer is a property of the machine and of our
    privileges, and probing costs a few process starts.
    """
    notes: list[str] = []
    candidate = shutil.which("python3", path=SANDBOX_PATH)
    with tempfile.TemporaryDirectory(prefix="orch-sandbox-probe-") as stage:
        spec, status = _probe_isolation(stage, uid, gid, candidate, notes)
        cgroups = _probe_cgroups(spec, notes)
    feats = status.get("features", {})
    found = Features(net=bool(feats.get("net")), pid=bool(feats.get("pid")), mnt=bool(feats.get("mnt")),
                     uid=uid, gid=gid, python=candidate if status.get("exit") == 0 else None,
                     cgroups=cgroups, volume=volumes.available(), notes=tuple(notes))
    log.info("sandbox probe: network namespace %s, pid namespace %s, allow-listed root %s, uid %s, cgroups %s, "
             "workspace filesystems %s, python %s%s", found.net, found.pid, found.mnt, uid, cgroups or "none",
             found.volume, found.python, "".join(f"; {n}" for n in notes))
    return found


def _base_env(workspace: str) -> dict[str, str]:
    """The whole environment a command starts with: never the service's own (keys, DSNs)."""
    return {"PATH": SANDBOX_PATH, "HOME": workspace, "LANG": "C.UTF-8", "TMPDIR": f"{workspace}/.tmp",
            "PYTHONDONTWRITEBYTECODE": "1"}


def _parse_status(raw: bytes) -> dict:
    status: dict = {}
    for line in raw.decode(errors="replace").splitlines():
        try:
            status.update(json.loads(line))
        except ValueError:
            pass
    return status


def _read_nonblocking(fd: int) -> bytes:
    """Whatever is in the pipe now, then close it; never waits for a writer."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


def _first_untraversable(workspace: Path, uid: int | None) -> Path | None:
    """The highest ancestor of the workspace that ``uid`` may not search (needs o+x), if any."""
    if uid is None:
        return None
    for anc in reversed(workspace.parents):
        if anc == Path("/"):
            continue
        st = anc.stat()
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return anc
    return None


def _workspace_name(sandbox_id: str) -> str:
    """A directory name for any id: itself when it is a safe name, else a digest of it."""
    if _SAFE_ID.fullmatch(sandbox_id) and sandbox_id not in (".", ".."):
        return sandbox_id
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", sandbox_id)[:40].lstrip(".") or "id"
    return f"{slug}-{hashlib.sha256(sandbox_id.encode()).hexdigest()[:16]}"


def _group_name(workspace: Path) -> str:
    """The sandbox's cgroup name: unique per workspace path on the host (services with other
    roots may use the same ids), the same for a service restarted on the same root."""
    return f"{workspace.name}-{hashlib.sha256(str(workspace).encode()).hexdigest()[:12]}"


def _sandbox_user(run_as: int | None) -> tuple[int | None, int | None]:
    """The uid and gid commands run as; (None, None) when they keep ours (we are not root)."""
    if run_as is None or os.geteuid() != 0:
        return None, None
    try:
        return run_as, pwd.getpwuid(run_as).pw_gid
    except KeyError:
        return run_as, run_as


def _split(path: str) -> list[str]:
    """Workspace-relative parts of ``path``; absolute paths and ``..`` are refused."""
    if "\x00" in path:
        raise SandboxError("path contains a NUL byte")
    if path.startswith("/"):
        raise SandboxError(f"{path}: outside the workspace (absolute paths are not allowed; "
                           f"use a path relative to the workspace)")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SandboxError(f"{path}: outside the workspace ('..' is not allowed)")
    return parts


@dataclass(eq=False)
class _Run:
    """One command in flight: what the service may have done to it."""

    proc: asyncio.subprocess.Process
    reason: str | None = None            # "timeout" | "output" | "cpu" | "killed": why we killed it

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL the command's process group; ``reason`` (the first one given) becomes its error."""
        if self.reason is None:
            self.reason = reason
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class _Capture:
    """One output stream: the first ``keep`` bytes, the count of everything."""

    keep: int
    data: bytearray = field(default_factory=bytearray)
    total: int = 0

    @property
    def truncated(self) -> bool:
        return self.total > self.keep


@dataclass(frozen=True)
class _Aftermath:
    """What the kernel's accounts say about a finished command, besides its exit status."""

    disk: int                # bytes the workspace holds
    oom_kills: int           # processes the OOM killer ended in the sandbox's memory cgroup meanwhile
    volume_full: bool        # the workspace's filesystem has no free block left


class SubprocessSandbox(Sandbox):
    """One program's workspace on this machine, its commands run by the launcher.

    Build it with :meth:`create`. ``python`` is a python3 the sandbox user can run (the tools'
    interpreter), or None when there is none on the sandbox PATH.
    """

    kind = "subprocess"

    def __init__(self, sandbox_id: str, workspace: Path, limits: Limits, features: Features,
                 cgroup: SandboxCgroup | None, volume: Volume | None) -> None:
        self.id = sandbox_id
        self.limits = limits
        self.workspace = workspace
        self.features = features
        self.python = features.python
        self._uid = features.uid
        self._gid = features.gid
        self._cgroup = cgroup
        self._volume = volume
        self._running: set[_Run] = set()
        self._disk = 0
        self._prepared = False
        self._prepare_lock = asyncio.Lock()
        self._closed = False
        self._close_lock = asyncio.Lock()

    @classmethod
    async def create(cls, root: Path | str, sandbox_id: str, limits: Limits = Limits(),
                     run_as: int | None = NOBODY) -> SubprocessSandbox:
        """Make the workspace ``root/<id>`` (mode 0700, owned by the sandbox user), its cgroups,
        and probe the machine.

        ``run_as`` is the uid commands run as; it applies only when the service runs as root
        (otherwise commands run as the service's own user). An existing workspace of the same id
        is reused (its filesystem mounted again if it has one), so a run resumed after a restart
        finds its files.
        """
        uid, gid = _sandbox_user(run_as)
        features = await asyncio.to_thread(probe, uid, gid)
        root = Path(root).absolute()  # noqa: ASYNC240 - reads the working directory, no file
        workspace = root / _workspace_name(sandbox_id)
        # 0700: nobody but the service lists or enters the root. Without a new root the sandbox
        # user must cross it to reach its workspace (0711: search, no listing).
        await asyncio.to_thread(cls._make_workspace, root, workspace, uid, gid, 0o700 if features.mnt else 0o711)
        blocked = None if features.mnt else _first_untraversable(workspace, uid)
        if blocked is not None:
            raise SandboxError(f"the sandbox user (uid {uid}) cannot reach {workspace}: {blocked} is not "
                               f"searchable by others; use a sandbox root whose parents are mode o+x")
        cgroup = SandboxCgroup(host_layout(), _group_name(workspace)) if features.cgroups else None
        if cgroup is not None:
            await asyncio.to_thread(cgroup.create)
        volume = Volume(root / f".{workspace.name}.img", workspace) if features.volume else None
        return cls(sandbox_id, workspace, limits, features, cgroup, volume)

    @staticmethod
    def _make_workspace(root: Path, workspace: Path, uid: int | None, gid: int | None, root_mode: int) -> None:
        try:
            root.mkdir(parents=True, mode=root_mode)
            root.chmod(root_mode)  # mkdir's mode is masked by the umask
        except FileExistsError:
            pass  # another sandbox made it, or the operator did (and chose its mode)
        try:
            os.mkdir(workspace, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(workspace).st_mode):
                raise SandboxError(f"{workspace} exists and is not a directory") from None

    async def _ready(self) -> None:
        """Make the workspace usable, once: its filesystem mounted (made at the size the limits
        say now, on first use), owner, mode and ``$TMPDIR``."""
        if self._prepared:
            return
        async with self._prepare_lock:
            if not self._prepared:
                await asyncio.to_thread(self._prepare)
                self._prepared = True

    def _prepare(self) -> None:
        size = self.limits.workspace_bytes
        if self._volume is not None and size is not None:
            try:
                self._volume.ensure(size, self._uid, self._gid)
            except (OSError, VolumeError) as exc:
                raise SandboxError(f"could not make the workspace's filesystem: {exc}") from exc
        os.chmod(self.workspace, 0o700, follow_symlinks=False)
        if self._uid is not None:
            os.chown(self.workspace, self._uid, self._gid if self._gid is not None else self._uid,
                     follow_symlinks=False)
        self._ensure_tmp()

    # -- commands ------------------------------------------------------------------------------

    def _rlimits(self, limits: Limits) -> dict[str, tuple[int, int]]:
        rl: dict[str, tuple[int, int]] = {"RLIMIT_CORE": (0, 0)}
        if limits.cpu_s is not None:
            rl["RLIMIT_CPU"] = (limits.cpu_s, limits.cpu_s + 1)  # SIGXCPU first, SIGKILL a second later
        # RLIMIT_NPROC counts every process of the uid, all sandboxes together: only where no
        # pids cgroup counts the sandbox's own
        nproc = None if self._cgroup is not None and "pids" in self._cgroup.layout.dirs else limits.processes
        for name, value in (("RLIMIT_AS", limits.memory_bytes), ("RLIMIT_FSIZE", limits.file_bytes),
                            ("RLIMIT_NPROC", nproc), ("RLIMIT_NOFILE", limits.open_files)):
            if value is not None:
                rl[name] = (value, value)
        return rl

    def _spec(self, limits: Limits) -> dict[str, Any]:
        def want(on: bool) -> str:
            return "require" if on else "off"

        network = limits.network or not self.features.net
        spec: dict[str, Any] = {
            "uid": self._uid, "gid": self._gid, "parent": os.getpid(), "workspace": str(self.workspace),
            "net": want(not network), "pid": want(self.features.pid), "mnt": want(self.features.mnt),
            "rlimits": self._rlimits(limits)}
        if self.features.mnt:
            spec["stage"] = str(self.workspace.parent)
            spec["root"] = root_plan(str(self.workspace), network=network, python=self.python,
                                     uid=self._uid, gid=self._gid)
        if self._cgroup is not None:
            spec["cgroups"] = self._cgroup.procs_files()
        return spec

    def _enter_limits(self, limits: Limits) -> tuple[float | None, int]:
        """Set the sandbox's cgroup limits for this command; its CPU time and OOM kills so far."""
        if self._cgroup is None:
            return None, 0
        self._cgroup.apply(limits.memory_bytes, limits.processes, limits.cpus)
        return self._cgroup.cpu_seconds(), self._cgroup.oom_kills()

    async def exec(self, argv: list[str], *, stdin: bytes | None = None,
                   limits: Limits | None = None, env: dict[str, str] | None = None) -> ExecResult:
        self._check_open()
        if not argv or not all(isinstance(a, str) for a in argv):
            raise SandboxError("argv must be a non-empty list of strings")
        lim = limits or self.limits
        await self._ready()
        self._ensure_tmp()
        cpu_before, ooms_before = await asyncio.to_thread(self._enter_limits, lim)
        full_env = _base_env(str(self.workspace)) | (env or {})
        rfd, wfd = os.pipe()
        t0 = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", LAUNCHER, json.dumps(self._spec(lim)), str(wfd), "--", *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                cwd=self.workspace, env=full_env, start_new_session=True, pass_fds=(wfd,))
        except OSError as exc:
            os.close(rfd)
            raise SandboxError(f"could not start the command: {exc}") from exc
        finally:
            os.close(wfd)
        run = _Run(proc)
        self._running.add(run)
        out, err = _Capture(lim.output_bytes), _Capture(lim.output_bytes)
        try:
            await self._wait(run, lim, stdin, out, err, cpu_before)
        finally:
            self._running.discard(run)
            run.kill()  # whatever is left of its process group
            status = _read_nonblocking(rfd)  # the supervisor wrote it before it exited
        duration = time.monotonic() - t0
        after = await self._aftermath(ooms_before)
        return self._result(lim, run, _parse_status(status), out, err, duration, after)

    async def _aftermath(self, ooms_before: int) -> _Aftermath:
        disk = await self.disk_bytes()
        ooms = self._cgroup.oom_kills() - ooms_before if self._cgroup is not None else 0
        return _Aftermath(disk, ooms, self._volume is not None and self._volume.full())

    def _ensure_tmp(self) -> None:
        """Put back ``$TMPDIR`` if a command removed it (mkdir and lchown never follow a link)."""
        tmp = self.workspace / ".tmp"
        try:
            os.mkdir(tmp, 0o700)
        except OSError:
            return  # there (or something in its place, which is the command's own business)
        if self._uid is not None:
            os.chown(tmp, self._uid, self._gid if self._gid is not None else self._uid, follow_symlinks=False)

    async def _watch_cpu(self, run: _Run, cpu_s: int, start: float) -> None:
        """Kill the command once the sandbox's processes together have used ``cpu_s`` (plus
        the grace RLIMIT_CPU gives one process): RLIMIT_CPU alone bounds each process only."""
        assert self._cgroup is not None
        while True:
            await asyncio.sleep(CPU_POLL_S)
            used = self._cgroup.cpu_seconds()
            if used is not None and used - start > cpu_s + CPU_GRACE_S:
                run.kill("cpu")
                return

    async def _wait(self, run: _Run, lim: Limits, stdin: bytes | None, out: _Capture, err: _Capture,
                    cpu_before: float | None) -> None:
        proc = run.proc
        cap_total = max(lim.output_bytes, 1) * OUTPUT_KILL_FACTOR

        async def drain(stream: asyncio.StreamReader, cap: _Capture) -> None:
            while chunk := await stream.read(_CHUNK):
                room = cap.keep - len(cap.data)
                if room > 0:
                    cap.data += chunk[:room]
                cap.total += len(chunk)
                if cap.total > cap_total:
                    run.kill("output")

        async def feed() -> None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(stdin or b"")
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                proc.stdin.close()

        assert proc.stdout is not None and proc.stderr is not None
        helpers = [asyncio.create_task(drain(proc.stdout, out)), asyncio.create_task(drain(proc.stderr, err))]
        readers = list(helpers)
        if stdin is not None:
            helpers.append(asyncio.create_task(feed()))
        if cpu_before is not None and lim.cpu_s is not None:
            helpers.append(asyncio.create_task(self._watch_cpu(run, lim.cpu_s, cpu_before)))
        try:
            try:
                async with asyncio.timeout(lim.wall_s):
                    await proc.wait()
            except TimeoutError:
                run.kill("timeout")
                await proc.wait()
            # The command is over; anything still holding the pipes (only possible without a PID
            # namespace) is killed with the group, then the readers get a moment to finish.
            run.kill()
            await asyncio.wait(readers, timeout=2.0)
        finally:
            for t in helpers:
                t.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    def _result(self, lim: Limits, run: _Run, status: dict, out: _Capture, err: _Capture,
                duration: float, after: _Aftermath) -> ExecResult:
        if "setup_error" in status and run.reason is None:
            raise SandboxError(f"the sandbox could not start the command: {status['setup_error']}")
        stderr = err.data.decode(errors="replace")
        exit_code: int | None = status.get("exit")
        sig: int | None = status.get("signal")
        error = run.reason if run.reason in _KILLED else None
        if error is None:
            error = self._limit_hit(lim, status, exit_code, sig, stderr[-4096:], after)
        if error is None and (after.volume_full or (
                lim.workspace_bytes is not None and after.disk > lim.workspace_bytes)):
            error = "workspace_full"
        if error in _KILLED:
            exit_code = None
        return ExecResult(exit_code=exit_code, stdout=out.data.decode(errors="replace"), stderr=stderr,
                          duration_s=duration, timed_out=error == "timeout", stdout_truncated=out.truncated,
                          stderr_truncated=err.truncated, error=error, signal=sig)

    @staticmethod
    def _limit_hit(lim: Limits, status: dict, exit_code: int | None, sig: int | None, tail: str,
                   after: _Aftermath) -> str | None:
        """The limit the kernel enforced on a command that ended by itself, if one did."""
        if after.oom_kills > 0:
            return "memory"         # the cgroup's total reached memory_bytes: the OOM killer acted
        if sig == signal.SIGXCPU or exit_code == 128 + signal.SIGXCPU or (
                sig == signal.SIGKILL and lim.cpu_s is not None and status.get("cpu_s", 0) >= lim.cpu_s):
            return "cpu"
        if sig == signal.SIGXFSZ or exit_code == 128 + signal.SIGXFSZ or (
                exit_code not in (None, 0) and "File too large" in tail):
            return "file_size"
        if exit_code not in (None, 0) and lim.memory_bytes is not None and any(
                s in tail for s in ("MemoryError", "Cannot allocate memory", "bad_alloc")):
            return "memory"
        if exit_code is None and sig is None:
            return "sandbox"        # the launcher died without a report
        return None

    async def kill(self) -> None:
        for run in list(self._running):
            run.kill("killed")

    async def close(self) -> None:
        async with self._close_lock:
            if self._closed:
                return
            self._closed = True
            await self.kill()
            for _ in range(100):
                if not self._running:
                    break
                await asyncio.sleep(0.02)
            try:
                await asyncio.to_thread(self._delete_workspace)
            except OSError as exc:
                log.warning("sandbox %s: workspace %s not fully deleted: %s", self.id, self.workspace, exc)
            await self._remove_cgroup()

    def _delete_workspace(self) -> None:
        """Unmount and delete the workspace's filesystem, then whatever is left (iteratively:
        any depth, any path length)."""
        if self._volume is not None:
            self._volume.destroy()
        tree.remove_tree(str(self.workspace))

    async def _remove_cgroup(self) -> None:
        """Remove the sandbox's cgroups once the last of its processes has left them."""
        if self._cgroup is None:
            return
        for _ in range(100):
            if await asyncio.to_thread(self._cgroup.remove):
                return
            await asyncio.sleep(0.05)
        log.warning("sandbox %s: cgroup %s still busy; left in place", self.id, self._cgroup.name)

    # -- files ---------------------------------------------------------------------------------

    def _open_dir(self, parts: list[str], create: bool = False) -> int:
        """An fd of the directory ``parts`` under the workspace, walked without following links."""
        fd = os.open(self.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for i, name in enumerate(parts):
                if create:
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                        created = True
                    except FileExistsError:
                        created = False
                    except OSError as exc:
                        raise self._path_error("/".join(parts[:i + 1]), exc) from None
                try:
                    nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    raise self._path_error("/".join(parts[:i + 1]), exc) from None
                os.close(fd)
                fd = nxt
                if create and created and self._uid is not None:
                    os.fchown(fd, self._uid, self._gid if self._gid is not None else self._uid)
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _path_error(path: str, exc: OSError) -> SandboxError:
        why = {errno.ENOENT: "no such file or directory", errno.ELOOP: "is a symbolic link (not followed)",
               errno.ENOTDIR: "is not a directory (or is a symbolic link, not followed)",
               errno.EISDIR: "is a directory", errno.EACCES: "permission denied",
               errno.ENOSPC: "no space left: the workspace is full (its size limit)",
               errno.EDQUOT: "no space left: the workspace is full (its size limit)",
               errno.EFBIG: "file too large (the file size limit)"}
        return SandboxError(f"{path}: {why.get(exc.errno or 0, exc.strerror or str(exc))}")

    def _foreign(self, st: os.stat_result) -> bool:
        """A hard link to a file the sandbox user does not own (say /etc/shadow) is not its file."""
        return self._uid is not None and st.st_nlink > 1 and st.st_uid != self._uid

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("sandbox is closed")

    async def read_file(self, path: str, *, max_bytes: int = 1 << 20) -> bytes:
        self._check_open()
        parts = _split(path)
        if not parts:
            raise SandboxError(f"{path}: is a directory")
        await self._ready()
        return await asyncio.to_thread(self._read, path, parts, max_bytes)

    def _read(self, path: str, parts: list[str], max_bytes: int) -> bytes:
        dfd = self._open_dir(parts[:-1])
        try:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as exc:
                raise self._path_error(path, exc) from None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise SandboxError(f"{path}: is a directory")
            if not stat.S_ISREG(st.st_mode) or self._foreign(st):
                raise SandboxError(f"{path}: not a regular file of the workspace")
            if st.st_size > max_bytes:
                raise SandboxError(f"{path}: file too large ({st.st_size} bytes; at most {max_bytes} are read)")
            chunks: list[bytes] = []
            got = 0
            while got <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - got))):
                chunks.append(chunk)
                got += len(chunk)
            data = b"".join(chunks)
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise SandboxError(f"{path}: file too large (more than {max_bytes} bytes)")
        return data

    async def write_file(self, path: str, data: bytes) -> None:
        self._check_open()
        parts = _split(path)
        if not parts:
            raise SandboxError(f"{path}: is a directory")
        limit = self.limits.file_bytes
        if limit is not None and len(data) > limit:
            raise SandboxError(f"{path}: {len(data)} bytes is over the file size limit of {limit}")
        await self._ready()
        await asyncio.to_thread(self._write, path, parts, data)

    def _write(self, path: str, parts: list[str], data: bytes) -> None:
        dfd = self._open_dir(parts[:-1], create=True)
        try:
            try:
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             0o644, dir_fd=dfd)
            except OSError as exc:
                raise self._path_error(path, exc) from None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or self._foreign(st):
                raise SandboxError(f"{path}: not a regular file of the workspace")
            if self._uid is not None:
                os.fchown(fd, self._uid, self._gid if self._gid is not None else self._uid)
            os.ftruncate(fd, 0)  # only now: truncating before the checks could empty a linked host file
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            raise self._path_error(path, exc) from None
        finally:
            os.close(fd)

    async def list_files(self, path: str = ".", *, recursive: bool = False, limit: int = 1000) -> list[FileEntry]:
        self._check_open()
        parts = _split(path)
        await self._ready()
        return await asyncio.to_thread(self._list, parts, recursive, limit)

    def _list(self, parts: list[str], recursive: bool, limit: int) -> list[FileEntry]:
        entries: list[FileEntry] = []
        todo: list[list[str]] = [parts]
        while todo and len(entries) < limit:
            cur = todo.pop(0)
            fd = self._open_dir(cur)
            try:
                with os.scandir(fd) as it:
                    items = sorted(it, key=lambda e: e.name)
                for e in items:
                    if len(entries) >= limit:
                        break
                    st = e.stat(follow_symlinks=False)
                    is_dir = stat.S_ISDIR(st.st_mode)
                    rel = "/".join([*cur, e.name])
                    entries.append(FileEntry(path=rel, is_dir=is_dir, size=0 if is_dir else st.st_size))
                    if recursive and is_dir:
                        todo.append([*cur, e.name])
            finally:
                os.close(fd)
        return entries

    async def disk_bytes(self) -> int:
        if self._closed:
            return 0
        self._disk = await asyncio.to_thread(self._du)
        return self._disk

    def _du(self) -> int:
        """Blocks held under the workspace, like ``du`` (links not followed, hard links once),
        walked iteratively: any depth, any path length. The last known value if a directory
        was moved out from under the walk."""
        try:
            fd = os.open(self.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return 0
        try:
            return tree.disk_usage(fd)
        except OSError:
            return self._disk
        finally:
            os.close(fd)

    def info(self) -> SandboxInfo:
        """Identity, last known disk use, and in ``labels`` which mechanisms are in force."""
        f = self.features
        cgroup = self._cgroup
        labels = {"network_isolated": str(f.net).lower(), "pid_namespace": str(f.pid).lower(),
                  "mount_namespace": str(f.mnt).lower(),
                  "uid": str(f.uid if f.uid is not None else os.geteuid()),
                  "uid_dropped": str(f.uid is not None and f.uid != 0).lower(), "python": f.python or "",
                  "filesystem": "allowlist" if f.mnt else "host",
                  "cgroup": cgroup.layout.version if cgroup is not None else "none",
                  "cgroup_controllers": ",".join(sorted(cgroup.layout.dirs)) if cgroup is not None else "",
                  "workspace_limit": "filesystem" if self._volume is not None else "accounting"}
        return SandboxInfo(id=self.id, kind=self.kind, workspace=str(self.workspace), disk_bytes=self._disk,
                           labels=labels)


__all__ = ["Features", "SubprocessSandbox", "probe"]
