"""Leases on jobs and sends, and the delivery of each file of a send.

- ``jobs.leased_by``, ``jobs.lease_until``: the worker process that holds a running job and until when; a
  job whose lease ran out (its worker vanished) is claimable again. Nullable: existing rows hold no lease.
- ``sends.leased_by``, ``sends.lease_until``: the same for a send in progress.
- new table ``deliveries``: one row per output instance a destination acknowledged for a send, written as
  each C-STORE succeeds, so that a send interrupted by a kill goes on with the files not yet delivered.

Columns are only added, which both SQLite and PostgreSQL do in place.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)  # node.db.UtcDateTime


def upgrade() -> None:
    for table in ("jobs", "sends"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("leased_by", sa.String(128), nullable=True))
            batch.add_column(sa.Column("lease_until", _TS, nullable=True))
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("send_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("delivered_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["send_id"], ["sends.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("send_id", "sop_instance_uid", name="uq_deliveries_send_sop"),
    )
    op.create_index("ix_deliveries_send_id", "deliveries", ["send_id"])


def downgrade() -> None:
    """Back to 0003: leases and the record of delivered files are lost (a resumed send sends them all)."""
    op.drop_index("ix_deliveries_send_id", table_name="deliveries")
    op.drop_table("deliveries")
    for table in ("sends", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lease_until")
            batch.drop_column("leased_by")
