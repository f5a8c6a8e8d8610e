"""A workspace of fixed size: its own ext4 filesystem in an image file, mounted through a loop device.

Measuring a workspace after each command lets one command write gigabytes before anyone
looks. A filesystem of ``workspace_bytes`` refuses the write itself (``ENOSPC``), for every
process of every command together, before the host's disk fills. An image file, rather than a
tmpfs, because it is disk (a tmpfs workspace would live in memory and count against the
sandbox's memory limit) and it outlives the service: the mount stays in the mount namespace
when the service process dies, and a service started afresh (a new container) mounts the image
again, so a resumed run finds its files either way.

The image is ``<root>/.<workspace name>.img`` (0600; no workspace name starts with a dot),
sparse: it takes the disk its files take. It is made when the workspace is first used, at the
size the sandbox's limits say then, and deleted with the workspace.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TOOLS_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
MIN_BYTES = 1 << 20          # the smallest ext4 mkfs makes here
BYTES_PER_INODE = 4096       # files a workspace may hold: one per 4 KiB (a 3,000-level tree needs 12 MiB)
FULL_BELOW = 64 << 10        # free space under this: the workspace is full (ext4 keeps a few blocks back)
MNT_DETACH = 2


class VolumeError(Exception):
    """The image could not be made or mounted (the message says which tool said what)."""


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, timeout=60, env={"PATH": TOOLS_PATH})
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        raise VolumeError(f"{os.path.basename(argv[0])}: {why or f'exit {proc.returncode}'}")


@dataclass(frozen=True)
class Volume:
    """The image file ``image`` and where it is mounted, ``mountpoint`` (the workspace)."""

    image: Path
    mountpoint: Path

    def mounted(self) -> bool:
        return os.path.ismount(self.mountpoint)

    def ensure(self, size: int, uid: int | None, gid: int | None) -> None:
        """Mount the workspace's filesystem, making it first if there is none yet.

        Already mounted (by this process, or by one before it in this mount namespace): nothing
        to do. The size is that of the first use; a larger one asked for later is not applied.
        """
        if self.mounted():
            return
        fresh = not self.image.exists()
        if fresh:
            self._make(max(size, MIN_BYTES), uid, gid)
        _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", str(self.image), str(self.mountpoint)])
        if fresh:
            os.rmdir(self.mountpoint / "lost+found")  # not the workspace's; fsck makes it again if needed

    def _make(self, size: int, uid: int | None, gid: int | None) -> None:
        owner = f"{uid if uid is not None else os.geteuid()}:{gid if gid is not None else os.getegid()}"
        fd = os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        try:
            # no journal: a workspace is scratch space, and it keeps the whole size for files
            _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-i", str(BYTES_PER_INODE),
                  "-E", f"root_owner={owner},nodiscard", str(self.image)])
        except BaseException:
            self.image.unlink(missing_ok=True)
            raise

    def destroy(self) -> None:
        """Unmount (lazily: the kernel lets go of the loop device once nothing uses it) and
        delete the image."""
        if self.mounted():
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.umount2(str(self.mountpoint).encode(), MNT_DETACH) != 0:
                raise OSError(ctypes.get_errno(), f"umount {self.mountpoint}: {os.strerror(ctypes.get_errno())}")
        self.image.unlink(missing_ok=True)

    def full(self) -> bool:
        """Mounted and out of space: the last write may well have failed with ENOSPC."""
        if not self.mounted():
            return False
        st = os.statvfs(self.mountpoint)
        return st.f_bavail * st.f_frsize < FULL_BELOW


@functools.cache
def available() -> bool:
    """Whether this process can make and mount a volume (root, ``mkfs.ext4``, loop devices):
    tried once, on a 1 MiB image in a temporary directory."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4", path=TOOLS_PATH) is None:
        return False
    with tempfile.TemporaryDirectory(prefix="orch-volume-probe-") as tmp:
        volume = Volume(Path(tmp) / "probe.img", Path(tmp) / "mnt")
        volume.mountpoint.mkdir()
        try:
            volume.ensure(MIN_BYTES, None, None)
        except (OSError, VolumeError, subprocess.SubprocessError) as exc:
            log.info("workspace volumes unavailable: %s", exc)
            return False
        finally:
            volume.destroy()
    return True


__all__ = ["Volume", "VolumeError", "available"]
