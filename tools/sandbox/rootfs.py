"""The filesystem a sandboxed command sees: an allow-list, never the host's tree.

A deny-list (cover /run, /tmp and the sandbox root with empty tmpfs) leaves everything else of
the host readable: the service's SQLite database and any data directory nobody thought to list.
Instead the launcher builds a new root in a fresh tmpfs and ``pivot_root``\\ s into it, so a
command sees only what :func:`root_plan` lists:

- a read-only runtime: ``/usr``, ``/bin``, ``/sbin``, ``/lib*`` (the host's, bound read-only;
  merged-usr symlinks recreated) and the installation of the python the tools use when it lives
  elsewhere;
- a minimal ``/etc``: ``passwd``, ``group`` and ``hosts`` generated (the host's accounts are
  not the sandbox's business), plus the few host files programs need to run (dynamic linker
  cache, alternatives, time zone, certificates, ...), read-only; ``resolv.conf`` only with
  network; never ``shadow``;
- ``/proc`` of its own PID namespace (mounted by the launcher's pid 1), a minimal ``/dev``
  (``null``, ``zero``, ``full``, ``random``, ``urandom``, ``tty``, a private ``/dev/shm``) and a
  private ``/tmp``;
- its workspace, read-write, at its own path.

The plan is data (a list of operations the launcher executes in order, paths inside the new
root) so that it can be computed, and tested, in the service.
"""

from __future__ import annotations

import glob
import os
from pathlib import PurePosixPath

RUNTIME = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What of the host's /etc programs need to start and behave: the dynamic linker's cache,
# Debian's alternatives (/usr/bin/awk -> /etc/alternatives/awk), name service and address
# selection rules, time zone, TLS trust, shell start-up files. Globs allowed.
ETC = ("alternatives", "bash.bashrc", "ca-certificates", "ca-certificates.conf", "gai.conf", "host.conf",
       "inputrc", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "mime.types", "nsswitch.conf",
       "os-release", "profile", "protocols", "python3*", "services", "ssl/certs", "timezone")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
PRIVATE_TMPFS_SIZE = "16m"       # /tmp and /dev/shm each; in the sandbox's memory cgroup where there is one

# One step of the plan; parents of ``path`` are made as needed (mode 0755):
# ["dir", path, mode] | ["tmpfs", path, mode, size] | ["bind", host_path, path] (read-only)
# | ["dev", host_device, path] (read-write, no exec) | ["symlink", target, path] | ["file", path, text]
Op = list


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _runtime_ops() -> tuple[list[Op], list[str]]:
    """``/usr``, ``/bin``...: bound read-only, or recreated as the symlinks they are (merged usr)."""
    ops: list[Op] = []
    bound: list[str] = []
    for path in RUNTIME:
        if os.path.islink(path):
            ops.append(["symlink", os.readlink(path), path])
        elif os.path.isdir(path):
            ops.append(["bind", path, path])
            bound.append(path)
    return ops, bound


def _python_ops(python: str | None, bound: list[str]) -> list[Op]:
    """The installation of the tools' python, when it is outside the runtime already bound
    (``/opt/python/bin/python3`` -> ``/opt/python`` read-only)."""
    if python is None:
        return []
    real = os.path.realpath(python)
    if _under(real, bound):
        return []
    prefix = str(PurePosixPath(real).parent.parent)
    return [["bind", prefix, prefix]] if prefix != "/" else []


def _account_files(uid: int | None, gid: int | None, workspace: str) -> list[Op]:
    """``/etc/passwd`` and ``/etc/group`` naming root, nobody and the sandbox user only."""
    passwd = ["root:x:0:0:root:/root:/usr/sbin/nologin", "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"]
    group = ["root:x:0:", "nogroup:x:65534:"]
    if uid not in (None, 0, 65534):
        passwd.append(f"sandbox:x:{uid}:{gid if gid is not None else uid}:sandbox:{workspace}:/bin/sh")
    if gid not in (None, 0, 65534):
        group.append(f"sandbox:x:{gid}:")
    return [["file", "/etc/passwd", "\n".join(passwd) + "\n"], ["file", "/etc/group", "\n".join(group) + "\n"]]


def _etc_ops(network: bool) -> list[Op]:
    ops: list[Op] = [["dir", "/etc", "755"],
                     ["file", "/etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"]]
    names = [*ETC, *(["resolv.conf"] if network else [])]
    for pattern in names:
        for host in sorted(glob.glob(f"/etc/{pattern}")):
            if os.path.exists(host):  # bound through links: the target is what is read
                ops.append(["bind", os.path.realpath(host), host])
    return ops


def _dev_ops() -> list[Op]:
    ops: list[Op] = [["tmpfs", "/dev", "755", "64k"]]
    ops += [["dev", f"/dev/{name}", f"/dev/{name}"] for name in DEVICES if os.path.exists(f"/dev/{name}")]
    ops += [["symlink", "/proc/self/fd", "/dev/fd"]]
    ops += [["symlink", f"/proc/self/fd/{i}", f"/dev/{name}"] for i, name in enumerate(("stdin", "stdout", "stderr"))]
    ops.append(["tmpfs", "/dev/shm", "1777", PRIVATE_TMPFS_SIZE])
    return ops


def root_plan(workspace: str, *, network: bool, python: str | None, uid: int | None,
              gid: int | None) -> list[Op]:
    """What the launcher mounts in the new root, in order; the workspace is bound last by the
    launcher (from its working directory) at ``workspace``."""
    runtime, bound = _runtime_ops()
    ops = [*runtime, *_python_ops(python, bound), *_etc_ops(network), *_account_files(uid, gid, workspace),
           *_dev_ops(), ["dir", "/proc", "555"], ["tmpfs", "/tmp", "1777", PRIVATE_TMPFS_SIZE]]
    parent = str(PurePosixPath(workspace).parent)
    if _under(parent, [op[2] for op in ops if op[0] == "bind"]):
        # the workspace's directory lies in a bound host tree: an empty tmpfs over it, or the
        # other workspaces next to this one would be visible there
        ops.append(["tmpfs", parent, "755", "64k"])
    return ops


__all__ = ["root_plan"]
