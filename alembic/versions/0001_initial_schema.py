"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-27
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    
    op.create_table('studies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('accession_number', sa.String(length=16), nullable=True),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('patient_age', sa.String(length=4), nullable=True),
    sa.Column('patient_sex', sa.String(length=16), nullable=True),
    sa.Column('study_date', sa.Date(), nullable=True),
    sa.Column('study_description', sa.String(length=64), nullable=True),
    sa.Column('modalities', sa.String(length=64), nullable=True),
    sa.Column('body_part', sa.String(length=64), nullable=True),
    sa.Column('source', sa.String(length=16), server_default='listener', nullable=False),
    sa.Column('state', sa.String(length=16), server_default='RECEIVING', nullable=False),
    sa.Column('state_changed_at', sa.DateTime(), nullable=False),
    sa.Column('urgency', sa.String(length=16), nullable=True),
    sa.Column('priority', sa.Integer(), server_default='0', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('first_received_at', sa.DateTime(), nullable=False),
    sa.Column('last_received_at', sa.DateTime(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_studies')),
    sa.UniqueConstraint('study_instance_uid', name=op.f('uq_studies_study_instance_uid'))
    )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index('ix_studies_last_received_at', ['last_received_at'], unique=False)
        batch_op.create_index('ix_studies_state_changed', ['state', 'state_changed_at'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('topic', sa.String(length=32), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('priority', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('sent_at', sa.DateTime(), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_outbox_study_id_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_study_id'), ['study_id'], unique=False)
        batch_op.create_index('ix_outbox_unsent', ['sent_at', 'id'], unique=False)

    op.create_table('probe_scores',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('condition', sa.String(length=64), nullable=False),
    sa.Column('question', sa.Text(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('current', sa.Boolean(), server_default=sa.text('(true)'), nullable=False),
    sa.Column('model_id', sa.String(length=256), nullable=False),
    sa.Column('prompt_version', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_probe_scores_study_id_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_probe_scores'))
    )
    with op.batch_alter_table('probe_scores', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_probe_scores_study_id'), ['study_id'], unique=False)

    op.create_table('reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('current', sa.Boolean(), server_default=sa.text('(true)'), nullable=False),
    sa.Column('draft_text', sa.Text(), nullable=True),
    sa.Column('impression', sa.Text(), nullable=True),
    sa.Column('urgency', sa.String(length=16), nullable=True),
    sa.Column('raw_output', sa.Text(), nullable=False),
    sa.Column('thinking', sa.Text(), nullable=True),
    sa.Column('parse_status', sa.String(length=16), nullable=False),
    sa.Column('parse_error', sa.Text(), nullable=True),
    sa.Column('structured', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('model_id', sa.String(length=256), nullable=False),
    sa.Column('model_revision', sa.String(length=64), nullable=True),
    sa.Column('prompt_version', sa.String(length=64), nullable=False),
    sa.Column('mode', sa.String(length=16), server_default='json', nullable=False),
    sa.Column('min_pixels', sa.Integer(), nullable=True),
    sa.Column('max_pixels', sa.Integer(), nullable=True),
    sa.Column('n_images', sa.Integer(), server_default='0', nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('timings', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_reports_study_id_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reports'))
    )
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reports_study_id'), ['study_id'], unique=False)
        batch_op.create_index('uq_reports_current_per_study', ['study_id'], unique=True, postgresql_where=sa.text('current'), sqlite_where=sa.text('current'))

    op.create_table('series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=True),
    sa.Column('series_number', sa.Integer(), nullable=True),
    sa.Column('series_description', sa.String(length=64), nullable=True),
    sa.Column('body_part', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_series_study_id_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_series')),
    sa.UniqueConstraint('series_instance_uid', name=op.f('uq_series_series_instance_uid'))
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_series_study_id'), ['study_id'], unique=False)

    op.create_table('findings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('report_id', sa.Integer(), nullable=False),
    sa.Column('ordinal', sa.Integer(), server_default='0', nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('anatomy', sa.String(length=128), nullable=True),
    sa.Column('laterality', sa.String(length=16), nullable=True),
    sa.Column('presence', sa.String(length=16), nullable=True),
    sa.Column('severity', sa.String(length=16), nullable=True),
    sa.Column('image_ref', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['report_id'], ['reports.id'], name=op.f('fk_findings_report_id_reports'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_findings'))
    )
    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_findings_report_id'), ['report_id'], unique=False)

    op.create_table('instances',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=True),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('number_of_frames', sa.Integer(), server_default='1', nullable=False),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], name=op.f('fk_instances_series_id_series'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instances')),
    sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_instances_sop_instance_uid'))
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instances_series_id'), ['series_id'], unique=False)

    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('instance_id', sa.Integer(), nullable=True),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('frame', sa.Integer(), server_default='0', nullable=False),
    sa.Column('ordinal', sa.Integer(), server_default='0', nullable=False),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('window', sa.String(length=64), nullable=True),
    sa.Column('window_center', sa.Float(), nullable=True),
    sa.Column('window_width', sa.Float(), nullable=True),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], name=op.f('fk_images_instance_id_instances'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_images_study_id_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_instance_id'), ['instance_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_study_id'), ['study_id'], unique=False)

    


def downgrade() -> None:
    
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_study_id'))
        batch_op.drop_index(batch_op.f('ix_images_instance_id'))

    op.drop_table('images')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instances_series_id'))

    op.drop_table('instances')
    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_findings_report_id'))

    op.drop_table('findings')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_study_id'))

    op.drop_table('series')
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.drop_index('uq_reports_current_per_study', postgresql_where=sa.text('current'), sqlite_where=sa.text('current'))
        batch_op.drop_index(batch_op.f('ix_reports_study_id'))

    op.drop_table('reports')
    with op.batch_alter_table('probe_scores', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_probe_scores_study_id'))

    op.drop_table('probe_scores')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_unsent')
        batch_op.drop_index(batch_op.f('ix_outbox_study_id'))

    op.drop_table('outbox')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index('ix_studies_state_changed')
        batch_op.drop_index('ix_studies_last_received_at')

    op.drop_table('studies')
    
