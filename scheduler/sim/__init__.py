"""SGLang engine simulator: virtual-time cluster runs and an SGLang-compatible HTTP server.

See README.md here for the model, the cost presets and their sources. The HTTP server lives in
``scheduler.sim.server`` (imported on demand: it pulls in FastAPI)."""

from scheduler.sim.clock import RealTimeClock, VirtualClock
from scheduler.sim.cluster import AgentWorkload, ClusterMetrics, VirtualCluster
from scheduler.sim.cost import PRESETS, CostModel, preset
from scheduler.sim.engine import EngineConfig, SimEngine, SimRequest
from scheduler.sim.radix import RadixCache
from scheduler.sim.script import AgentTraceScript, ChunkedScript, Plan, PseudoScript, Script, TextScript, Turn
from scheduler.sim.tokenizer import SimTokenizer, render_chat

__all__ = [
    "PRESETS", "AgentTraceScript", "AgentWorkload", "ChunkedScript", "ClusterMetrics", "CostModel", "EngineConfig",
    "Plan", "PseudoScript", "RadixCache", "RealTimeClock", "Script", "SimEngine", "SimRequest", "SimTokenizer",
    "TextScript", "Turn", "VirtualClock", "VirtualCluster", "preset", "render_chat",
]
