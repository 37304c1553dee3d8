"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 04:41:09.140820
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cdn", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("api_key", sa.String(length=64), nullable=False),
        sa.Column("api_secret_enc", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("s3_endpoint_url", sa.Text(), nullable=True),
        sa.Column("s3_region", sa.String(length=64), nullable=True),
        sa.Column("s3_access_key_id", sa.String(length=256), nullable=True),
        sa.Column("s3_secret_access_key_enc", sa.Text(), nullable=True),
        sa.Column("s3_sse", sa.String(length=16), nullable=True),
        sa.Column("s3_sse_kms_key_id", sa.String(length=2048), nullable=True),
        sa.Column("s3_checksums", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("api_key", name=op.f("uq_accounts_api_key")),
        sa.UniqueConstraint("cdn", "username", name=op.f("uq_accounts_cdn_username")),
    )
    op.create_table(
        "upload_requests",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("cdn_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("destination_path", sa.Text(), nullable=False),
        sa.Column("bucket", sa.String(length=255), nullable=False),
        sa.Column("acl", sa.String(length=32), nullable=False),
        sa.Column("metadata_json", sa.Text(), nullable=False),
        sa.Column("callback", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("results_json", sa.Text(), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("bytes_total", sa.BigInteger(), nullable=True),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_upload_requests_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upload_requests")),
        sa.UniqueConstraint(
            "account_id", "signature", name=op.f("uq_upload_requests_account_id_signature")
        ),
    )
    with op.batch_alter_table("upload_requests", schema=None) as batch_op:
        batch_op.create_index(
            "ix_upload_requests_account_id_id", ["account_id", "id"], unique=False
        )
        batch_op.create_index(
            "ix_upload_requests_state_not_before", ["state", "not_before"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("upload_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_upload_requests_state_not_before")
        batch_op.drop_index("ix_upload_requests_account_id_id")

    op.drop_table("upload_requests")
    op.drop_table("accounts")
