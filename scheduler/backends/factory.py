"""Backends from configuration (``ORCH_BACKENDS``)."""

from __future__ import annotations

from typing import Any

from scheduler.backends.base import Backend


def make_backend(config: Any) -> Backend:
    """``config`` has ``name``, ``kind`` (``sglang``, ``openai``, or ``local``: the SmolLM2 engine in
    this process), ``url``, ``model``, ``api_key`` and ``read_timeout_s`` (``orchestrator.settings.BackendConfig``)."""
    if config.kind == "sglang":
        from scheduler.backends.sglang import SGLangBackend

        return SGLangBackend(config.url, name=config.name, model=config.model, read_timeout=config.read_timeout_s)
    if config.kind == "openai":
        from scheduler.backends.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(config.url, api_key=config.api_key or "none", model=config.model or "default",
                                   name=config.name, timeout=config.read_timeout_s,
                                   capacity_tokens=getattr(config, "capacity_tokens", None) or 1_000_000)
    if config.kind == "local":
        from scheduler.local.engine import LocalEngine

        return LocalEngine(name=config.name)
    raise ValueError(f"unknown backend kind {config.kind!r}")
