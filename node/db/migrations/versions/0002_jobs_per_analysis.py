"""Several jobs per instance (one per analysis), output numbering and succession, node settings.

- ``jobs.instance_id``: no longer UNIQUE, indexed; new ``jobs.content_key``;
- ``outputs.sop_instance_uid``: no longer UNIQUE, indexed, UNIQUE with ``job_id`` instead (an analysis
  that comes back to an earlier configuration makes the same objects again); new ``instance_number`` and
  ``supersedes``; ``series_instance_uid`` indexed;
- new table ``node_settings``.

The two UNIQUE constraints dropped were declared without a name (0001). PostgreSQL named them
``<table>_<column>_key``; SQLite keeps them unnamed inside the table's DDL, and cannot drop a constraint
at all: there the batch operation reflects the table under a naming convention that names them, and
recreates it without (copy, drop, rename; :func:`node.db.migrations.migrating` has foreign keys off). New
columns are appended on both backends (in the models, ``outputs.instance_number`` and ``supersedes``
come before ``path``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_UQ_CONVENTION = {"uq": "uq_%(table_name)s_%(column_0_name)s"}  # names SQLite's unnamed constraints


def _unique_on(table: str, column: str) -> str:
    """The name of the single-column UNIQUE constraint on ``table.column`` in this database."""
    if context.is_offline_mode():  # no database to look at: PostgreSQL's default name
        return f"{table}_{column}_key"
    for uc in sa.inspect(op.get_bind()).get_unique_constraints(table):
        if uc["column_names"] == [column]:
            return uc["name"] or f"uq_{table}_{column}"  # unnamed (SQLite): the name _UQ_CONVENTION gives
    raise RuntimeError(f"{table} has no UNIQUE constraint on {column}: not the schema of revision 0001")


def upgrade() -> None:
    with op.batch_alter_table("jobs", naming_convention=_UQ_CONVENTION) as batch:
        batch.drop_constraint(_unique_on("jobs", "instance_id"), type_="unique")
        batch.add_column(sa.Column("content_key", sa.String(64), nullable=True))
        batch.create_index("ix_jobs_instance_id", ["instance_id"])

    with op.batch_alter_table("outputs", naming_convention=_UQ_CONVENTION) as batch:
        batch.drop_constraint(_unique_on("outputs", "sop_instance_uid"), type_="unique")
        batch.add_column(sa.Column("instance_number", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("supersedes", sa.String(64), nullable=True))
        batch.create_unique_constraint("uq_outputs_job_sop", ["job_id", "sop_instance_uid"])
        batch.create_index("ix_outputs_sop_instance_uid", ["sop_instance_uid"])
        batch.create_index("ix_outputs_series_instance_uid", ["series_instance_uid"])

    op.create_table(
        "node_settings",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    """Back to 0001; fails (UNIQUE) once an instance has several jobs or an object several outputs."""
    op.drop_table("node_settings")

    with op.batch_alter_table("outputs") as batch:
        batch.drop_index("ix_outputs_series_instance_uid")
        batch.drop_index("ix_outputs_sop_instance_uid")
        batch.drop_constraint("uq_outputs_job_sop", type_="unique")
        batch.drop_column("supersedes")
        batch.drop_column("instance_number")
        batch.create_unique_constraint("outputs_sop_instance_uid_key", ["sop_instance_uid"])

    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_instance_id")
        batch.drop_column("content_key")
        batch.create_unique_constraint("jobs_instance_id_key", ["instance_id"])
