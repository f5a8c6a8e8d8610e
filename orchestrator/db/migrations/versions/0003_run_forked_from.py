"""runs.forked_from / forked_from_step: a run started from another's checkpoints (``fork``).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("forked_from", sa.String(40), nullable=True))
    op.add_column("runs", sa.Column("forked_from_step", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "forked_from_step")
    op.drop_column("runs", "forked_from")
