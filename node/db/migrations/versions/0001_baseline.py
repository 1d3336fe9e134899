"""Baseline: the schema that ``create_all`` made before migrations existed (node/db.py at 0871801).

Databases of that release have exactly these tables and no ``alembic_version``; the node stamps them
with this revision (:func:`node.db.migrations.upgrade`). Written out table by table, in the order and form
``create_all`` emitted them: UNIQUE constraints declared ``unique=True`` on a column are unnamed (SQLite:
an automatic index; PostgreSQL: ``<table>_<column>_key``), enums are VARCHAR(16) without CHECK, booleans
have no CHECK, timestamps are ``DATETIME`` on SQLite and ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_UID = sa.String(64)  # DICOM UI
_ENUM = sa.String(16)  # node.db._enum: values stored as VARCHAR(16)
_TS = sa.DateTime(timezone=True)  # node.db.UtcDateTime


def upgrade() -> None:
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("calling_ae", sa.String(64), nullable=False),
        sa.Column("called_ae", sa.String(64), nullable=False),
        sa.Column("peer_host", sa.String(255), nullable=False),
        sa.Column("peer_port", sa.Integer(), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("ended_at", _TS, nullable=True),
        sa.Column("status", _ENUM, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("n_received", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_associations_status", "associations", ["status"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", _UID, nullable=False),
        sa.Column("sop_class_uid", _UID, nullable=False),
        sa.Column("study_instance_uid", _UID, nullable=False),
        sa.Column("series_instance_uid", _UID, nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("transfer_syntax", _UID, nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("association_id", sa.Integer(), nullable=True),
        sa.Column("calling_ae", sa.String(64), nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("times_received", sa.Integer(), nullable=False),
        sa.Column("status", _ENUM, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
        sa.ForeignKeyConstraint(["association_id"], ["associations.id"]),
    )
    op.create_index("ix_instances_study_instance_uid", "instances", ["study_instance_uid"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("status", _ENUM, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=True),
        sa.Column("reply_ae", sa.String(64), nullable=False),
        sa.Column("consensus", sa.Boolean(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("instance_id"),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"]),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])

    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("sop_class_uid", _UID, nullable=False),
        sa.Column("sop_instance_uid", _UID, nullable=False),
        sa.Column("series_instance_uid", _UID, nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    op.create_index("ix_outputs_job_id", "outputs", ["job_id"])

    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("builder", sa.String(64), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("positive", sa.Boolean(), nullable=False),
        sa.Column("cam_peak_row", sa.Integer(), nullable=False),
        sa.Column("cam_peak_col", sa.Integer(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=False),
        sa.Column("ms", sa.Float(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "model", name="uq_results_job_model"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
    )
    op.create_index("ix_results_job_id", "results", ["job_id"])

    op.create_table(
        "sends",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("ae_title", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("status", _ENUM, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("sent_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "destination", name="uq_sends_job_destination"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
    )
    op.create_index("ix_sends_job_id", "sends", ["job_id"])
    op.create_index("ix_sends_status", "sends", ["status"])

    op.create_table(
        "send_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("send_id", sa.Integer(), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["send_id"], ["sends.id"]),
    )
    op.create_index("ix_send_attempts_send_id", "send_attempts", ["send_id"])


def downgrade() -> None:
    for table in ("send_attempts", "sends", "results", "outputs", "jobs", "instances", "associations"):
        op.drop_table(table)
