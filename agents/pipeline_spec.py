"""What a user submits to run a multi-agent pipeline: the ``pipeline`` workflow's input.

A pipeline is Mixture-of-Agents: one or more layers of proposers (each may use its own model and
backend), then one aggregator whose answer is the run's output. Settings resolve from the most
specific place that sets them: the agent, then its layer, then the pipeline's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.pipeline_prompts import AGGREGATE_PROMPT


class AgentSettings(BaseModel):
    """Settings an agent, a layer or the pipeline may set; unset (None) means "inherit"."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(default=None, description="Model name sent to the backend.")
    backend: str | None = Field(default=None, description="Configured backend (by name) for this agent's calls; "
                                                          "any backend the scheduler picks when unset.")
    system_prompt: str | None = Field(default=None, max_length=100_000,
                                      description="First-layer proposers: their system prompt. Later layers and the "
                                                  "aggregator: the instruction put above the previous outputs.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32_768, description="Tokens this agent writes at most.")
    seed: int | None = None


class LayerSpec(AgentSettings):
    """A layer of proposers, run in parallel; its settings are the defaults of its agents."""

    agents: list[AgentSettings] = Field(min_length=1, max_length=16)


class PipelineInput(AgentSettings):
    """Layers of proposers and a final aggregator (the settings here are everyone's defaults)."""

    task: str = Field(min_length=1, max_length=200_000, description="The user's request.")
    layers: list[LayerSpec] = Field(min_length=1, max_length=8)
    aggregator: AgentSettings = Field(default_factory=AgentSettings)
    mode: Literal["wait", "staircase"] = Field(
        default="staircase",
        description="wait: each layer waits for the previous one to finish (classic MoA); staircase: proposers "
                    "stream in chunks and the next layer starts from the first chunks.")
    chunk_tokens: int = Field(default=32, ge=1, le=32_768, description="Tokens in a proposer chunk (staircase).")
    chunk_schedule: list[int] = Field(
        default_factory=list, max_length=64,
        description="Tokens of chunk 0, 1, ...; past its end ``chunk_tokens`` (e.g. [16, 32, 64]: a small first "
                    "chunk for a fast first token, larger ones for fewer rounds).")
    aggregator_chunk_tokens: int | None = Field(
        default=None, ge=1, le=32_768,
        description="Tokens an aggregating agent writes in a round that is not its last (default: that round's "
                    "chunk size). Its last round, when every input has finished, writes to the end.")
    continuation: Literal["auto", "turn", "prefix"] = Field(
        default="auto",
        description="How an aggregating agent's round goes on from its previous output (staircase). turn: its "
                    "output is a finished assistant turn, then a user turn gives what arrived and asks it to "
                    "continue (any chat backend). prefix: what arrived comes as user turns and its answer so far "
                    "as an open assistant turn that the model continues (continue_final_message: SGLang, vLLM "
                    "and the local engine honour it; a backend that does not renders a closed turn instead). "
                    "auto: prefix when every backend an aggregating agent may run on honours it, else turn.")
    stall_timeout_s: float = Field(default=30.0, gt=0, le=3600,
                                   description="A call that sends nothing for this long is dropped; the rest go on.")
    delta_interval_s: float = Field(default=0.05, ge=0, le=10,
                                    description="The aggregator's tokens are batched into one event per interval.")
    time_budget_s: float | None = Field(default=600.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _positive_schedule(self) -> PipelineInput:
        if any(n < 1 for n in self.chunk_schedule):
            raise ValueError("chunk_schedule entries must be >= 1")
        return self

    def chunk_size(self, index: int) -> int:
        """Tokens in chunk ``index`` of every proposer's output."""
        return self.chunk_schedule[index] if index < len(self.chunk_schedule) else self.chunk_tokens

    def round_tokens(self, index: int) -> int:
        """Tokens an aggregating agent writes in its round ``index`` when more input is to come."""
        return self.aggregator_chunk_tokens or self.chunk_size(index)

    def nodes(self) -> list[Node]:
        """Every agent of the pipeline, layer by layer, the aggregator last."""
        out = [Node(f"p{li}.{ai}", li, ai, _resolve(self, li, layer, agent))
               for li, layer in enumerate(self.layers) for ai, agent in enumerate(layer.agents)]
        out.append(Node("agg", len(self.layers), 0, _resolve(self, len(self.layers), None, self.aggregator)))
        return out

    def backends(self) -> set[str]:
        return {n.agent.backend for n in self.nodes() if n.agent.backend is not None}


@dataclass(frozen=True)
class ResolvedAgent:
    model: str | None
    backend: str | None
    system_prompt: str | None
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None


@dataclass(frozen=True)
class Node:
    """One agent: ``id`` is ``p<layer>.<index>`` for proposers and ``agg`` for the aggregator."""

    id: str
    layer: int
    index: int
    agent: ResolvedAgent

    @property
    def aggregates(self) -> bool:
        """Whether it reads the previous layer's outputs (every layer but the first)."""
        return self.layer > 0


_DEFAULTS = AgentSettings(temperature=0.7, top_p=1.0, max_tokens=512)


def _resolve(pipe: PipelineInput, index: int, layer: LayerSpec | None, agent: AgentSettings) -> ResolvedAgent:
    def pick(field: str, sources: tuple[AgentSettings | None, ...] = (agent, layer, pipe, _DEFAULTS)) -> object:
        for source in sources:
            value = getattr(source, field) if source is not None else None
            if value is not None:
                return value
        return None

    # the pipeline-wide system prompt is the proposers'; aggregating agents keep the synthesis instruction
    prompt = pick("system_prompt", (agent, layer, pipe) if index == 0 else (agent, layer))
    if prompt is None and index > 0:
        prompt = AGGREGATE_PROMPT
    return ResolvedAgent(model=pick("model"), backend=pick("backend"), system_prompt=prompt,  # type: ignore[arg-type]
                         temperature=pick("temperature"), top_p=pick("top_p"),  # type: ignore[arg-type]
                         max_tokens=pick("max_tokens"), seed=pick("seed"))  # type: ignore[arg-type]
