"""The ``evolve`` workflow's input: problems, models with prices, and the evolution knobs.

Checked at submission (a bad spec is a 422 and no run row): operator names against the
registry the workflow was registered with, percentiles against the number of models, the
group size against the population, a scorer that can give prompt logprobs for confidence.
Backend names are checked when the run starts (they belong to the serving process).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evolve.operators import Operators, check_names
from evolve.routing import default_percentiles
from evolve.templates import check_template


class ModelSpec(BaseModel):
    """One model = one backend of the service, with its sampling settings and prices."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="Label in the ledger and events.")
    backend: str | None = Field(default=None, max_length=128,
                                description="Backend (ORCH_BACKENDS name) serving it; default: `name`.")
    model: str | None = Field(default=None, max_length=256, description="Model name sent to the backend.")
    price_in: float = Field(default=0.0, ge=0, description="US dollars per million input (prompt) tokens.")
    price_out: float = Field(default=0.0, ge=0, description="US dollars per million output tokens.")
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=512, ge=1, le=32768)
    endpoint: Literal["chat", "completions"] = Field(
        default="chat", description="`chat` sends messages; `completions` sends the chat template as a prompt.")
    prompt_logprobs: bool = Field(default=False, description="Can score confidence (prefill with prompt logprobs).")
    chat_template: str = Field(default="auto", max_length=20000, description=(
        "How scoring and completions prompts are rendered: `auto` (the in-process engine's own template, "
        "else ChatML), `chatml`, or a Jinja template over `messages` and `add_generation_prompt`."))
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Merged into every request body.")

    @model_validator(mode="after")
    def _template(self) -> ModelSpec:
        check_template(self.chat_template)
        return self

    @property
    def backend_name(self) -> str:
        return self.backend or self.name


class Problem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, max_length=256)
    question: str = Field(min_length=1, max_length=100_000)
    answer: str | None = Field(default=None, max_length=1000,
                               description="Ground truth, if known: only used to report accuracy.")


class EvolveInput(BaseModel):
    """Squeeze-Evolve: a strong model seeds a population, later loops recombine groups of it on
    the model their confidence calls for, and a final step picks one answer per problem."""

    model_config = ConfigDict(extra="forbid")

    problems: list[Problem] = Field(min_length=1, max_length=1000)
    models: list[ModelSpec] = Field(min_length=1, max_length=8, description=(
        "Ordered by cost, most expensive first (price_in + price_out; ties keep this order). "
        "Loop 0 runs on the first."))
    population: int = Field(default=16, ge=1, le=256, description="N candidates written in loop 0.")
    k: int = Field(default=4, ge=1, le=32, description="Candidates per group.")
    groups: int | None = Field(default=None, ge=1, le=1024, description="M groups per loop; default N.")
    loops: int = Field(default=10, ge=1, le=100, description="Loops, loop 0 included.")
    percentiles: list[float] | None = Field(default=None, description=(
        "One per model boundary, in [0, 100], any order (sorted, as the reference implementation "
        "does); 100 sends every group to the more expensive side, 0 none; default evenly spaced."))
    fitness: str = Field(default="confidence", description="`confidence` or `diversity` (or a plug-in).")
    scorer: str | None = Field(default=None, description=(
        "Model (name) that scores confidence; default the cheapest with `prompt_logprobs`."))
    top_k: int = Field(default=20, ge=1, le=20, description="Prompt logprobs per token for confidence.")
    score_tail_only: bool = Field(default=True, description=(
        "Ask for the candidates' prompt logprobs only: one extra prefix-only call per problem and loop "
        "counts the tokens of the context its candidates share. Off: every pass returns the whole "
        "prompt's logprobs."))
    lite_fraction: float = Field(default=0.0, ge=0, le=1, description=(
        "Share of the cheapest model's groups, most confident first, that make no call."))
    lite_method: str = Field(default="majority", description="`majority` or `random`.")
    selection: str = Field(default="uniform", description="`uniform` or `softmax` (over answer vote shares).")
    selection_temperature: float = Field(default=1.0, gt=0, le=100)
    update: str = Field(default="replace", description="`replace` or `accumulate`.")
    recombination: str = Field(default="aggregate", description="`aggregate` or `synthesize`.")
    final: str = Field(default="majority", description="`majority` vote, or `synthesize` by the strongest model.")
    answer_format: str = Field(default="integer", description="Extractor: `integer`, `boxed`, `choice`.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    max_concurrency: int = Field(default=64, ge=1, le=4096, description="Model calls in flight for this run.")

    @model_validator(mode="after")
    def _consistent(self) -> EvolveInput:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        if self.k > self.population:
            raise ValueError(f"k ({self.k}) cannot exceed the population ({self.population})")
        if self.percentiles is not None:
            if len(self.percentiles) != len(self.models) - 1:
                raise ValueError(f"{len(self.models)} models need {len(self.models) - 1} percentiles, "
                                 f"got {len(self.percentiles)}")
            if any(not 0 <= p <= 100 for p in self.percentiles):
                raise ValueError("percentiles must be values in [0, 100]")
            # sorted, as routing sorts them: events and checkpoints show the order they act in
            self.percentiles = sorted(self.percentiles)
        if self.scorer is not None and self.scorer not in names:
            raise ValueError(f"scorer {self.scorer!r} is not one of the models")
        needs_fitness = len(self.models) > 1 or self.lite_fraction > 0
        if needs_fitness and self.fitness == "confidence" and self.scoring_model() is None:
            raise ValueError("confidence fitness needs a model with prompt_logprobs: true (or use diversity)")
        if self.scorer is not None and not self.scoring_model().prompt_logprobs:  # type: ignore[union-attr]
            raise ValueError(f"scorer {self.scorer!r} does not have prompt_logprobs: true")
        return self

    # ---- derived -----------------------------------------------------------------------------

    def ordered_models(self) -> list[ModelSpec]:
        """Most expensive first; equal prices keep the order given."""
        return sorted(self.models, key=lambda m: -(m.price_in + m.price_out))

    def boundaries(self) -> list[float]:
        return list(self.percentiles) if self.percentiles is not None else default_percentiles(len(self.models))

    def group_count(self) -> int:
        return self.groups or self.population

    def scoring_model(self) -> ModelSpec | None:
        if self.scorer is not None:
            return next(m for m in self.models if m.name == self.scorer)
        able = [m for m in self.ordered_models() if m.prompt_logprobs]
        return able[-1] if able else None


def input_model(ops: Operators) -> type[EvolveInput]:
    """``EvolveInput`` that also checks operator names against ``ops``."""

    class BoundEvolveInput(EvolveInput):
        model_config = ConfigDict(extra="forbid", title="EvolveInput")

        @model_validator(mode="after")
        def _known_operators(self) -> BoundEvolveInput:
            bad = check_names(ops, self.model_dump(include=set(_OPERATOR_FIELDS)))
            if bad:
                raise ValueError("; ".join(f"{field}: {msg}" for field, msg in bad))
            return self

    BoundEvolveInput.__name__ = BoundEvolveInput.__qualname__ = "EvolveInput"
    return BoundEvolveInput


_OPERATOR_FIELDS = ("fitness", "selection", "recombination", "update", "lite_method", "final", "answer_format")
