"""account tenancy: bucket allow-lists, webhook secrets, one account per username

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 09:00:00.000000
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

log = logging.getLogger("vodpush.persistence.migrations")


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("allowed_buckets", sa.Text(), nullable=False, server_default="[]")
        )
        batch_op.add_column(sa.Column("webhook_secret_enc", sa.Text(), nullable=True))
        batch_op.create_index("ix_accounts_enabled", ["enabled"], unique=False)

    # Usernames name directories, so they must be unique across CDNs. A database that
    # already holds two accounts with one username must still start: the index is then left
    # out (`vodpush account rename` creates it once the duplicates are gone) and the service
    # refuses to read files for those accounts until the operator renames one of them.
    shared = [
        row[0]
        for row in op.get_bind().execute(
            sa.text("SELECT username FROM accounts GROUP BY username HAVING COUNT(*) > 1")
        )
    ]
    if shared:
        log.warning(
            "usernames shared by several accounts: %s; their uploads are refused until the "
            "operator renames all but one (vodpush account rename REF NEW_USERNAME)",
            ", ".join(sorted(shared)),
            extra={"action": "migrate.shared_usernames", "usernames": sorted(shared)},
        )
        return
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.create_index("ix_accounts_username", ["username"], unique=True)


def downgrade() -> None:
    bind = op.get_bind()
    indexes = {ix["name"] for ix in sa.inspect(bind).get_indexes("accounts")}
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        if "ix_accounts_username" in indexes:
            batch_op.drop_index("ix_accounts_username")
        batch_op.drop_index("ix_accounts_enabled")
        batch_op.drop_column("webhook_secret_enc")
        batch_op.drop_column("allowed_buckets")
