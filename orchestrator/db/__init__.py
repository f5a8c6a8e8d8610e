"""Persistence: tables, engine creation and migrations."""

from orchestrator.db.engine import create_engine, migrate
from orchestrator.db.models import Base, Run, RunEvent, RunStep, Worker

__all__ = ["Base", "Run", "RunEvent", "RunStep", "Worker", "create_engine", "migrate"]
