"""When the SGLang client says a backend can take eviction ranks (``Capacity.ranks_kv``)."""

from __future__ import annotations

import pytest

from scheduler.backends.sglang import SGLangBackend, ranks_kv
from tests.servers import SimServerProcess

PRIO = {"radix_eviction_policy": "priority"}


@pytest.mark.parametrize("info, expected", [
    ({}, False),  # an older server: no such flag
    ({"radix_eviction_policy": "lru"}, False),
    (PRIO, True),
    ({**PRIO, "enable_priority_scheduling": False, "abort_on_priority_when_disabled": True}, False),
    ({**PRIO, "enable_priority_scheduling": True}, False),  # largest first, preempting: ranks reorder it
    ({**PRIO, "enable_priority_scheduling": True, "schedule_low_priority_values_first": True}, False),
    ({**PRIO, "enable_priority_scheduling": True, "schedule_low_priority_values_first": True,
      "disable_priority_preemption": True}, True),
])
def test_ranks_kv_from_server_info(info: dict, expected: bool) -> None:
    assert ranks_kv(info) is expected


@pytest.mark.slow
async def test_the_simulator_server_reports_it_from_its_flags() -> None:
    for args, expected in ((("--radix-eviction-policy", "priority"), True), ((), False),
                           (("--radix-eviction-policy", "priority", "--enable-priority-scheduling"), False)):
        proc = SimServerProcess("--speed", "100", *args).start()
        backend = SGLangBackend(proc.url)
        try:
            assert (await backend.capacity()).ranks_kv is expected, args
        finally:
            await backend.close()
            proc.kill()
