"""control: object options, idempotency keys, status filter indexes, role credentials,
per-account limits, request history

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 07:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("s3_role_arn", sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column("s3_external_id", sa.String(length=1224), nullable=True))
        batch_op.add_column(sa.Column("max_in_flight", sa.Integer(), nullable=True))

    with op.batch_alter_table("upload_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("options_json", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("idempotency_hash", sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint(
            "uq_upload_requests_account_id_idempotency_key", ["account_id", "idempotency_key"]
        )
        batch_op.create_index(
            "ix_upload_requests_account_id_state_id", ["account_id", "state", "id"]
        )
        batch_op.create_index(
            "ix_upload_requests_account_id_created_at_id", ["account_id", "created_at", "id"]
        )
        batch_op.create_index(
            "ix_upload_requests_account_id_bucket_id", ["account_id", "bucket", "id"]
        )
        batch_op.create_index(
            "ix_upload_requests_account_id_path",
            ["account_id", "path"],
            postgresql_ops={"path": "text_pattern_ops"},
        )

    op.create_table(
        "request_events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("request_id", BigId, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["upload_requests.id"],
            name=op.f("fk_request_events_request_id_upload_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_events")),
    )
    with op.batch_alter_table("request_events", schema=None) as batch_op:
        batch_op.create_index("ix_request_events_request_id_id", ["request_id", "id"])


def downgrade() -> None:
    with op.batch_alter_table("request_events", schema=None) as batch_op:
        batch_op.drop_index("ix_request_events_request_id_id")
    op.drop_table("request_events")
    with op.batch_alter_table("upload_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_upload_requests_account_id_path")
        batch_op.drop_index("ix_upload_requests_account_id_bucket_id")
        batch_op.drop_index("ix_upload_requests_account_id_created_at_id")
        batch_op.drop_index("ix_upload_requests_account_id_state_id")
        batch_op.drop_constraint("uq_upload_requests_account_id_idempotency_key", type_="unique")
        batch_op.drop_column("idempotency_hash")
        batch_op.drop_column("idempotency_key")
        batch_op.drop_column("options_json")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("max_in_flight")
        batch_op.drop_column("s3_external_id")
        batch_op.drop_column("s3_role_arn")
