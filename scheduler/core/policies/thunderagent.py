"""``thunderagent``: a reimplementation of ThunderAgent's scheduler (arXiv 2602.13692;
its TR router, ThunderAgent-org/ThunderAgent ``ThunderAgent/scheduler/router.py`` and
``ThunderAgent/backend/state.py``, read at commit a7eef77) for side-by-side comparison.
Where the paper and the code agree, both are followed; where they differ, the default
is the paper's setting and the code's choice is a constructor option, so that the
benchmark can take the strongest of them (``bench/agentic.py``: ``thunderagent`` is the
best variant per cell).

- Every Δt = 5 s (``check_interval_s``; router.py ``scheduler_interval=5.0``): first
  restore from the global waiting queue, then check each backend for thrashing
  (router.py ``_scheduled_check``, l. 671-683): reasoning programs' tokens plus acting
  programs' tokens (weighted, below), plus 100 tokens per program
  (state.py ``BUFFER_PER_PROGRAM``), over the KV capacity (``max_total_num_tokens``, no
  fraction; the code's ``shared_tokens`` credit is never updated, ``update_shared_tokens``
  has no caller, so it is 0 as here).
- Acting programs' weight (``acting_decay``):
  ``True`` / ``"paper"`` (default): f(t) = 2^-t (t: seconds in the tool) in the thrashing
  check and in restore, the paper's §4.2 setting.
  ``"resume"``: the code's ``--use-acting-token-decay``: 2^-t only when restoring
  (state.py ``remaining_capacity_with_decay``, used by router.py ``_greedy_resume``
  l. 747); the thrashing check and new-program admission count acting programs in full
  (``remaining_capacity``).
  ``False`` / ``"none"``: the code's default (``use_acting_token_decay=False``,
  ``acting_token_weight=1.0``): acting programs count in full everywhere.
- Pause shortest programs first, acting ones before reasoning ones (router.py
  ``_pause_until_safe``, l. 685-717). An acting program is paused at once; a reasoning one
  finishes its call and its next request is held. Nothing is sent to the engine: its KV
  is evicted by LRU in due course and rebuilt by recomputation when restored. (The code's
  loop marks *every* reasoning program once the acting ones are gone, because marking
  does not lower ``remaining_capacity``; that only weakens it and is not reproduced.)
- Restore only at the tick: the queue ordered reasoning (a request waits), new, acting,
  smallest first within each, taken while the sum fits the free capacity of all
  backends (router.py ``_greedy_resume`` l. 719-844), then placed largest first
  (``placement``): ``"best"`` (default, the paper's best-fit decreasing): where it leaves
  the least room; ``"worst"`` (the code, l. 793-838, despite its docstring's "BFD"): on the
  backend with the most room, re-sorted after each placement.
- A new program is admitted at once only when nobody waits (fairness) and it fits; on
  the backend with the fewest active tokens (router.py ``_select_backend_for_new_program``,
  l. 249-281). Requests stick to their program's backend.
- ``force_resume_s`` (default None; the code: 1,800): a program whose request has waited
  that long is resumed regardless of capacity, on its former backend, or for a new one
  the backend with the fewest programs (router.py ``_wait_for_resume``, l. 846-868: the
  ``asyncio.wait_for`` timeout starts when the request starts waiting). Checked every
  ``tick_s`` (1 s), not only at Δt.
- ``token_estimate`` (default ``"exact"``): ``"chars"`` is the code's estimate of a waiting
  call's context (router.py l. 301-303, 393-405): the JSON payload's characters divided by
  a global characters-per-token ratio, learned from each answer's usage with momentum
  (0.2 new, 0.8 old; the first sample taken as is; initial 5.0); once the call is answered
  its exact usage replaces the estimate. The simulator has no text, so each program's
  payload has its own characters per token, drawn once per program id uniformly in
  ``chars_per_token`` (default 3.0-5.0: code and logs tokenize near 3 characters per
  token, English prose near 4-4.5, and JSON escaping adds some; low confidence); the
  estimate's error is that program's ratio against the learned global one.
- ``prepare_ahead`` (default 0): asynchronous environment preparation (paper §4.4, tool
  resource management): at each restore, the sandboxes of the next ``prepare_ahead``
  programs in restore order that did not fit are prepared before they resume, as
  ``program`` does. Every policy prepares a program's sandbox when it is admitted.
"""

from __future__ import annotations

import random

from scheduler.core.policies.base import register
from scheduler.core.policies.capacity import CapacityPolicy
from scheduler.core.state import BackendView, Phase, Program, Status

BUFFER_PER_PROGRAM = 100
_DECAY = {True: "paper", "paper": "paper", "resume": "resume", False: "none", "none": "none"}


@register("thunderagent")
class ThunderAgentPolicy(CapacityPolicy):
    def __init__(self, check_interval_s: float | None = None, acting_decay: bool | str = True,
                 placement: str = "best", force_resume_s: float | None = None, token_estimate: str = "exact",
                 prepare_ahead: int = 0, chars_per_token: tuple[float, float] = (3.0, 5.0)) -> None:
        super().__init__(check_interval_s, 1.0)
        if acting_decay not in _DECAY:
            raise ValueError(f"acting_decay must be one of True/'paper', 'resume', False/'none'; got {acting_decay!r}")
        if placement not in ("best", "worst"):
            raise ValueError(f"placement must be 'best' or 'worst'; got {placement!r}")
        if token_estimate not in ("exact", "chars"):
            raise ValueError(f"token_estimate must be 'exact' or 'chars'; got {token_estimate!r}")
        if force_resume_s is not None and force_resume_s <= 0:
            raise ValueError(f"force_resume_s must be positive or None; got {force_resume_s!r}")
        if prepare_ahead < 0:
            raise ValueError(f"prepare_ahead must be >= 0; got {prepare_ahead!r}")
        lo, hi = chars_per_token
        if not 0 < lo <= hi:
            raise ValueError(f"chars_per_token must be 0 < low <= high; got {chars_per_token!r}")
        self.decay = _DECAY[acting_decay]
        self.acting_decay = self.decay != "none"
        self.placement = placement
        self.force_resume_s = force_resume_s
        self.token_estimate = token_estimate
        self.prepare_ahead = prepare_ahead
        self.chars_per_token = (lo, hi)
        self.char_ratio = 5.0           # router.py: initial chars per token
        self._ratio_initialized = False
        self._estimate: dict[str, int] = {}  # program id -> estimated context of its waiting/running call
        self.forced_resumes = 0

    # ---- accounting -------------------------------------------------------------------

    def tokens(self, p: Program) -> int:
        """The context the code believes ``p`` has: the estimate of its current call while it
        reasons (``token_estimate="chars"``), else the last answer's exact usage."""
        if p.phase is Phase.REASONING:
            est = self._estimate.get(p.id)
            if est is not None:
                return est
        return p.tokens

    def weight(self, p: Program, now: float, *, for_resume: bool = False) -> float:
        if self.decay == "paper" or (self.decay == "resume" and for_resume):
            return 2.0 ** -p.time_in_tool(now)
        return 1.0

    def cost(self, p: Program, now: float, *, for_resume: bool = False) -> float:
        if p.phase is Phase.REASONING:
            return float(self.tokens(p))
        return self.tokens(p) * self.weight(p, now, for_resume=for_resume)

    def footprint(self, b: BackendView, now: float, *, for_resume: bool = False) -> float:
        programs = self.resident(b)
        return sum(self.cost(p, now, for_resume=for_resume) for p in programs) + BUFFER_PER_PROGRAM * len(programs)

    def fits_alone(self, p: Program, b: BackendView) -> bool:
        return self.tokens(p) <= self.limit(b)

    def chars_per_token_of(self, program_id: str) -> float:
        """The simulated payload's characters per token for this program (stable per id)."""
        return random.Random(f"chars-per-token/{program_id}").uniform(*self.chars_per_token)

    # ---- events --------------------------------------------------------------------------

    def on_request(self, p: Program, new: bool, now: float) -> None:
        if self.token_estimate == "chars" and p.pending:
            prompt = p.pending[-1].prompt_tokens
            self._estimate[p.id] = int(prompt * self.chars_per_token_of(p.id) / self.char_ratio)
        if p.status is Status.ACTIVE and p.backend is not None:
            self.s.dispatch(p, p.backend)
            return
        if new and not any(q is not p for q in self.waiting()):
            backends = self.s.healthy_backends(p)
            need = self.tokens(p) + BUFFER_PER_PROGRAM
            fits = [b for b in backends if self.limit(b) - self.footprint(b, now) >= need]
            if fits:
                active = {b.name: sum(self.tokens(q) for q in self.resident(b)) for b in fits}
                self.admit(p, min(fits, key=lambda b: (active[b.name], b.name)).name)
        # otherwise it waits for the next tick (or its forced resume)

    def _answered(self, p: Program) -> None:
        """Usage is known: the exact context replaces the estimate, and the global ratio learns
        from this call (router.py ``update_program_after_request``)."""
        if p.inflight or p.pending or self._estimate.pop(p.id, None) is None:
            return  # another call of the program is still estimated
        sample = self.chars_per_token_of(p.id)
        if not self._ratio_initialized:
            self.char_ratio, self._ratio_initialized = sample, True
        else:
            self.char_ratio = 0.2 * sample + 0.8 * self.char_ratio

    def on_finished(self, p: Program, now: float) -> None:
        self._answered(p)

    def on_tool_start(self, p: Program, now: float) -> None:
        self._answered(p)

    def on_release(self, p: Program, now: float) -> None:
        self._estimate.pop(p.id, None)

    def after_release(self, now: float) -> None:
        pass  # restore happens at the tick only

    def on_tick(self, now: float) -> None:
        if self.force_resume_s is not None:
            self.force_resumes(now)
        if now - self._last_check < self.check_interval_s:
            return
        self._last_check = now
        self.restore(now)
        for b in self.s.healthy_backends():
            self.relieve(b, now)

    # ---- pause and restore ---------------------------------------------------------------

    def force_resumes(self, now: float) -> None:
        """Requests that have waited ``force_resume_s``: resumed regardless of capacity."""
        assert self.force_resume_s is not None
        for p in self.waiting():
            if not p.pending or now - p.pending[0].arrived < self.force_resume_s:
                continue
            backends = self.s.healthy_backends(p)
            if not backends:
                continue
            names = {b.name for b in backends}
            if p.backend in names:
                target = p.backend
            else:
                target = min(backends, key=lambda b: (len(self.s.resident[b.name]), b.name)).name
            self.forced_resumes += 1
            self.admit(p, target)

    def relieve(self, b: BackendView, now: float) -> None:
        programs = self.resident(b)
        total = self.footprint(b, now)
        limit = self.limit(b)
        if total <= limit:
            return

        def score(p: Program) -> float:
            return 1.0 / max(1, self.tokens(p)) + (1.0 if p.phase is Phase.ACTING else 0.0)

        for p in sorted(programs, key=score, reverse=True):
            if total <= limit:
                break
            total -= self.cost(p, now) + BUFFER_PER_PROGRAM
            self.s.pause(p)

    def restore(self, now: float) -> None:
        queue = self.waiting()
        if not queue:
            return

        def group(p: Program) -> int:
            if p.status is Status.WAITING:
                return 1
            return 0 if p.phase is Phase.REASONING else 2

        room = {b.name: self.limit(b) - self.footprint(b, now, for_resume=True) for b in self.s.healthy_backends()}
        free = sum(max(0.0, r) for r in room.values())
        chosen: list[Program] = []
        left_over: list[Program] = []
        used = 0.0
        for p in sorted(queue, key=lambda p: (group(p), self.tokens(p))):
            need = self.tokens(p) + BUFFER_PER_PROGRAM
            if used + need <= free:
                chosen.append(p)
                used += need
            else:
                left_over.append(p)
        for p in sorted(chosen, key=lambda p: -self.tokens(p)):  # largest first
            need = self.tokens(p) + BUFFER_PER_PROGRAM
            fits = [(left - need, name) for name, left in room.items()
                    if left >= need and (p.allowed is None or name in p.allowed)]
            if not fits:
                left_over.append(p)
                continue
            # best fit: the least room left; worst fit (the code): the most room
            backend = min(fits)[1] if self.placement == "best" else min((-left, name) for left, name in fits)[1]
            room[backend] -= need
            self.admit(p, backend)
        prepared = 0
        for p in sorted(left_over, key=lambda p: (group(p), self.tokens(p))):
            if prepared >= self.prepare_ahead:
                break
            self.s.prepare_sandbox(p)  # asynchronous environment preparation (paper §4.4)
            prepared += 1
