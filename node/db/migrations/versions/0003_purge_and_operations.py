"""Purged files and the record of operator commands.

- ``instances.purged_at``, ``outputs.purged_at``: when ``gradcam-node purge`` or ``[retention]`` deleted
  the file (the row stays); nullable, so every existing row reads "kept";
- new table ``operations``: what each operator command and the retention loop did, and who asked.

Columns are only added, which both SQLite (``ALTER TABLE ... ADD COLUMN``, which the batch operation uses
when it can) and PostgreSQL do in place; they come last in the table on both backends.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)  # node.db.UtcDateTime


def upgrade() -> None:
    for table in ("instances", "outputs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("purged_at", _TS, nullable=True))

    op.create_table(
        "operations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("command", sa.String(32), nullable=False),
        sa.Column("arguments", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_operations_at", "operations", ["at"])


def downgrade() -> None:
    """Back to 0002: the record of operations and the purge times are lost (the files stay deleted)."""
    op.drop_index("ix_operations_at", table_name="operations")
    op.drop_table("operations")
    for table in ("outputs", "instances"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("purged_at")
