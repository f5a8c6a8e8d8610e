"""The iterative tree walk behind disk accounting and workspace deletion (tools/sandbox/tree.py):
any depth, any path length, links not followed, and never led out of the tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.sandbox import tree

DEPTH = 3000  # os.fwalk and shutil.rmtree recurse: RecursionError near 1,000 levels


def _chain(root: Path, depth: int) -> None:
    """``root/d/d/...`` ``depth`` levels deep, made by descriptor (the path is past PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"x" * 10_000)
    os.close(fd)


def _usage(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return tree.disk_usage(fd)
    finally:
        os.close(fd)


def test_a_tree_thousands_of_levels_deep_is_measured_and_deleted(tmp_path: Path):
    root = tmp_path / "w"
    root.mkdir()
    _chain(root, DEPTH)
    assert _usage(root) >= DEPTH * 512 + 10_000
    tree.remove_tree(str(root))
    assert not root.exists()


def test_links_are_not_followed_and_hard_links_count_once(tmp_path: Path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1 << 20))
    root = tmp_path / "w"
    root.mkdir()
    (root / "to-big").symlink_to(big)
    (root / "to-outside").symlink_to(tmp_path)
    (root / "f").write_bytes(os.urandom(100_000))
    os.link(root / "f", root / "g")
    assert _usage(root) < 200_000  # the 1 MiB target not counted, f once
    tree.remove_tree(str(root))
    assert big.exists() and not root.exists()  # a link's target survives the link's deletion


def test_unreadable_directories_are_deleted_too(tmp_path: Path):
    root = tmp_path / "w"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("x")
    os.chmod(root / "a" / "b", 0)
    os.chmod(root / "a", 0)
    tree.remove_tree(str(root))
    assert not root.exists()


def test_a_directory_moved_out_during_the_walk_stops_it(tmp_path: Path):
    """Climbing back through ``..`` must land where the walk came from: a directory moved out
    of the tree meanwhile would otherwise lead it (and a deletion) into the host's files."""
    root, outside = tmp_path / "w", tmp_path / "outside"
    (root / "a" / "b" / "c").mkdir(parents=True)
    outside.mkdir()
    (outside / "keep").write_text("host file")

    def move_out(_dir: int, name: str, _st: os.stat_result) -> None:
        if name == "c":
            os.rename(root / "a" / "b", outside / "b")

    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(tree.TreeMoved):
            tree.walk(fd, move_out)
    finally:
        os.close(fd)
    assert (outside / "keep").read_text() == "host file"
