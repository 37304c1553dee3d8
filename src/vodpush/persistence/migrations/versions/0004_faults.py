"""faults: lease expiries, the retrying state, orphaned multipart uploads

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 03:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("upload_requests", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lease_expiries", sa.Integer(), nullable=False, server_default="0")
        )
    # A queued request that has been tried already waits for a retry: say so.
    op.execute(
        "UPDATE upload_requests SET state = 'retrying' WHERE state = 'queued' AND attempts > 0"
    )

    op.create_table(
        "orphan_uploads",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("request_id", BigId, nullable=True),
        sa.Column("bucket", sa.String(length=255), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("upload_id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("next_at", sa.DateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_orphan_uploads_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orphan_uploads")),
        sa.UniqueConstraint(
            "account_id",
            "bucket",
            "upload_id",
            name=op.f("uq_orphan_uploads_account_id_bucket_upload_id"),
        ),
    )
    with op.batch_alter_table("orphan_uploads", schema=None) as batch_op:
        batch_op.create_index("ix_orphan_uploads_next_at", ["next_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("orphan_uploads", schema=None) as batch_op:
        batch_op.drop_index("ix_orphan_uploads_next_at")
    op.drop_table("orphan_uploads")
    op.execute("UPDATE upload_requests SET state = 'queued' WHERE state = 'retrying'")
    with op.batch_alter_table("upload_requests", schema=None) as batch_op:
        batch_op.drop_column("lease_expiries")
