"""One control group per sandbox, so its limits hold for all its commands' processes together.

rlimits bound each process: five processes of 0.9 GB each fit under a 1 GB ``RLIMIT_AS``, and a
fork bomb's processes each get their own CPU seconds. A cgroup is the kernel's account of a
whole group of processes: ``memory`` (the OOM killer acts inside the group when its total
reaches the limit), ``pids`` (no fork past the count, whatever uid), ``cpu`` (bandwidth: at most
``cpus`` cores at once) and the group's CPU time (``cpuacct.usage`` on v1, ``cpu.stat`` on v2),
which the service reads to stop a command whose processes together pass ``cpu_s``.

Both layouts are supported, controller by controller: cgroup v2 (``memory.max``,
``memory.swap.max``, ``pids.max``, ``cpu.max``) where the v2 hierarchy has the controller, else
a v1 hierarchy that has it (``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes``,
``pids.max``, ``cpu.cfs_quota_us``), as on hosts that mount both ("hybrid"). A sandbox's groups
sit under the service's own cgroup, in ``orch-sandboxes/<name>``. On v2 a cgroup with processes
cannot hand controllers to children (the "no internal processes" rule): the service then moves
the processes of its own cgroup into a leaf, ``orch-service``, once, as container runtimes do.

The launcher joins the command to the groups (it writes ``0``, itself, to each ``cgroup.procs``
it was given open) before it drops privileges and execs, so every process the command makes is
counted from its first instruction.
"""

from __future__ import annotations

import errno
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BASE = "orch-sandboxes"          # under the service's own cgroup
SERVICE_LEAF = "orch-service"    # v2: where the service's processes go so its cgroup can delegate
WANTED = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Mount:
    """A cgroup filesystem as /proc/self/mountinfo shows it."""

    version: int                 # 1 or 2
    point: str                   # where it is mounted
    root: str                    # the cgroup path its mount point shows
    controllers: frozenset[str]  # v1: those bound to it; v2: empty (read from cgroup.controllers)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def parse_mounts(mountinfo: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts of a /proc/<pid>/mountinfo text."""
    mounts = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(after) < 3 or after[0] not in ("cgroup", "cgroup2"):
            continue
        controllers = frozenset(o for o in after[2].split(",") if o in (*WANTED, "cpuacct"))
        mounts.append(Mount(2 if after[0] == "cgroup2" else 1, _unescape(fields[4]), _unescape(fields[3]),
                            controllers))
    return mounts


def parse_membership(proc_cgroup: str) -> dict[str, str]:
    """Controller -> our cgroup path in its v1 hierarchy, and ``""`` -> our v2 path."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for name in parts[1].split(",") if parts[1] else [""]:
            paths[name] = parts[2]
    return paths


def own_dir(mount: Mount, path: str) -> Path | None:
    """Our cgroup's directory under ``mount``, if the mount shows it."""
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None
    return Path(mount.point + path[len(root):])


@dataclass(frozen=True)
class Layout:
    """Where each resource of a sandbox is accounted: controller -> (cgroup version, the
    directory under which sandbox groups are made). ``usage`` is where CPU time is read."""

    dirs: dict[str, tuple[int, Path]]
    usage: tuple[int, Path] | None

    @property
    def version(self) -> str:
        """"v1", "v2", "v1+v2" (a hybrid host), or "" when no controller is usable."""
        return "+".join(f"v{v}" for v in sorted({v for v, _ in self.dirs.values()}))


def plan_layout(mounts: list[Mount], membership: dict[str, str], v2_controllers: set[str]) -> Layout:
    """Pick, per controller, v2 when our v2 cgroup offers it, else the v1 hierarchy that has it."""
    v2 = next((m for m in mounts if m.version == 2), None)
    v2_dir = own_dir(v2, membership[""]) if v2 is not None and "" in membership else None
    dirs: dict[str, tuple[int, Path]] = {}
    for name in WANTED:
        if v2_dir is not None and name in v2_controllers:
            dirs[name] = (2, v2_dir / BASE)
            continue
        mount = next((m for m in mounts if m.version == 1 and name in m.controllers), None)
        own = own_dir(mount, membership.get(name, "")) if mount is not None and name in membership else None
        if own is not None:
            dirs[name] = (1, own / BASE)
    usage: tuple[int, Path] | None = None
    if v2_dir is not None and any(v == 2 for v, _ in dirs.values()):
        usage = (2, v2_dir / BASE)
    else:
        acct = next((m for m in mounts if m.version == 1 and "cpuacct" in m.controllers), None)
        own = own_dir(acct, membership.get("cpuacct", "")) if acct is not None and "cpuacct" in membership else None
        if own is not None:
            usage = (1, own / BASE)
    return Layout(dirs, usage)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _delegate_v2(own: Path, controllers: list[str]) -> None:
    """Hand ``controllers`` from our v2 cgroup to ``BASE`` below it.

    A v2 cgroup that holds processes cannot enable controllers for its children (EBUSY), unless
    it is the root: the processes of our own cgroup are moved into the leaf ``SERVICE_LEAF``
    first. Then ``BASE`` enables them for the sandboxes' groups.
    """
    enable = " ".join(f"+{c}" for c in controllers)
    try:
        _write(own / "cgroup.subtree_control", enable)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        leaf = own / SERVICE_LEAF
        leaf.mkdir(exist_ok=True)
        for pid in (own / "cgroup.procs").read_text().split():
            try:
                _write(leaf / "cgroup.procs", pid)
            except ProcessLookupError:
                pass  # it exited meanwhile
        _write(own / "cgroup.subtree_control", enable)
    (own / BASE).mkdir(exist_ok=True)
    _write(own / BASE / "cgroup.subtree_control", enable)


def _prepare(layout: Layout) -> Layout:
    """Make the ``BASE`` directories (and the v2 delegation); drop what cannot be used."""
    v2 = sorted(n for n, (v, _) in layout.dirs.items() if v == 2)
    if v2:
        _delegate_v2(layout.dirs[v2[0]][1].parent, v2)
    for _version, base in {*layout.dirs.values(), *([layout.usage] if layout.usage else [])}:
        base.mkdir(exist_ok=True)
    return layout


def _read_host_layout() -> Layout:
    membership = parse_membership(Path("/proc/self/cgroup").read_text())
    mounts = parse_mounts(Path("/proc/self/mountinfo").read_text())
    v2 = next((m for m in mounts if m.version == 2), None)
    v2_dir = own_dir(v2, membership[""]) if v2 is not None and "" in membership else None
    try:
        offered = set((v2_dir / "cgroup.controllers").read_text().split()) if v2_dir else set()
    except OSError:
        offered = set()
    return plan_layout(mounts, membership, offered)


@functools.cache
def host_layout() -> Layout:
    """This process's usable cgroup layout, found once (empty where there is none or no right
    to make groups, e.g. not root and nothing delegated to us)."""
    try:
        layout = _prepare(_read_host_layout())
    except OSError as exc:
        log.info("sandbox cgroups unavailable: %s", exc)
        return Layout({}, None)
    log.info("sandbox cgroups: %s", ", ".join(f"{n} v{v} {p}" for n, (v, p) in sorted(layout.dirs.items()))
             or "none")
    return layout


@dataclass(frozen=True)
class SandboxCgroup:
    """The groups of one sandbox (one per hierarchy), made before its first command."""

    layout: Layout
    name: str

    def _dir(self, controller: str) -> Path:
        return self.layout.dirs[controller][1] / self.name

    def _version(self, controller: str) -> int:
        return self.layout.dirs[controller][0]

    @property
    def directories(self) -> list[Path]:
        """Each distinct directory of this sandbox's groups (one per hierarchy)."""
        bases = [b for _v, b in self.layout.dirs.values()] + ([self.layout.usage[1]] if self.layout.usage else [])
        return sorted({b / self.name for b in bases})

    def create(self) -> None:
        for d in self.directories:
            d.mkdir(exist_ok=True)

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files the launcher joins the command to."""
        return [str(d / "cgroup.procs") for d in self.directories]

    def apply(self, memory_bytes: int | None, processes: int | None, cpus: float | None) -> None:
        """Set the limits (``None``: none). Written before each command, as its limits may differ."""
        if "memory" in self.layout.dirs:
            self._set_memory(memory_bytes)
        if "pids" in self.layout.dirs:
            _write(self._dir("pids") / "pids.max", "max" if processes is None else str(processes))
        if "cpu" in self.layout.dirs:
            self._set_cpu(cpus)

    def _set_memory(self, limit: int | None) -> None:
        d = self._dir("memory")
        if self._version("memory") == 2:
            _write(d / "memory.max", "max" if limit is None else str(limit))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "max" if limit is None else "0")  # swap must not extend it
            return
        value = "-1" if limit is None else str(limit)
        memsw = d / "memory.memsw.limit_in_bytes"  # memory + swap: must stay >= the memory limit
        if memsw.exists():
            _write(memsw, "-1")
        _write(d / "memory.limit_in_bytes", value)
        if memsw.exists():
            _write(memsw, value)

    def _set_cpu(self, cpus: float | None) -> None:
        d = self._dir("cpu")
        quota = -1 if cpus is None else max(1000, int(cpus * CPU_PERIOD_US))
        if self._version("cpu") == 2:
            _write(d / "cpu.max", f"{'max' if quota < 0 else quota} {CPU_PERIOD_US}")
            return
        _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(d / "cpu.cfs_quota_us", str(quota))

    def cpu_seconds(self) -> float | None:
        """CPU time used by every process the group has held; None where it is not accounted."""
        if self.layout.usage is None:
            return None
        version, base = self.layout.usage
        try:
            if version == 1:
                return int((base / self.name / "cpuacct.usage").read_text()) / 1e9
            return _keyed(base / self.name / "cpu.stat", "usage_usec") / 1e6
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """Processes the OOM killer has killed in the group (its memory limit was reached)."""
        if "memory" not in self.layout.dirs:
            return 0
        name = "memory.events" if self._version("memory") == 2 else "memory.oom_control"
        try:
            return _keyed(self._dir("memory") / name, "oom_kill")
        except (OSError, ValueError):
            return 0

    def remove(self) -> bool:
        """Remove the groups; False while a process is still in one (EBUSY: try again later)."""
        done = True
        for d in self.directories:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                done = False
        return done


def _keyed(path: Path, key: str) -> int:
    """The value of ``key`` in a flat-keyed cgroup file (``key value`` per line)."""
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    raise ValueError(f"no {key} in {path}")


__all__ = ["Layout", "Mount", "SandboxCgroup", "host_layout", "parse_membership", "parse_mounts",
           "plan_layout"]
