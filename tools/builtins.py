"""The built-in tools: run Python, run a shell command, read / write / list files, edit a file
by exact string replacement, and give the final answer.

Every one acts through the program's sandbox (``ctx.sandbox``), never on the host, so the
same tools run on a local subprocess sandbox or in a Kubernetes pod.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from tools.registry import ToolContext, ToolError, ToolRegistry, ToolResult
from tools.sandbox.base import ExecResult

_LIMIT_MESSAGES = {
    "timeout": "the command ran past its wall-time limit and was killed",
    "cpu": "the command used up its CPU-time limit and was killed",
    "memory": "the command ran out of its memory limit (all the sandbox's processes together)",
    "file_size": "the command tried to write a file larger than the limit",
    "output": "the command printed far more than the output limit and was killed",
    "workspace_full": "the workspace is full (its disk limit); delete files",
}


def format_exec(result: ExecResult) -> ToolResult:
    """A command's outcome as the model reads it: exit code, the limit that ended it, output."""
    parts = []
    if result.error:
        parts.append(f"Error: {_LIMIT_MESSAGES.get(result.error, result.error)}.")
    parts.append(f"exit code: {result.exit_code if result.exit_code is not None else 'killed'}")
    for label, text, cut in (("stdout", result.stdout, result.stdout_truncated),
                             ("stderr", result.stderr, result.stderr_truncated)):
        if text or cut:
            parts.append(f"{label}:\n{text}" + ("\n[output truncated]" if cut else ""))
    return ToolResult("\n".join(parts), ok=result.ok, error=None if result.ok else (result.error or "nonzero_exit"),
                      data={"exit_code": result.exit_code, "limit": result.error})


async def python(ctx: ToolContext,
                 code: Annotated[str, Field(description="Python 3 source to run; print what you want to see.")]
                 ) -> ToolResult:
    """Run a Python 3 program in the workspace and return its exit code, stdout and stderr."""
    interpreter = getattr(ctx.sandbox, "python", None) or "python3"
    return format_exec(await ctx.sandbox.exec([interpreter, "-"], stdin=code.encode()))


async def shell(ctx: ToolContext,
                command: Annotated[str, Field(description="A /bin/sh command line, run in the workspace.")]
                ) -> ToolResult:
    """Run a shell command in the workspace and return its exit code, stdout and stderr."""
    return format_exec(await ctx.sandbox.exec(["/bin/sh", "-c", command]))


async def read_file(ctx: ToolContext,
                    path: Annotated[str, Field(description="Path relative to the workspace.")]) -> str:
    """Read a text file from the workspace."""
    data = await ctx.sandbox.read_file(path, max_bytes=256 << 10)
    return data.decode("utf-8", errors="replace")


async def write_file(ctx: ToolContext,
                     path: Annotated[str, Field(description="Path relative to the workspace.")],
                     content: Annotated[str, Field(description="The whole new content of the file.")]) -> str:
    """Create or overwrite a file in the workspace."""
    data = content.encode()
    await ctx.sandbox.write_file(path, data)
    return f"wrote {len(data)} bytes to {path}"


async def list_files(ctx: ToolContext,
                     path: Annotated[str, Field(description="Directory relative to the workspace.")] = ".",
                     recursive: bool = False) -> str:
    """List the files in a workspace directory (recursively if asked)."""
    entries = await ctx.sandbox.list_files(path, recursive=recursive, limit=500)
    if not entries:
        return f"{path}: empty"
    return "\n".join(f"{e.path}/" if e.is_dir else f"{e.path}  ({e.size} bytes)" for e in entries)


async def str_replace(ctx: ToolContext,
                      path: Annotated[str, Field(description="File relative to the workspace.")],
                      old: Annotated[str, Field(description="Exact text to replace; must occur exactly once.")],
                      new: Annotated[str, Field(description="The replacement text.")]) -> str:
    """Edit a file by replacing one exact occurrence of a string with another."""
    text = (await ctx.sandbox.read_file(path, max_bytes=1 << 20)).decode("utf-8", errors="strict")
    count = text.count(old) if old else 0
    if count == 0:
        raise ToolError(f"the text to replace was not found in {path}; read the file and copy it exactly")
    if count > 1:
        raise ToolError(f"the text to replace occurs {count} times in {path}; include more context so it is unique")
    await ctx.sandbox.write_file(path, text.replace(old, new, 1).encode())
    line = text[: text.index(old)].count("\n") + 1
    return f"replaced 1 occurrence in {path} at line {line}"


async def final_answer(ctx: ToolContext, answer: str) -> ToolResult:
    """Give the final answer to the task; the run ends with it."""
    # ``answer`` has no description on purpose: small models copy a parameter's description
    # into its value ("The answer to the task.") instead of writing the answer.
    return ToolResult(answer, final=True)


BUILTIN_NAMES = ("python", "shell", "read_file", "write_file", "list_files", "str_replace", "final_answer")


def builtin_registry() -> ToolRegistry:
    """A fresh registry holding every built-in tool."""
    registry = ToolRegistry()
    for fn in (python, shell, read_file, write_file, list_files, str_replace, final_answer):
        registry.tool()(fn)
    return registry
