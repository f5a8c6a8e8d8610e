"""workers.liveness_lock: the worker holds a PostgreSQL session lock while it lives.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows of workers from before this column (still running during a rolling upgrade) hold no
    # lock: false keeps them out of the fast dead-owner check, so only their leases expire them.
    op.add_column("workers", sa.Column("liveness_lock", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("workers", "liveness_lock")
