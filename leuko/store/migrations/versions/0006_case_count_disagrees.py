"""whether a case's blood count and images disagreed when it was analysed

A case whose count and images disagree needs review like a flagged result, so the Cases list's
needs-review filter must see it. Cases saved before read as agreeing.

Revision ID: 0006
Revises: 0005
"""

from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN: in batch mode this column made Alembic rebuild the cases table on
    # SQLite, and dropping the old table cascaded to the images and results of an upgraded log.
    op.add_column('cases', sa.Column('count_disagrees', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_column('count_disagrees')
