"""Where a program's tools run: the interface, the local subprocess sandbox, and the pool."""

from tools.sandbox.base import ExecResult, FileEntry, Limits, Sandbox, SandboxError, SandboxInfo
from tools.sandbox.pool import PoolStats, SandboxPool
from tools.sandbox.subprocess import SubprocessSandbox

__all__ = ["ExecResult", "FileEntry", "Limits", "PoolStats", "Sandbox", "SandboxError", "SandboxInfo",
           "SandboxPool", "SubprocessSandbox"]
