"""What an evolve run spent: tokens and money per model, calls per tier, lite picks.

One ``Ledger`` per loop (checkpointed with the loop) and their sum for the run. Money is
US dollars from each model's per-million-token prices: prompt tokens (generation and scoring)
at the input price, generated tokens at the output price. Everything is plain JSON so a loop's
ledger survives a restart with its checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from collections.abc import Iterable
from typing import Any

from scheduler.backends.base import Usage


@dataclass
class ModelUsage:
    calls: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    scoring_calls: int = 0
    scoring_tokens: int = 0          # prompt tokens of prefill-only confidence passes
    scoring_output_tokens: int = 0   # the one token a prefill-only pass still generates
    cost_usd: float = 0.0

    def add(self, other: ModelUsage) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class Price:
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclass
class Ledger:
    models: dict[str, ModelUsage] = field(default_factory=dict)
    tier_calls: dict[str, int] = field(default_factory=dict)  # model name or "lite" -> groups routed there
    lite: int = 0

    def _model(self, name: str) -> ModelUsage:
        return self.models.setdefault(name, ModelUsage())

    def generation(self, model: str, usage: Usage, price: Price) -> None:
        m = self._model(model)
        m.calls += 1
        m.input_tokens += usage.prompt_tokens
        m.cached_tokens += usage.cached_tokens
        m.output_tokens += usage.completion_tokens
        m.cost_usd += price.cost(usage.prompt_tokens, usage.completion_tokens)

    def scoring(self, model: str, usage: Usage, price: Price) -> None:
        m = self._model(model)
        m.scoring_calls += 1
        m.scoring_tokens += usage.prompt_tokens
        m.scoring_output_tokens += usage.completion_tokens
        m.cost_usd += price.cost(usage.prompt_tokens, usage.completion_tokens)

    def routed(self, tier: str, n: int = 1) -> None:
        self.tier_calls[tier] = self.tier_calls.get(tier, 0) + n
        if tier == "lite":
            self.lite += n

    @property
    def cost_usd(self) -> float:
        return sum(m.cost_usd for m in self.models.values())

    def tokens(self) -> dict[str, int]:
        ms = self.models.values()
        return {"input": sum(m.input_tokens for m in ms), "output": sum(m.output_tokens for m in ms),
                "scoring": sum(m.scoring_tokens for m in ms)}

    def to_dict(self) -> dict[str, Any]:
        return {"models": {k: asdict(v) for k, v in sorted(self.models.items())},
                "tier_calls": dict(sorted(self.tier_calls.items())), "lite": self.lite,
                "tokens": self.tokens(), "cost_usd": self.cost_usd}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        return cls({k: ModelUsage(**v) for k, v in data.get("models", {}).items()},
                   dict(data.get("tier_calls", {})), int(data.get("lite", 0)))

    @classmethod
    def total(cls, ledgers: Iterable[Ledger]) -> Ledger:
        out = cls()
        for ledger in ledgers:
            for name, usage in ledger.models.items():
                out._model(name).add(usage)
            for tier, n in ledger.tier_calls.items():
                out.tier_calls[tier] = out.tier_calls.get(tier, 0) + n
            out.lite += ledger.lite
        return out
