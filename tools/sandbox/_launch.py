"""Start one sandboxed command: cgroups, namespaces, a new root, privilege drop, rlimits, exec.

``SubprocessSandbox`` runs this file as root with the service's interpreter, in isolated mode
(``python -I -S _launch.py SPEC STATUS_FD -- ARGV...``), instead of a ``preexec_fn``: nothing of
the (threaded, large) service runs between fork and exec, and this code imports the standard
library only, all of it up front (after ``pivot_root`` the interpreter's own files are gone).
The steps, in the order the kernel needs them:

1. launcher L (root, host namespaces): open the sandbox's ``cgroup.procs`` files (they are out of
   sight once the root changes); ``unshare`` a network, PID and mount namespace (each as SPEC
   asks); bring up ``lo`` in the new network namespace; with the mount namespace, build the new
   root (SPEC ``root``, see ``rootfs.py``) in a tmpfs mounted on SPEC ``stage``, bind the
   workspace (L's working directory) at its own path, ``pivot_root`` into it, detach the old
   root and make the new one read-only.
2. with a PID namespace L forks A, pid 1 of it, which mounts a fresh ``/proc`` and forks the
   command B. When A exits, the kernel kills everything left in the namespace, so a command's
   background or ``setsid``-escaped processes never outlive it. Without one, L forks B itself.
3. B joins the cgroups (writes ``0``, itself, to each ``cgroup.procs``: every process it makes is
   counted from then on), drops supplementary groups, gid and uid (in that order, since after
   ``setuid`` it could no longer), sets ``no_new_privs`` (setuid binaries cannot regain root),
   lowers its rlimits and execs ARGV with the environment L was given.

The supervisor (A or L) writes one JSON line to STATUS_FD when B ends: its exit code or signal,
its CPU seconds and peak RSS, and the features in force. A setup failure writes
``{"setup_error": ...}`` and exits 125; the command is never run with less isolation than SPEC
required.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import sys
from typing import NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

FLAGS = {"net": CLONE_NEWNET, "pid": CLONE_NEWPID, "mnt": CLONE_NEWNS}


class SetupError(Exception):
    pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(libc: ctypes.CDLL, src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {fstype or 'bind'} on {target}")


def _loopback_up() -> None:
    """A fresh network namespace has ``lo`` down; up, commands can still talk to themselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _remount(libc: ctypes.CDLL, target: str, flags: int) -> None:
    """Set a bind mount's own flags (read-only, nosuid...): a bind starts with its source's."""
    _mount(libc, None, target, None, MS_REMOUNT | MS_BIND | flags)


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)


def _bind(libc: ctypes.CDLL, src: str, target: str, flags: int) -> None:
    """Bind ``src`` (a directory or a file) at ``target`` with ``flags``."""
    _make_parent(target)
    if os.path.isdir(src):
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.exists(target):
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    _mount(libc, src, target, None, MS_BIND)
    _remount(libc, target, flags)


def _apply(libc: ctypes.CDLL, op: list, top: str) -> None:
    """One step of the root plan (paths in ``op`` are inside the new root, mounted at ``top``)."""
    kind = op[0]
    if kind == "bind":
        _bind(libc, op[1], top + op[2], MS_RDONLY | MS_NOSUID | MS_NODEV)
    elif kind == "dev":
        _bind(libc, op[1], top + op[2], MS_NOSUID | MS_NOEXEC)
    elif kind == "tmpfs":
        os.makedirs(top + op[1], mode=0o755, exist_ok=True)
        _mount(libc, "tmpfs", top + op[1], "tmpfs", MS_NOSUID | MS_NODEV, f"mode={op[2]},size={op[3]}")
    elif kind == "dir":
        os.makedirs(top + op[1], mode=0o755, exist_ok=True)
        os.chmod(top + op[1], int(op[2], 8))
    elif kind == "symlink":
        _make_parent(top + op[2])
        os.symlink(op[1], top + op[2])
    elif kind == "file":
        _make_parent(top + op[1])
        fd = os.open(top + op[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, op[2].encode())
        finally:
            os.close(fd)
    else:
        raise SetupError(f"unknown root step {kind!r}")


def _new_root(libc: ctypes.CDLL, stage: str, plan: list[list], workspace: str) -> None:
    """Build the allow-listed root on ``stage``, move into it and forget the host's.

    Mount propagation is made private first, or every mount here would appear on the host too.
    The working directory (the workspace, set by the service) still names the real directory
    after ``stage`` is covered, so it is the workspace's bind source. ``pivot_root(".", ".")``
    then stacks the old root on the new one, and a lazy unmount of "." drops it: nothing of
    the host's tree is reachable any more, not even by ``..`` from a descriptor.
    """
    os.umask(0o022)  # the service's umask must not make the new root's directories unreadable
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    _mount(libc, "tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for op in plan:
        _apply(libc, op, stage)
    os.makedirs(stage + workspace, mode=0o755, exist_ok=True)
    _mount(libc, ".", stage + workspace, None, MS_BIND)
    _remount(libc, stage + workspace, MS_NOSUID | MS_NODEV)
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise SetupError(f"pivot_root: unknown system call number on {os.uname().machine}")
    os.chdir(stage)
    _check(libc.syscall(number, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "unmount the old root")
    _remount(libc, "/", MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(workspace)


def _join_cgroups(fds: list[int]) -> None:
    """Move this process into the sandbox's cgroups (``0`` is the writer itself)."""
    for fd in fds:
        os.write(fd, b"0")
        os.close(fd)


def _child(spec: dict, argv: list[str], cgroup_fds: list[int]) -> None:
    """B: join the cgroups, become the sandbox user under its limits and exec the command.
    Never returns."""
    try:
        _join_cgroups(cgroup_fds)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGXCPU, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)  # ignored signals stay ignored across exec
        if spec.get("uid") is not None:
            os.setgroups([])
            os.setresgid(spec["gid"], spec["gid"], spec["gid"])
            os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        libc = _libc()
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.umask(0o022)
        for name, (soft, hard) in spec.get("rlimits", {}).items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
    except Exception as exc:
        os.write(2, f"sandbox: setup failed: {exc}\n".encode())
        os._exit(125)
    err = _exec(argv, dict(os.environ))
    os.write(2, f"sandbox: {argv[0]}: {err.strerror or err}\n".encode())
    os._exit(127 if isinstance(err, FileNotFoundError) else 126)


def _exec(argv: list[str], env: dict[str, str]) -> OSError:
    """``execvp`` by hand: after the uid drop the interpreter's own library may be unreadable,
    so nothing here may import lazily (``os.execvpe`` does). Returns only on failure."""
    if "/" in argv[0]:
        candidates = [argv[0]]
    else:
        candidates = [os.path.join(d or ".", argv[0]) for d in env.get("PATH", "/usr/bin:/bin").split(":")]
    error: OSError = FileNotFoundError(2, "command not found")
    for path in candidates:
        try:
            os.execve(path, argv, env)
        except FileNotFoundError:
            continue
        except OSError as exc:
            error = exc  # e.g. permission denied: reported if nothing later works
    return error


def _supervise(spec: dict, argv: list[str], status_fd: int, features: dict, cgroup_fds: list[int],
               reap_all: bool) -> None:
    """Fork B, wait for it (reaping orphans too when pid 1), report how it ended."""
    pid = os.fork()
    if pid == 0:
        _child(spec, argv, cgroup_fds)
    for fd in cgroup_fds:
        os.close(fd)
    while True:
        try:
            got, status, usage = os.wait4(-1 if reap_all else pid, 0)
        except ChildProcessError:
            return
        if got == pid:
            break
    report: dict = {"features": features, "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss}
    if os.WIFSIGNALED(status):
        report["signal"] = os.WTERMSIG(status)
    else:
        report["exit"] = os.WEXITSTATUS(status)
    os.write(status_fd, (json.dumps(report) + "\n").encode())


def _report_setup_error(status_fd: int, exc: Exception) -> NoReturn:
    os.write(status_fd, (json.dumps({"setup_error": str(exc)}) + "\n").encode())
    os._exit(125)


def _isolate(libc: ctypes.CDLL, spec: dict) -> dict:
    """L's part: namespaces, loopback, the new root; returns the features in force."""
    features: dict = {}
    for name in ("net", "pid", "mnt"):
        mode = spec.get(name, "off")
        ok = mode != "off" and libc.unshare(FLAGS[name]) == 0
        if mode == "require" and not ok:
            raise SetupError(f"unshare({name}): {os.strerror(ctypes.get_errno())}")
        features[name] = ok
    if features["net"]:
        _loopback_up()
    if features["mnt"]:
        _new_root(libc, spec["stage"], spec["root"], spec["workspace"])
        if not features["pid"]:  # the host's PID namespace: its processes, but only the sandbox user's
            _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    return features


def main() -> None:
    spec = json.loads(sys.argv[1])
    status_fd = int(sys.argv[2])
    argv = sys.argv[4:]
    os.set_inheritable(status_fd, False)  # B's exec closes it
    libc = _libc()
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the service died: so do we
        if os.getppid() != spec.get("parent", os.getppid()):
            os._exit(125)
        cgroup_fds = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in spec.get("cgroups", [])]
        features = _isolate(libc, spec)
    except (SetupError, OSError) as exc:
        _report_setup_error(status_fd, exc)
    features["cgroup"] = bool(cgroup_fds)

    if not features["pid"]:
        _supervise(spec, argv, status_fd, features, cgroup_fds, reap_all=False)
        os._exit(0)
    init = os.fork()
    if init == 0:  # A: pid 1 of the new namespace
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if features["mnt"]:
                _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except (SetupError, OSError) as exc:
            _report_setup_error(status_fd, exc)
        _supervise(spec, argv, status_fd, features, cgroup_fds, reap_all=True)
        os._exit(0)
    for fd in cgroup_fds:
        os.close(fd)
    _, status = os.waitpid(init, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)


if __name__ == "__main__":
    main()
