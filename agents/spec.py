"""What a user submits to run an agent: the ``agent`` workflow's input (in the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful software agent working in a sandboxed workspace. Use the tools to inspect "
    "files, write code and run it; read tool results before the next step. When the task is done, "
    "call final_answer with a short answer."
)


class SandboxSpec(BaseModel):
    """Limits for this run's tool commands. Above its tenant's ceilings (``sandbox`` in the
    tenant limits) a run is refused at submission; the schema's maxima are the service's."""

    model_config = ConfigDict(extra="forbid")
    wall_s: float = Field(default=30.0, gt=0, le=3600, description="Wall time of one command.")
    cpu_s: int = Field(default=20, ge=1, le=3600,
                       description="CPU seconds of one command, all its processes together.")
    memory_mb: int = Field(default=1024, ge=16, le=65536,
                           description="Memory of the sandbox's processes together (and address space of each).")
    output_kb: int = Field(default=64, ge=1, le=4096, description="Kept of stdout and of stderr, each.")
    workspace_mb: int = Field(default=256, ge=1, le=65536, description="Size of the workspace (disk).")


class AgentInput(BaseModel):
    """An agent: a system prompt, a task, tools, and budgets. It runs as one scheduler program."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200_000, description="The user's request: the first user message.")
    system_prompt: str = Field(default=DEFAULT_SYSTEM_PROMPT, max_length=200_000)
    model: str | None = Field(default=None, description="Model name sent to the backend (its default when unset).")
    backend: str | None = Field(default=None, description="Run every LLM call on this configured backend "
                                                          "(by name); any backend the scheduler picks when unset.")
    tools: list[str] | None = Field(
        default=None, description="Tool names from the service's registry; all built-ins when unset.")
    files: dict[str, str] = Field(default_factory=dict,
                                  description="Files to put in the workspace before the first turn (path: text).")
    tool_mode: Literal["auto", "native", "text"] = Field(
        default="auto",
        description="native: OpenAI tool calls only; text: tools described in the prompt and parsed from "
                    "<tool_call> blocks (models without tool calling); auto: native, and a text call is "
                    "accepted when the model writes one instead.")
    tool_choice: Literal["auto", "required"] = "auto"
    max_turns: int = Field(default=20, ge=1, le=1000, description="LLM turns at most.")
    max_tokens_per_turn: int = Field(default=512, ge=1, le=32_768)
    max_total_tokens: int | None = Field(
        default=200_000, ge=1, description="Prompt + completion tokens over all turns; the run stops past it.")
    time_budget_s: float | None = Field(default=600.0, gt=0, le=86_400,
                                        description="Wall time of the whole loop; an LLM call in flight is aborted.")
    temperature: float = Field(default=0.0, ge=0, le=2)
    seed: int | None = None
    stop_on_text_reply: bool = Field(
        default=True, description="A turn with no tool call ends the run with its text as the answer; "
                                  "when false the agent is reminded to use a tool or final_answer.")
    stop_strings: list[str] = Field(default_factory=list, max_length=16,
                                    description="The run ends when a turn's text contains one of these.")
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, names: list[str] | None) -> list[str] | None:
        from tools.builtins import BUILTIN_NAMES

        unknown = [n for n in names or [] if n not in BUILTIN_NAMES]
        if unknown:
            raise ValueError(f"unknown tools {unknown}; available: {', '.join(BUILTIN_NAMES)}")
        return names

    @field_validator("files")
    @classmethod
    def _relative(cls, files: dict[str, str]) -> dict[str, str]:
        for path in files:
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"file path {path!r} must be relative to the workspace, without '..'")
        return files
