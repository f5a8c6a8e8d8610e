"""runs.queue: the named queue a run waits in (``ORCH_QUEUES`` sets their concurrency).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("queue", sa.String(64), nullable=False, server_default="default"))
    op.create_index("ix_runs_queue_status", "runs", ["queue", "status", "tenant"])


def downgrade() -> None:
    op.drop_index("ix_runs_queue_status", table_name="runs")
    op.drop_column("runs", "queue")
