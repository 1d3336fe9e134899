"""Which attempts ended their send: ``send_attempts.send_status``, the status an attempt left its send in
(``sent``, ``failed`` or ``pending``), so that ``/metrics``' count of ended sends is a true counter: it was
a count of sends by their status now, which fell when ``resend`` put a failed or sent send back to pending
(Prometheus reads a fall as a reset and ``rate()`` jumps).

Existing rows: the latest attempt of each send that is ``sent`` or ``failed`` now is marked so, every other
attempt ``pending``; the counter therefore continues exactly from the value it had before the upgrade.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("send_attempts") as batch:
        batch.add_column(sa.Column("send_status", sa.String(16), nullable=True))
    op.execute("UPDATE send_attempts SET send_status = 'pending'")
    op.execute(
        "UPDATE send_attempts SET send_status = (SELECT lower(s.status) FROM sends s WHERE s.id = send_id)"
        " WHERE id IN (SELECT max(a.id) FROM send_attempts a JOIN sends s ON s.id = a.send_id"
        " WHERE lower(s.status) IN ('sent', 'failed') GROUP BY a.send_id)"
    )


def downgrade() -> None:
    """Back to 0005: which attempts ended their sends is lost."""
    with op.batch_alter_table("send_attempts") as batch:
        batch.drop_column("send_status")
