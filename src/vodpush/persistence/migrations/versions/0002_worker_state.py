"""worker state

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 04:54:51.527655
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "callback_attempts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "request_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["upload_requests.id"],
            name=op.f("fk_callback_attempts_request_id_upload_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_attempts")),
    )
    with op.batch_alter_table("callback_attempts", schema=None) as batch_op:
        batch_op.create_index("ix_callback_attempts_request_id", ["request_id"], unique=False)

    op.create_table(
        "upload_parts",
        sa.Column(
            "request_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("part_number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("etag", sa.String(length=128), nullable=False),
        sa.Column("checksum_sha256", sa.String(length=64), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["upload_requests.id"],
            name=op.f("fk_upload_parts_request_id_upload_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("request_id", "part_number", name=op.f("pk_upload_parts")),
    )
    with op.batch_alter_table("upload_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("multipart_json", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("callback_state", sa.String(length=16), nullable=False, server_default="none")
        )
        batch_op.add_column(
            sa.Column("callback_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("callback_next_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("callback_msg_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("callback_last_error", sa.Text(), nullable=True))
        batch_op.create_index(
            "ix_upload_requests_callback_state_callback_next_at",
            ["callback_state", "callback_next_at"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("upload_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_upload_requests_callback_state_callback_next_at")
        batch_op.drop_column("callback_last_error")
        batch_op.drop_column("callback_msg_id")
        batch_op.drop_column("callback_next_at")
        batch_op.drop_column("callback_attempts")
        batch_op.drop_column("callback_state")
        batch_op.drop_column("multipart_json")

    op.drop_table("upload_parts")
    with op.batch_alter_table("callback_attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_callback_attempts_request_id")

    op.drop_table("callback_attempts")
