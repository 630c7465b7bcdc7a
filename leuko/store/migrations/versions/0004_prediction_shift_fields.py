"""shift score, unfamiliar and not-applicable of each prediction

Issue 24: every prediction gets a score of how unlike the model's training images its input
is, whether that is above the model's threshold, and why the task's question may not apply
to the cell. Rows logged before read as not measured (NULL).

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('shift_score', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('unfamiliar', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('not_applicable', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_column('not_applicable')
        batch_op.drop_column('unfamiliar')
        batch_op.drop_column('shift_score')
