"""Scheduling policies, selected by name (``make_policy("program")``)."""

from scheduler.core.policies import program, request, thunderagent, ttl  # noqa: F401  (registration)
from scheduler.core.policies.base import Policy, make_policy, policy_class, policy_names, register

__all__ = ["Policy", "make_policy", "policy_class", "policy_names", "register"]
