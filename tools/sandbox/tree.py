"""Walk, measure and delete a directory tree a sandboxed command made, whatever its shape.

A command can make a tree thousands of levels deep, with paths far beyond ``PATH_MAX``:
``os.fwalk`` and ``shutil.rmtree`` recurse once per level (``RecursionError`` at about 1,000
levels) and path-based calls fail past ``PATH_MAX``. Here the walk is a loop over an explicit
stack that holds one open directory at a time: every entry is reached by name relative to that
directory's fd (``O_NOFOLLOW``: a planted symlink is never followed), and the walk climbs back
with ``..``, checking that it lands on the very directory it came from (device and inode), so a
directory moved elsewhere during the walk cannot lead it out of the tree.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeMoved(OSError):
    """A directory was moved while the walk was inside it; the walk stopped there."""


@dataclass
class _Frame:
    """One directory on the way down: who it is, its name in its parent, what is left of it."""

    ident: tuple[int, int]
    name: str
    pending: list[str] = field(default_factory=list)


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _open_child(parent: int, name: str, make_searchable: bool) -> int:
    """Open the subdirectory ``name`` of ``parent``; a mode 000 directory is made searchable when
    asked (deletion by its owner: only an unprivileged service meets one it cannot open)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except PermissionError:
        if not make_searchable:
            raise
        os.chmod(name, 0o700, dir_fd=parent)
        return os.open(name, _DIR_FLAGS, dir_fd=parent)


def walk(root: int, on_entry: Callable[[int, str, os.stat_result], None],
         on_leave: Callable[[int, str], None] | None = None, *, make_searchable: bool = False) -> None:
    """Visit every entry under the directory fd ``root`` (which stays open and unchanged).

    ``on_entry(dir_fd, name, stat)`` sees each entry (not following links) before a directory is
    entered; ``on_leave(parent_fd, name)`` runs once a directory's entries are all visited, from
    its parent. Entries that vanish meanwhile are skipped. Raises :class:`TreeMoved` if the
    way back up does not lead to the directory the walk came down from.
    """
    cur = os.dup(root)
    try:
        frames = [_Frame(_ident(os.fstat(cur)), ".", os.listdir(cur))]
        while frames:
            top = frames[-1]
            if not top.pending:
                frames.pop()
                if frames:
                    cur = _climb(cur, frames[-1].ident)
                    if on_leave is not None:
                        on_leave(cur, top.name)
                continue
            name = top.pending.pop()
            try:
                st = os.stat(name, dir_fd=cur, follow_symlinks=False)
            except FileNotFoundError:
                continue
            on_entry(cur, name, st)
            if stat.S_ISDIR(st.st_mode):
                cur, frame = _descend(cur, name, make_searchable)
                if frame is not None:
                    frames.append(frame)
    finally:
        os.close(cur)


def _descend(cur: int, name: str, make_searchable: bool) -> tuple[int, _Frame | None]:
    """Step into ``name`` (the parent's fd is closed only once the child is open and listed);
    ``(cur, None)`` when it is gone, was swapped for a file or a link since it was seen, or
    (measuring only) cannot be read."""
    try:
        child = _open_child(cur, name, make_searchable)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP) or (
                exc.errno == errno.EACCES and not make_searchable):
            return cur, None
        raise
    try:
        frame = _Frame(_ident(os.fstat(child)), name, os.listdir(child))
    except BaseException:
        os.close(child)
        raise
    os.close(cur)
    return child, frame


def _climb(cur: int, expected: tuple[int, int]) -> int:
    """Back to the parent through ``..``, which must be the directory the walk came from."""
    up = os.open("..", _DIR_FLAGS, dir_fd=cur)
    if _ident(os.fstat(up)) != expected:
        os.close(up)
        raise TreeMoved(errno.ESTALE, "a directory was moved out of the tree during the walk")
    os.close(cur)
    return up


def disk_usage(root: int) -> int:
    """Bytes of blocks held under the directory fd ``root``, like ``du``: the directory itself
    included, links not followed, a file with several hard links counted once."""
    total = os.fstat(root).st_blocks * 512
    seen: set[tuple[int, int]] = set()

    def count(_dir: int, _name: str, st: os.stat_result) -> None:
        nonlocal total
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if _ident(st) in seen:
                return
            seen.add(_ident(st))
        total += st.st_blocks * 512

    walk(root, count)
    return total


def remove_contents(root: int) -> None:
    """Delete everything under the directory fd ``root`` (not ``root`` itself)."""
    def unlink(dir_fd: int, name: str, st: os.stat_result) -> None:
        if not stat.S_ISDIR(st.st_mode):
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass

    def rmdir(parent: int, name: str) -> None:
        try:
            os.rmdir(name, dir_fd=parent)
        except FileNotFoundError:
            pass

    walk(root, unlink, rmdir, make_searchable=True)


def remove_tree(path: str) -> None:
    """Delete the directory ``path`` and everything under it; a missing one is not an error."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        remove_contents(fd)
    finally:
        os.close(fd)
    os.rmdir(path)
