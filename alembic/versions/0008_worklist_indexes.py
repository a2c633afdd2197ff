"""worklist indexes: the worklist order as stored (descending keys), current probe scores by study

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

``ix_studies_worklist`` is rebuilt with the order's own directions (priority and
top score descending, arrival and id ascending), so the first page is an index
scan that stops after a page, without a sort. ``ix_probe_scores_current_study``
holds every current score of a study in one index entry range: the worklist
rows' probe scores and the probe filter's per-study check are read from the
index alone (bench/api.py).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

WORKLIST_ORDER: list[str | sa.TextClause] = [sa.text("priority DESC"), sa.text("top_probe_score DESC"), "first_received_at", "id"]


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_worklist")
        batch_op.create_index("ix_studies_worklist", WORKLIST_ORDER, unique=False)
    with op.batch_alter_table("probe_scores", schema=None) as batch_op:
        batch_op.create_index(
            "ix_probe_scores_current_study",
            ["study_id", "condition", "score"],
            unique=False,
            postgresql_where=sa.text("current"),
            sqlite_where=sa.text("current"),
        )


def downgrade() -> None:
    with op.batch_alter_table("probe_scores", schema=None) as batch_op:
        batch_op.drop_index("ix_probe_scores_current_study")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_worklist")
        batch_op.create_index("ix_studies_worklist", ["priority", "top_probe_score", "first_received_at", "id"], unique=False)
