"""The sandbox interface: where a program's tools run, away from the service.

A sandbox belongs to one program (one agent run). It owns a workspace (a directory
the program's tools may read and write) and runs commands in it under limits. Tools
never touch the host directly: file reads and writes go through the sandbox too, so
the same tool code works on a local subprocess sandbox and on a Kubernetes pod.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """What a command may use. ``None`` leaves a limit off. Where the machine allows (see
    docs/sandboxes.md), memory, processes, CPU and disk hold for all of a command's processes
    together, and memory, processes and disk for the whole sandbox."""

    wall_s: float = 30.0             # whole command, then the process group is killed
    cpu_s: int | None = 20           # RLIMIT_CPU per process; all the command's processes together (cgroup)
    memory_bytes: int | None = 1 << 30   # RLIMIT_AS per process; the sandbox's memory cgroup in total
    file_bytes: int | None = 64 << 20    # RLIMIT_FSIZE: largest file a command may write
    processes: int | None = 64       # the sandbox's pids cgroup (else RLIMIT_NPROC, per uid)
    open_files: int | None = 256     # RLIMIT_NOFILE
    output_bytes: int = 64 << 10     # stdout and stderr each kept up to this; the rest is dropped
    workspace_bytes: int | None = 256 << 20  # disk the workspace may hold (its filesystem's size)
    network: bool = False            # False: no network (a fresh network namespace)
    cpus: float | None = 1.0         # cores the sandbox's processes may use at once (cgroup cpu bandwidth)


@dataclass(frozen=True)
class ExecResult:
    """What a command did. ``error`` names a limit that ended it, or is None."""

    exit_code: int | None            # None when it was killed before it exited
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: str | None = None         # "timeout" | "memory" | "cpu" | "file_size" | "output" | "workspace_full" | ...
    signal: int | None = None        # the signal that ended the command, when one did (exit_code is then None)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.error is None


@dataclass(frozen=True)
class FileEntry:
    path: str                        # relative to the workspace root, "/"-separated
    is_dir: bool
    size: int


class SandboxError(Exception):
    """A sandbox operation the caller asked for was refused or failed (path outside the
    workspace, missing file, sandbox closed...). The message is fit to show the model."""


@dataclass
class SandboxInfo:
    """What the pool and the metrics read about a sandbox."""

    id: str
    kind: str
    workspace: str                   # a host path, or a path inside the pod
    disk_bytes: int = 0
    labels: dict[str, str] = field(default_factory=dict)


class Sandbox(abc.ABC):
    """One program's isolated place to run tools. All methods are safe to call concurrently."""

    id: str
    limits: Limits

    @abc.abstractmethod
    async def exec(self, argv: list[str], *, stdin: bytes | None = None,
                   limits: Limits | None = None, env: dict[str, str] | None = None) -> ExecResult:
        """Run ``argv`` in the workspace under ``limits`` (default: the sandbox's own)."""

    @abc.abstractmethod
    async def read_file(self, path: str, *, max_bytes: int = 1 << 20) -> bytes:
        """Read a file inside the workspace; ``SandboxError`` if it is outside, missing or too large."""

    @abc.abstractmethod
    async def write_file(self, path: str, data: bytes) -> None:
        """Create or replace a file inside the workspace (parents created)."""

    @abc.abstractmethod
    async def list_files(self, path: str = ".", *, recursive: bool = False, limit: int = 1000) -> list[FileEntry]:
        """Entries under ``path`` (inside the workspace)."""

    @abc.abstractmethod
    async def disk_bytes(self) -> int:
        """Bytes the workspace holds now."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill every process the sandbox runs now (cancel); the sandbox stays usable."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Kill everything and delete the workspace. Idempotent."""

    @abc.abstractmethod
    def info(self) -> SandboxInfo:
        """Identity and last known disk use."""
