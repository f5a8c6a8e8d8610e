"""The allow-listed root a command sees (tools/sandbox/rootfs.py), as a plan: what is in it and
what never is. That the launcher builds it, and nothing else shows, is in
test_sandbox_containment.py."""

from __future__ import annotations

import os
from pathlib import Path

from tools.sandbox.rootfs import root_plan


def _targets(plan: list[list]) -> dict[str, list]:
    return {op[1] if op[0] in ("dir", "tmpfs", "file") else op[2]: op for op in plan}


def test_the_plan_is_an_allow_list():
    plan = _targets(root_plan("/srv/sb/prog-1", network=False, python="/usr/bin/python3", uid=65534, gid=65534))
    assert plan["/usr"] == ["bind", "/usr", "/usr"]
    assert all(t.startswith(("/usr", "/bin", "/sbin", "/lib", "/etc", "/dev", "/proc", "/tmp")) for t in plan), plan
    assert "/etc/shadow" not in plan and "/etc/resolv.conf" not in plan and "/etc/sudoers" not in plan
    assert plan["/etc/passwd"][2].splitlines() == ["root:x:0:0:root:/root:/usr/sbin/nologin",
                                                    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"]
    assert plan["/tmp"][:3] == ["tmpfs", "/tmp", "1777"] and plan["/dev"][0] == "tmpfs"
    assert {t for t, op in plan.items() if op[0] == "dev"} <= {f"/dev/{n}" for n in
                                                               ("null", "zero", "full", "random", "urandom", "tty")}


def test_network_adds_name_resolution_and_other_uids_get_an_account():
    plan = _targets(root_plan("/srv/sb/p", network=True, python=None, uid=1234, gid=1234))
    assert ("/etc/resolv.conf" in plan) == os.path.exists("/etc/resolv.conf")
    assert plan["/etc/passwd"][2].splitlines()[-1] == "sandbox:x:1234:1234:sandbox:/srv/sb/p:/bin/sh"
    assert plan["/etc/group"][2].splitlines()[-1] == "sandbox:x:1234:"


def test_a_python_outside_the_runtime_is_bound_read_only(tmp_path: Path):
    (tmp_path / "py" / "bin").mkdir(parents=True)
    (tmp_path / "py" / "bin" / "python3").touch()
    plan = _targets(root_plan("/srv/sb/p", network=False, python=str(tmp_path / "py" / "bin" / "python3"),
                              uid=65534, gid=65534))
    assert plan[str(tmp_path / "py")] == ["bind", str(tmp_path / "py"), str(tmp_path / "py")]


def test_a_workspace_inside_a_bound_tree_gets_its_neighbours_hidden():
    plan = root_plan("/usr/local/sandboxes/p", network=False, python=None, uid=65534, gid=65534)
    assert plan[-1] == ["tmpfs", "/usr/local/sandboxes", "755", "64k"]
    assert not [op for op in root_plan("/srv/sb/p", network=False, python=None, uid=65534, gid=65534)
                if op[0] == "tmpfs" and op[1] == "/srv/sb"]
