"""Start one sandboxed command: namespaces, privilege drop, rlimits, then exec.

``SubprocessSandbox`` runs this file as root with the service's interpreter, in isolated mode
(``python -I -S _launch.py SPEC STATUS_FD -- ARGV...``), instead of a ``preexec_fn``: nothing of
the (threaded, large) service runs between fork and exec, and this code imports the standard
library only. The steps, in the order the kernel needs them:

1. launcher L (root, host namespaces): ``unshare`` a network, PID and mount namespace (each as
   SPEC asks); bring up ``lo`` in the new network namespace; make mounts private, cover paths
   with empty tmpfs and bind the workspace back at its own path.
2. with a PID namespace L forks A, pid 1 of it, which mounts a fresh ``/proc`` and forks the
   command B. When A exits, the kernel kills everything left in the namespace, so a command's
   background or ``setsid``-escaped processes never outlive it. Without one, L forks B itself.
3. B drops supplementary groups, gid and uid (in that order, since after ``setuid`` it could no
   longer), sets ``no_new_privs`` (setuid binaries cannot regain root), lowers its rlimits and
   execs ARGV with the environment L was given.

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

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1

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
    enc = (lambda s: None if s is None else s.encode())
    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {fstype or 'bind'} on {target}")


def _loopback_up() -> None:
    """A fresh network namespace has ``lo`` down; up, commands can still talk to themselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _cover(libc: ctypes.CDLL, covers: list[list], workspace: str) -> None:
    """Hide each covered path under an empty tmpfs, then bind the workspace back where it was.

    Mount propagation is made private first, or the tmpfs would appear on the host too.
    The cwd (the workspace, set by the service) still names the real directory after it is
    covered, so it is the bind source.
    """
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    inside = False
    for path, mode, size in covers:
        _mount(libc, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size={size}")
        inside = inside or workspace == path or workspace.startswith(path.rstrip("/") + "/")
    if inside:
        os.makedirs(workspace, mode=0o755, exist_ok=True)
        _mount(libc, ".", workspace, None, MS_BIND | MS_REC)
        os.chdir(workspace)


def _child(spec: dict, argv: list[str]) -> None:
    """B: become the sandbox user under its limits and exec the command. Never returns."""
    try:
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
    except Exception as exc:  # noqa: BLE001 - reported, then the child ends
        os.write(2, f"sandbox: setup failed: {exc}\n".encode())
        os._exit(125)
    exc = _exec(argv, dict(os.environ))
    os.write(2, f"sandbox: {argv[0]}: {exc.strerror or exc}\n".encode())
    os._exit(127 if isinstance(exc, FileNotFoundError) else 126)


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


def _supervise(spec: dict, argv: list[str], status_fd: int, features: dict, reap_all: bool) -> None:
    """Fork B, wait for it (reaping orphans too when pid 1), report how it ended."""
    pid = os.fork()
    if pid == 0:
        _child(spec, argv)
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
            _cover(libc, spec.get("covers", []), spec["workspace"])
    except (SetupError, OSError) as exc:
        os.write(status_fd, (json.dumps({"setup_error": str(exc)}) + "\n").encode())
        os._exit(125)

    if not features["pid"]:
        _supervise(spec, argv, status_fd, features, reap_all=False)
        os._exit(0)
    init = os.fork()
    if init == 0:  # A: pid 1 of the new namespace
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if features["mnt"]:
                _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except (SetupError, OSError) as exc:
            os.write(status_fd, (json.dumps({"setup_error": str(exc)}) + "\n").encode())
            os._exit(125)
        _supervise(spec, argv, status_fd, features, reap_all=True)
        os._exit(0)
    _, status = os.waitpid(init, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)


if __name__ == "__main__":
    main()
