"""Where a sandbox's cgroups go and what is written to them (tools/sandbox/cgroups.py), on v1,
v2 and hybrid layouts described by /proc texts, with the limit files in a temporary directory.
The kernel's side (limits that hold) is in test_sandbox_containment.py."""

from __future__ import annotations

from pathlib import Path

from tools.sandbox.cgroups import Layout, SandboxCgroup, parse_membership, parse_mounts, plan_layout

HYBRID_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_MEMBERSHIP = "8:pids:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n"
V2_MOUNTS = "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
V2_MEMBERSHIP = "0::/system.slice/orchestrator.service\n"


def test_a_hybrid_host_uses_v1_where_v2_has_no_controllers():
    layout = plan_layout(parse_mounts(HYBRID_MOUNTS), parse_membership(HYBRID_MEMBERSHIP), set())
    assert layout.dirs == {"memory": (1, Path("/sys/fs/cgroup/memory/process_api/abc/orch-sandboxes")),
                           "pids": (1, Path("/sys/fs/cgroup/pids/orch-sandboxes")),
                           "cpu": (1, Path("/sys/fs/cgroup/cpu/orch-sandboxes"))}
    assert layout.usage == (1, Path("/sys/fs/cgroup/cpuacct/orch-sandboxes")) and layout.version == "v1"


def test_v2_is_used_for_the_controllers_it_offers():
    layout = plan_layout(parse_mounts(V2_MOUNTS), parse_membership(V2_MEMBERSHIP), {"memory", "pids", "cpu", "io"})
    base = Path("/sys/fs/cgroup/system.slice/orchestrator.service/orch-sandboxes")
    assert layout.dirs == {"memory": (2, base), "pids": (2, base), "cpu": (2, base)}
    assert layout.usage == (2, base) and layout.version == "v2"
    partial = plan_layout(parse_mounts(HYBRID_MOUNTS + V2_MOUNTS.replace("/sys/fs/cgroup ", "/sys/fs/cgroup/u2 ")),
                          parse_membership(HYBRID_MEMBERSHIP), {"pids"})
    assert partial.dirs["pids"][0] == 2 and partial.dirs["memory"][0] == 1 and partial.version == "v1+v2"


def test_a_cgroup_namespace_mount_root_is_taken_off_our_path():
    mounts = parse_mounts("50 40 0:40 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    layout = plan_layout(mounts, parse_membership("4:memory:/docker/abc/svc\n"), set())
    assert layout.dirs == {"memory": (1, Path("/sys/fs/cgroup/memory/svc/orch-sandboxes"))}
    assert plan_layout(parse_mounts(""), {}, set()) == Layout({}, None)


def _fake_group(tmp_path: Path, version: int, files: dict[str, str]) -> SandboxCgroup:
    base = tmp_path / "orch-sandboxes"
    layout = Layout({"memory": (version, base), "pids": (version, base), "cpu": (version, base)}, (version, base))
    group = SandboxCgroup(layout, "prog-1-abc")
    base.mkdir()  # as host_layout() does
    group.create()
    for name, text in files.items():
        (base / "prog-1-abc" / name).write_text(text)
    return group


def _read(group: SandboxCgroup, name: str) -> str:
    return (group.directories[0] / name).read_text()


def test_v2_limits_and_accounts(tmp_path: Path):
    group = _fake_group(tmp_path, 2, {"memory.swap.max": "max", "cpu.stat": "usage_usec 2500000\nuser_usec 1\n",
                                      "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n"})
    group.apply(256 << 20, 32, 1.5)
    assert (_read(group, "memory.max"), _read(group, "memory.swap.max")) == (str(256 << 20), "0")
    assert (_read(group, "pids.max"), _read(group, "cpu.max")) == ("32", "150000 100000")
    assert (group.cpu_seconds(), group.oom_kills()) == (2.5, 2)
    group.apply(None, None, None)
    assert [_read(group, n) for n in ("memory.max", "memory.swap.max", "pids.max", "cpu.max")] == \
        ["max", "max", "max", "max 100000"]


def test_v1_limits_and_accounts(tmp_path: Path):
    group = _fake_group(tmp_path, 1, {"memory.memsw.limit_in_bytes": "-1", "cpuacct.usage": "1500000000\n",
                                      "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n"})
    group.apply(128 << 20, 8, 0.5)
    assert _read(group, "memory.limit_in_bytes") == _read(group, "memory.memsw.limit_in_bytes") == str(128 << 20)
    assert (_read(group, "cpu.cfs_period_us"), _read(group, "cpu.cfs_quota_us"), _read(group, "pids.max")) == \
        ("100000", "50000", "8")
    assert (group.cpu_seconds(), group.oom_kills()) == (1.5, 4)
    assert group.procs_files() == [str(tmp_path / "orch-sandboxes" / "prog-1-abc" / "cgroup.procs")]
