"""Event bus: wakes readers and workers when something happened.

The bus carries notifications only; the durable event log in the database is the
source of truth. A subscriber that misses a message (slow reader, reconnect)
notices the gap in sequence numbers and reads the log instead.
"""

from orchestrator.events.bus import EventBus, InProcessBus, Subscription, create_bus
from orchestrator.events.redis_bus import RedisBus

__all__ = ["EventBus", "InProcessBus", "RedisBus", "Subscription", "create_bus"]
