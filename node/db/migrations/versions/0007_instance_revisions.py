"""Revisions of a received instance: ``instances.revision``, 1 as first received, one more each time the same
SOP Instance UID comes again with other content (another patient, study or pixels), whose results then get
output UIDs of their own (:mod:`node.receive.revision`); ``instances.earlier_paths``, the files of the
earlier revisions, kept and purged with the instance's. Existing rows are revision 1, with none.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("earlier_paths", sa.Text(), nullable=True))


def downgrade() -> None:
    """Back to 0006: which revision an instance is at, and its earlier files, are no longer recorded (its
    path still names its latest file)."""
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("earlier_paths")
        batch.drop_column("revision")
