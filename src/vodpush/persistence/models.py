"""The database schema. Alembic migrations in ``migrations/versions`` must produce exactly
this (a test compares them)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from vodpush.core.records import QUEUED_MESSAGE
from vodpush.core.requests import CallbackState, State

# BIGINT on PostgreSQL, but INTEGER on SQLite, where only INTEGER PRIMARY KEY auto-increments.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("cdn", "username"),
        # A username names a directory (sestore<N>/<username>/): one account per username
        # across all CDNs. Migration 0003 creates it only when existing data allows (see
        # AccountStore.ensure_unique_usernames).
        Index("ix_accounts_username", "username", unique=True),
        # The claim looks up the disabled accounts (whose work is held) every time.
        Index("ix_accounts_enabled", "enabled"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cdn: Mapped[int] = mapped_column(Integer, nullable=False)
    username: Mapped[str] = mapped_column(String(64), nullable=False)
    api_key: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    api_secret_enc: Mapped[str] = mapped_column(Text, nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    # Per-account S3 settings; NULL means boto3's own defaults (AWS_* environment).
    s3_endpoint_url: Mapped[str | None] = mapped_column(Text)
    s3_region: Mapped[str | None] = mapped_column(String(64))
    s3_access_key_id: Mapped[str | None] = mapped_column(String(256))
    s3_secret_access_key_enc: Mapped[str | None] = mapped_column(Text)
    s3_sse: Mapped[str | None] = mapped_column(String(16))
    s3_sse_kms_key_id: Mapped[str | None] = mapped_column(String(2048))
    s3_checksums: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    # Bucket patterns (fnmatch, JSON list) the account may write to; see
    # AccountRecord.may_use_bucket for what an empty list means.
    allowed_buckets: Mapped[str] = mapped_column(
        Text, nullable=False, default="[]", server_default="[]"
    )
    # A separate key for signing callbacks (whsec_..., encrypted); NULL: the API secret.
    webhook_secret_enc: Mapped[str | None] = mapped_column(Text)
    # An IAM role the worker assumes (STS AssumeRole, with the account's keys or boto3's
    # defaults) before it writes; NULL: the keys are used as they are.
    s3_role_arn: Mapped[str | None] = mapped_column(String(2048))
    s3_external_id: Mapped[str | None] = mapped_column(String(1224))
    # Uploads of this account in flight at once, across all workers; NULL: no limit.
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)


class UploadRequest(Base):
    __tablename__ = "upload_requests"
    __table_args__ = (
        # aws.status: an account's requests, newest first.
        Index("ix_upload_requests_account_id_id", "account_id", "id"),
        # Claiming: queued requests in order of when they may run.
        Index("ix_upload_requests_state_not_before", "state", "not_before"),
        # Replay protection: one request per accepted signature.
        UniqueConstraint("account_id", "signature"),
        # The customer's idempotency keys (aws.upload idempotency_key): one request a key.
        UniqueConstraint("account_id", "idempotency_key"),
        # aws.status filters, each with the listing's order (id) after it.
        Index("ix_upload_requests_account_id_state_id", "account_id", "state", "id"),
        Index("ix_upload_requests_account_id_created_at_id", "account_id", "created_at", "id"),
        Index("ix_upload_requests_account_id_bucket_id", "account_id", "bucket", "id"),
        # path_prefix: LIKE 'prefix%' uses it on PostgreSQL only with text_pattern_ops.
        Index(
            "ix_upload_requests_account_id_path",
            "account_id",
            "path",
            postgresql_ops={"path": "text_pattern_ops"},
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), nullable=False)
    cdn_id: Mapped[int] = mapped_column(Integer, nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    destination_path: Mapped[str] = mapped_column(Text, nullable=False)
    bucket: Mapped[str] = mapped_column(String(255), nullable=False)
    acl: Mapped[str] = mapped_column(String(32), nullable=False)
    metadata_json: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    callback: Mapped[str] = mapped_column(Text, nullable=False, default="")
    signature: Mapped[str] = mapped_column(String(128), nullable=False)
    # Object options beyond the reference API's (core.requests.NewRequest.options), JSON;
    # NULL: none.
    options_json: Mapped[str | None] = mapped_column(Text)
    # aws.upload's idempotency_key, and the SHA-256 of the fields it covers (hex).
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    idempotency_hash: Mapped[str | None] = mapped_column(String(64))

    state: Mapped[str] = mapped_column(String(16), nullable=False, default=State.QUEUED.value)
    message: Mapped[str] = mapped_column(Text, nullable=False, default=QUEUED_MESSAGE)
    results_json: Mapped[str | None] = mapped_column(Text)
    http_status: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error_code: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)

    # Queue bookkeeping
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # Claims that took the request over from a worker whose lease ran out (core.requests).
    lease_expiries: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )
    not_before: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger)
    bytes_done: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64))
    # The multipart checkpoint header (core.checkpoint.MultipartCheckpoint without its parts, as
    # JSON); the parts are rows of upload_parts.
    multipart_json: Mapped[str | None] = mapped_column(Text)

    # Callback delivery: none (no URL), pending, delivered, failed (schedule exhausted).
    callback_state: Mapped[str] = mapped_column(
        String(16),
        nullable=False,
        default=CallbackState.NONE.value,
        server_default=CallbackState.NONE.value,
    )
    callback_attempts: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )
    callback_next_at: Mapped[datetime | None] = mapped_column(DateTime)
    callback_msg_id: Mapped[str | None] = mapped_column(String(64))
    callback_last_error: Mapped[str | None] = mapped_column(Text)


Index(
    "ix_upload_requests_callback_state_callback_next_at",
    UploadRequest.callback_state,
    UploadRequest.callback_next_at,
)


class UploadPart(Base):
    """A part of a multipart upload that S3 has stored: what a resumed upload skips."""

    __tablename__ = "upload_parts"

    request_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("upload_requests.id", ondelete="CASCADE"), primary_key=True
    )
    part_number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    etag: Mapped[str] = mapped_column(String(128), nullable=False)
    checksum_sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)


class CallbackAttempt(Base):
    """One delivery attempt of a request's callback."""

    __tablename__ = "callback_attempts"
    __table_args__ = (Index("ix_callback_attempts_request_id", "request_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("upload_requests.id", ondelete="CASCADE"), nullable=False
    )
    at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    ok: Mapped[bool] = mapped_column(Boolean, nullable=False)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration: Mapped[float] = mapped_column(Float, nullable=False)


class RequestEvent(Base):
    """A step in a request's life (queued, claimed, retrying, succeeded, failed, canceled,
    queued again by aws.retry, callback redelivered): its history, kept when the request
    itself is reset."""

    __tablename__ = "request_events"
    __table_args__ = (Index("ix_request_events_request_id_id", "request_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("upload_requests.id", ondelete="CASCADE"), nullable=False
    )
    at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    event: Mapped[str] = mapped_column(String(32), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # the state it led to
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    message: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(128))


class OrphanUpload(Base):
    """A multipart upload that was given up but whose abort S3 did not confirm: the reaper
    (vodpush.worker.reaper, `vodpush reap`) aborts it until S3 does, then deletes the row."""

    __tablename__ = "orphan_uploads"
    __table_args__ = (
        UniqueConstraint("account_id", "bucket", "upload_id"),
        Index("ix_orphan_uploads_next_at", "next_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The credentials and endpoint the abort needs are the account's.
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False
    )
    request_id: Mapped[int | None] = mapped_column(BigId)  # for the operator; may be gone
    bucket: Mapped[str] = mapped_column(String(255), nullable=False)
    key: Mapped[str] = mapped_column(Text, nullable=False)
    upload_id: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    next_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
