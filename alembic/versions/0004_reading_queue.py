"""reading queue: API tokens, audit events, feedback, patient identity, worklist indexes

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-30
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("patient_name", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("patient_birth_date", sa.Date(), nullable=True))
        batch_op.add_column(sa.Column("top_probe_score", sa.Float(), server_default="0", nullable=False))
        batch_op.create_index(
            "ix_studies_worklist",
            ["priority", "top_probe_score", "first_received_at", "id"],
            unique=False,
        )
    with op.batch_alter_table("probe_scores", schema=None) as batch_op:
        batch_op.create_index(
            "ix_probe_scores_current_condition",
            ["condition", "score", "study_id"],
            unique=False,
            postgresql_where=sa.text("current"),
            sqlite_where=sa.text("current"),
        )
    # Existing studies get their highest current probe score.
    op.execute(
        "UPDATE studies SET top_probe_score = COALESCE((SELECT MAX(p.score) FROM probe_scores p "
        "WHERE p.study_id = studies.id AND p.current), 0)"
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("key", name=op.f("uq_api_tokens_key")),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("token_name", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_at"), ["at"], unique=False)
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=True),
        sa.Column("token_name", sa.String(length=64), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("labels", JSON, nullable=True),
        sa.Column("scores", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_feedback_study_id_studies"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["report_id"], ["reports.id"], name=op.f("fk_feedback_report_id_reports"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_feedback_study_id"), ["study_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_feedback_report_id"), ["report_id"], unique=False)


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("audit_events")
    op.drop_table("api_tokens")
    with op.batch_alter_table("probe_scores", schema=None) as batch_op:
        batch_op.drop_index("ix_probe_scores_current_condition")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_worklist")
        batch_op.drop_column("top_probe_score")
        batch_op.drop_column("patient_birth_date")
        batch_op.drop_column("issuer_of_patient_id")
        batch_op.drop_column("patient_name")
