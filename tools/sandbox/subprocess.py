"""A sandbox made of a workspace directory and short-lived, confined child processes.

Each command is started by ``_launch.py`` (see there for the order of steps): in fresh network,
PID and mount namespaces when the service runs as root, as an unprivileged uid (65534, nobody)
with rlimits and a scrubbed environment. The service keeps the wall clock, the output cap and the
disk accounting. File operations run in the service (as root), so they never follow a symlink and
never leave the workspace. What is and is not enforced is in docs/sandboxes.md.
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
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.sandbox.base import ExecResult, FileEntry, Limits, Sandbox, SandboxError, SandboxInfo

log = logging.getLogger(__name__)

LAUNCHER = str(Path(__file__).with_name("_launch.py"))
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
NOBODY = 65534
# Covered by an empty tmpfs inside every command's mount namespace: sockets of local services
# (/run: PostgreSQL, Docker, D-Bus...) and directories shared by everyone (/tmp, /dev/shm).
DEFAULT_HIDE: tuple[str, ...] = ("/run", "/var/run", "/tmp", "/var/tmp", "/dev/shm")
_SHARED_TMP = {"/tmp", "/var/tmp", "/dev/shm"}
OUTPUT_KILL_FACTOR = 16          # output beyond 16x the kept bytes: the command is killed
_CHUNK = 1 << 16
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class Features:
    """What this machine lets the sandbox enforce; probed once per (interpreter, uid)."""

    net: bool = False
    pid: bool = False
    mnt: bool = False
    uid: int | None = None       # the uid commands run as when it differs from ours
    gid: int | None = None
    python: str | None = None    # a python3 the sandbox user can run
    notes: tuple[str, ...] = ()


def _run_launcher(spec: dict, argv: list[str], cwd: str) -> tuple[int, dict, str]:
    """Run one command through the launcher synchronously (used by the probe only)."""
    rfd, wfd = os.pipe()
    try:
        proc = subprocess.run([sys.executable, "-I", "-S", LAUNCHER, json.dumps(spec), str(wfd), "--", *argv],
                              cwd=cwd, env=_base_env(cwd), capture_output=True, timeout=30, pass_fds=(wfd,))
    finally:
        os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        status = _parse_status(f.read())
    return proc.returncode, status, proc.stdout.decode(errors="replace").strip()


@functools.cache
def probe(uid: int | None, gid: int | None) -> Features:
    """Find out once which namespaces work here and which python3 the sandbox user can run.

    Cached for the life of the process: the answer is a property of the machine and of our
    privileges, and probing costs a few process starts.
    """
    notes: list[str] = []
    spec = {"uid": uid, "gid": gid, "net": "try", "pid": "try", "mnt": "try", "workspace": "/",
            "covers": [list(c) for c in _covers(DEFAULT_HIDE, Path("/"), None)]}
    code = "import sys; print(sys.executable)"
    rc, status, out = _run_launcher(spec, ["python3", "-c", code], "/")
    if "setup_error" in status:
        notes.append(f"mount namespace unavailable: {status['setup_error']}")
        spec.update(mnt="off", covers=[])
        rc, status, out = _run_launcher(spec, ["python3", "-c", code], "/")
    if "setup_error" in status:
        notes.append(f"namespaces unavailable: {status['setup_error']}")
        spec.update(net="off", pid="off")
        rc, status, out = _run_launcher(spec, ["python3", "-c", code], "/")
    feats = status.get("features", {})
    python = shutil.which("python3", path=SANDBOX_PATH) if status.get("exit") == 0 else None
    if python is None:
        notes.append("no python3 on the sandbox PATH runs as the sandbox user")
    found = Features(net=bool(feats.get("net")), pid=bool(feats.get("pid")), mnt=bool(feats.get("mnt")),
                     uid=uid, gid=gid, python=python, notes=tuple(notes))
    log.info("sandbox probe: network namespace %s, pid namespace %s, mount namespace %s, uid %s, python %s%s",
             found.net, found.pid, found.mnt, uid, python, "".join(f"; {n}" for n in notes))
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


def _covers(hide: tuple[str, ...] | list[str], workspace: Path, uid: int | None) -> list[tuple[str, str, str]]:
    """Paths to cover with tmpfs: the hidden ones, the sandbox root (so other workspaces, owned by
    the same uid, are out of sight) and the highest ancestor the sandbox user could not traverse.
    Nested ones are dropped: covering the outer one already recreates the inner path."""
    wanted: dict[str, tuple[str, str]] = {}
    for p in hide:
        if os.path.isdir(p) and not os.path.islink(p):
            real = os.path.realpath(p)
            wanted[real] = ("1777", "16m") if p in _SHARED_TMP or real in _SHARED_TMP else ("755", "1m")
    if workspace != Path("/"):
        wanted.setdefault(str(workspace.parent), ("755", "1m"))
        blocked = _first_untraversable(workspace, uid)
        if blocked is not None:
            wanted.setdefault(str(blocked), ("755", "1m"))
    paths = sorted(wanted, key=len)
    kept = [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]
    return [(p, *wanted[p]) for p in kept]


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
    reason: str | None = None            # "timeout" | "output" | "killed": why we killed it

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


class SubprocessSandbox(Sandbox):
    """One program's workspace on this machine, its commands run by the launcher.

    Build it with :meth:`create`. ``python`` is a python3 the sandbox user can run (the tools'
    interpreter), or None when there is none on the sandbox PATH.
    """

    kind = "subprocess"

    def __init__(self, sandbox_id: str, workspace: Path, limits: Limits, features: Features,
                 hide: tuple[str, ...]) -> None:
        self.id = sandbox_id
        self.limits = limits
        self.workspace = workspace
        self.features = features
        self.python = features.python
        self._uid = features.uid
        self._gid = features.gid
        self._covers = _covers(hide, workspace, features.uid) if features.mnt else []
        self._running: set[_Run] = set()
        self._disk = 0
        self._closed = False
        self._close_lock = asyncio.Lock()

    @classmethod
    async def create(cls, root: Path | str, sandbox_id: str, limits: Limits = Limits(),
                     run_as: int | None = NOBODY, *, hide: tuple[str, ...] = DEFAULT_HIDE) -> SubprocessSandbox:
        """Make the workspace ``root/<id>`` (mode 0700, owned by the sandbox user) and probe the machine.

        ``run_as`` is the uid commands run as; it applies only when the service runs as root
        (otherwise commands run as the service's own user). An existing workspace of the same id
        is reused, so a run resumed after a restart finds its files.
        """
        uid = gid = None
        if run_as is not None and os.geteuid() == 0:
            uid = run_as
            try:
                gid = pwd.getpwuid(run_as).pw_gid
            except KeyError:
                gid = run_as
        features = await asyncio.to_thread(probe, uid, gid)
        root = Path(root).absolute()
        workspace = root / _workspace_name(sandbox_id)
        await asyncio.to_thread(cls._make_workspace, root, workspace, uid, gid)
        if not features.mnt and _first_untraversable(workspace, uid) is not None:
            raise SandboxError(f"the sandbox user (uid {uid}) cannot reach {workspace}: "
                               f"{_first_untraversable(workspace, uid)} is not searchable by others; "
                               f"use a sandbox root whose parents are mode o+x")
        return cls(sandbox_id, workspace, limits, features, hide)

    @staticmethod
    def _make_workspace(root: Path, workspace: Path, uid: int | None, gid: int | None) -> None:
        try:
            root.mkdir(parents=True, mode=0o711)
            root.chmod(0o711)  # mkdir's mode is masked by the umask
        except FileExistsError:
            pass  # another sandbox made it, or the operator did (and chose its mode)
        try:
            os.mkdir(workspace, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(workspace).st_mode):
                raise SandboxError(f"{workspace} exists and is not a directory") from None
        tmp = workspace / ".tmp"
        tmp.mkdir(exist_ok=True)
        for p in (workspace, tmp):
            os.chmod(p, 0o700, follow_symlinks=False)
            if uid is not None:
                os.chown(p, uid, gid if gid is not None else uid, follow_symlinks=False)

    # -- commands ------------------------------------------------------------------------------

    def _spec(self, limits: Limits) -> dict:
        def want(on: bool) -> str:
            return "require" if on else "off"

        rl: dict[str, tuple[int, int]] = {"RLIMIT_CORE": (0, 0)}
        if limits.cpu_s is not None:
            rl["RLIMIT_CPU"] = (limits.cpu_s, limits.cpu_s + 1)  # SIGXCPU first, SIGKILL a second later
        for name, value in (("RLIMIT_AS", limits.memory_bytes), ("RLIMIT_FSIZE", limits.file_bytes),
                            ("RLIMIT_NPROC", limits.processes), ("RLIMIT_NOFILE", limits.open_files)):
            if value is not None:
                rl[name] = (value, value)
        return {"uid": self._uid, "gid": self._gid, "parent": os.getpid(), "workspace": str(self.workspace),
                "net": want(self.features.net and not limits.network), "pid": want(self.features.pid),
                "mnt": want(self.features.mnt), "covers": [list(c) for c in self._covers], "rlimits": rl}

    async def exec(self, argv: list[str], *, stdin: bytes | None = None,
                   limits: Limits | None = None, env: dict[str, str] | None = None) -> ExecResult:
        if self._closed:
            raise SandboxError("sandbox is closed")
        if not argv or not all(isinstance(a, str) for a in argv):
            raise SandboxError("argv must be a non-empty list of strings")
        lim = limits or self.limits
        self._ensure_tmp()
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
            await self._wait(run, lim, stdin, out, err)
        finally:
            self._running.discard(run)
            run.kill()  # whatever is left of its process group
            status = _read_nonblocking(rfd)  # the supervisor wrote it before it exited
        duration = time.monotonic() - t0
        disk = await self.disk_bytes()
        return self._result(lim, run, _parse_status(status), out, err, duration, disk)

    def _ensure_tmp(self) -> None:
        """Put back ``$TMPDIR`` if a command removed it (mkdir and lchown never follow a link)."""
        tmp = self.workspace / ".tmp"
        try:
            os.mkdir(tmp, 0o700)
        except OSError:
            return  # there (or something in its place, which is the command's own business)
        if self._uid is not None:
            os.chown(tmp, self._uid, self._gid if self._gid is not None else self._uid, follow_symlinks=False)

    async def _wait(self, run: _Run, lim: Limits, stdin: bytes | None, out: _Capture, err: _Capture) -> None:
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
        readers = [asyncio.create_task(drain(proc.stdout, out)), asyncio.create_task(drain(proc.stderr, err))]
        feeder = asyncio.create_task(feed()) if stdin is not None else None
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
            for t in [*readers, *([feeder] if feeder else [])]:
                t.cancel()
            await asyncio.gather(*readers, *([feeder] if feeder else []), return_exceptions=True)

    def _result(self, lim: Limits, run: _Run, status: dict, out: _Capture, err: _Capture,
                duration: float, disk: int) -> ExecResult:
        if "setup_error" in status and run.reason is None:
            raise SandboxError(f"the sandbox could not start the command: {status['setup_error']}")
        stderr = err.data.decode(errors="replace")
        exit_code: int | None = status.get("exit")
        sig: int | None = status.get("signal")
        error = run.reason if run.reason in ("timeout", "output", "killed") else None
        if error is None:
            if sig == signal.SIGXCPU or exit_code == 128 + signal.SIGXCPU or (
                    sig == signal.SIGKILL and lim.cpu_s is not None and status.get("cpu_s", 0) >= lim.cpu_s):
                error = "cpu"
            elif sig == signal.SIGXFSZ or exit_code == 128 + signal.SIGXFSZ or (
                    exit_code not in (None, 0) and "File too large" in stderr[-4096:]):
                error = "file_size"
            elif exit_code not in (None, 0) and lim.memory_bytes is not None and any(
                    s in stderr[-4096:] for s in ("MemoryError", "Cannot allocate memory", "bad_alloc")):
                error = "memory"
            elif exit_code is None and sig is None:
                error = "sandbox"       # the launcher died without a report
        if error is None and lim.workspace_bytes is not None and disk > lim.workspace_bytes:
            error = "workspace_full"
        if error in ("timeout", "output", "killed"):
            exit_code = None
        return ExecResult(exit_code=exit_code, stdout=out.data.decode(errors="replace"), stderr=stderr,
                          duration_s=duration, timed_out=error == "timeout", stdout_truncated=out.truncated,
                          stderr_truncated=err.truncated, error=error, signal=sig)

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
            await asyncio.to_thread(shutil.rmtree, self.workspace, True)

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
               errno.EISDIR: "is a directory", errno.EACCES: "permission denied"}
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
        finally:
            os.close(fd)

    async def list_files(self, path: str = ".", *, recursive: bool = False, limit: int = 1000) -> list[FileEntry]:
        self._check_open()
        parts = _split(path)
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
        """Blocks held under the workspace, like ``du``: links not followed, hard links once."""
        seen: set[tuple[int, int]] = set()
        total = 0
        try:
            for _dir, _dirs, files, dfd in os.fwalk(self.workspace, follow_symlinks=False):
                for name in [".", *files]:
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except OSError:
                        continue
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_blocks * 512
        except OSError:
            pass
        return total

    def info(self) -> SandboxInfo:
        f = self.features
        labels = {"network_isolated": str(f.net).lower(), "pid_namespace": str(f.pid).lower(),
                  "mount_namespace": str(f.mnt).lower(),
                  "uid": str(f.uid if f.uid is not None else os.geteuid()),
                  "uid_dropped": str(f.uid is not None and f.uid != 0).lower(), "python": f.python or ""}
        return SandboxInfo(id=self.id, kind=self.kind, workspace=str(self.workspace), disk_bytes=self._disk,
                           labels=labels)


__all__ = ["DEFAULT_HIDE", "Features", "SubprocessSandbox", "probe"]
