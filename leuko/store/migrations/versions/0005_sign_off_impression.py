"""the reviewer's impression, written at sign-off

The case report's first page carries it above the signature block. Cases signed before
have none (an empty text).

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sign_offs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('impression', sa.Text(), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('sign_offs', schema=None) as batch_op:
        batch_op.drop_column('impression')
