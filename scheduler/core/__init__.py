"""The program-aware scheduler core: sans-I/O (events and a clock in, decisions out)."""

from scheduler.core.decisions import (
    CollectSandbox, Decision, Dispatch, Pause, Pin, PrepareSandbox, Resume, Retain, Unpin,
)
from scheduler.core.events import (
    BackendObserved, Event, ProgramReleased, RequestArrived, RequestFinished, Tick, ToolEnded, ToolStarted,
)
from scheduler.core.policies import Policy, make_policy, policy_class, policy_names
from scheduler.core.scheduler import Scheduler, UnknownProgram
from scheduler.core.state import BackendView, Phase, Program, Status
from scheduler.core.tool_stats import ToolDurations, ToolStats

__all__ = [
    "BackendObserved", "BackendView", "CollectSandbox", "Decision", "Dispatch", "Event", "Pause", "Phase", "Pin",
    "Retain",
    "Policy", "PrepareSandbox", "Program", "ProgramReleased", "RequestArrived", "RequestFinished", "Resume",
    "Scheduler", "Status", "Tick", "ToolDurations", "ToolEnded", "ToolStarted", "ToolStats", "Unpin",
    "UnknownProgram", "make_policy", "policy_class", "policy_names",
]
