"""retention and release hint: studies.files_removed_at/_bytes, studies.released_at/release_hint_at, cleanup_runs

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("released_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("release_hint_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("files_removed_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("files_removed_bytes", sa.BigInteger(), nullable=True))
    op.create_table(
        "cleanup_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("studies", sa.Integer(), server_default="0", nullable=False),
        sa.Column("files", sa.Integer(), server_default="0", nullable=False),
        sa.Column("bytes_freed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("free_bytes_after", sa.BigInteger(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cleanup_runs")),
    )


def downgrade() -> None:
    op.drop_table("cleanup_runs")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("files_removed_bytes")
        batch_op.drop_column("files_removed_at")
        batch_op.drop_column("release_hint_at")
        batch_op.drop_column("released_at")
