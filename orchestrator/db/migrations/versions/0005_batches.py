"""batches and batch_runs: runs submitted together by ``POST /v1/batches`` (RL rollouts).

A link table rather than a column on ``runs``: the hot paths that read and write runs (claim,
heartbeat, fenced writes) stay as they are, and a batch's runs are found by its primary key.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("workflow", sa.String(128), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("return_tokens", sa.Boolean(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_batches_tenant_idempotency_key"),
    )
    op.create_index("ix_batches_tenant_id", "batches", ["tenant", "id"])
    op.create_table(
        "batch_runs",
        sa.Column("batch_id", sa.String(40), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("idx", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.String(40), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False,
                  unique=True),
    )


def downgrade() -> None:
    op.drop_table("batch_runs")
    op.drop_index("ix_batches_tenant_id", table_name="batches")
    op.drop_table("batches")
