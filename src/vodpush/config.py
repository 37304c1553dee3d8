"""One typed settings object: environment (``VODPUSH_*``) over an optional TOML file over
defaults. S3 credentials are not here: boto3 reads its own ``AWS_*`` variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

from vodpush.core.retry import (
    DEFAULT_CALLBACK_SCHEDULE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_BASE_DELAY,
    DEFAULT_RETRY_MAX_DELAY,
    DEFAULT_RETRY_WINDOW,
    attempts_for_window,
    shortest_retry_span,
)

CONFIG_FILE_ENV = "VODPUSH_CONFIG"
ENV_PREFIX = "VODPUSH_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    database_url: str = "sqlite:///./vodpush.db"
    sestore_root: Path = Path("./sestore")
    # Symlinks below a user's directory that stay inside it are followed; false refuses
    # every symlink there. A symlink leading out is always refused.
    sestore_follow_symlinks: bool = True
    # Fernet keys (urlsafe base64, 32 bytes) that encrypt secrets at rest, comma-separated:
    # the first encrypts, all decrypt (key rotation). When unset, the keys are read from
    # ``secret_key_file`` (one per line, newest first), generated there on first run.
    secret_key: SecretStr | None = None
    secret_key_file: Path = Path("./vodpush.key")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    timestamp_window: int = Field(default=300, ge=1, description="allowed clock skew, seconds")
    # Re-encoding a request to find the text a client signed (when its signature is not the
    # last member) is work done before any secret is proven: only for texts up to this size.
    signature_fallback_max_chars: int = Field(default=65_536, ge=0)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    status_max_limit: int = Field(default=1000, ge=1)
    api_threads: int = Field(default=2, ge=1, le=256, description="threads running commands")
    # Logs go to stderr, one line an event: "json" (one object a line) or "console" (plain
    # text for people; never ANSI colours). access_log adds a line per HTTP request.
    log_level: str = "info"
    log_format: Literal["json", "console"] = "json"
    access_log: bool = False
    # /metrics is served on the API port unless metrics_port is set: then `vodpush serve`
    # serves it on metrics_host (default: host) and metrics_port only. With metrics_token,
    # a scrape must send "Authorization: Bearer <token>" (401 otherwise), on either port.
    metrics_host: str | None = None
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_token: SecretStr | None = None
    # A series per account (vodpush_account_*): their number grows with the accounts, so
    # they are off unless asked for.
    metrics_per_account: bool = False

    # Worker
    worker_concurrency: int = Field(default=4, ge=1, le=256)
    lease_seconds: int = Field(default=60, ge=5)
    poll_interval: float = Field(default=0.5, gt=0)
    # Transient upload failures (S3 5xx, throttling, timeouts, connection errors) are tried
    # again after waits doubling from retry_base_delay to retry_max_delay, each drawn
    # between half and all of that, until max_attempts attempts were made (an attempt whose
    # worker died counts too). retry_window is the promise: the settings are refused unless
    # even the shortest draws keep retrying that long (0: no promise), so an S3 outage
    # shorter than it fails no upload. Defaults: 5 s to 15 min, 16 attempts, 1 hour.
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=1000)
    retry_base_delay: float = Field(default=DEFAULT_RETRY_BASE_DELAY, ge=0)
    retry_max_delay: float = Field(default=DEFAULT_RETRY_MAX_DELAY, ge=0)
    retry_window: float = Field(default=DEFAULT_RETRY_WINDOW, ge=0, description="seconds")
    # A request whose worker's lease ran out this many times (the worker was killed, or
    # hung, while uploading it: a file that crashes workers) is failed, code WorkerDied,
    # rather than handed to yet another worker. Apart from max_attempts: a dead worker
    # costs far more than a refused connection, and an outage needs many attempts.
    max_lease_expiries: int = Field(default=3, ge=1)
    # 8 MiB as awscli/s3transfer: (part_concurrency + 1) parts of it is the memory an upload
    # may hold, and larger parts were not faster.
    multipart_threshold: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    multipart_chunksize: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    part_concurrency: int = Field(default=8, ge=1, le=64)
    shutdown_grace: float = Field(default=30.0, ge=0)
    # Multipart uploads given up while S3 could not confirm their abort are recorded, and
    # the worker aborts the due ones every reap_interval seconds. After a failed abort one
    # waits reap_backoff seconds, doubling with each failure up to reap_backoff_max.
    reap_interval: float = Field(default=60.0, gt=0)
    reap_backoff: float = Field(default=60.0, gt=0)
    reap_backoff_max: float = Field(default=3600.0, gt=0)
    # S3 clients a worker keeps, one per set of credentials + endpoint + region (accounts
    # on the default credentials share one); each is rebuilt after s3_client_ttl seconds,
    # or s3_client_refresh_margin seconds before credentials that expire do.
    s3_client_cache_size: int = Field(default=128, ge=1)
    s3_client_ttl: float = Field(default=900.0, gt=0)
    s3_client_refresh_margin: float = Field(default=600.0, ge=0)
    # An account with a role ARN uploads with the role's credentials, asked of STS for this
    # many seconds (STS allows 900-43200; the role's MaxSessionDuration may allow less) and
    # refreshed ahead of expiry.
    s3_role_session_seconds: int = Field(default=3600, ge=900, le=43_200)
    # aws.upload with preflight: true checks the bucket before queueing, within this many
    # seconds, at most preflight_concurrency at once per API process (more are told to try
    # again: a slow S3 holds no more than that many of the api_threads).
    preflight_timeout: float = Field(default=10.0, gt=0, le=60)
    preflight_concurrency: int = Field(default=1, ge=1, le=64)

    # Callbacks
    callback_timeout: float = Field(default=10.0, gt=0)
    callback_allow_private: bool = False
    # Delays (seconds) before each retry of a failed delivery: hours, not seconds.
    callback_schedule: list[float] = Field(default_factory=lambda: list(DEFAULT_CALLBACK_SCHEDULE))
    # aws.redeliver: how often a customer may have one request's callback sent again in
    # any hour (each redelivery is one more delivery, with its own retry schedule).
    callback_redeliveries_per_hour: int = Field(default=5, ge=1, le=1000)

    # Bounds on what an unauthenticated client can make the API hold (docs/security-dos.md).
    # A request's headers must arrive within header_timeout of the connection (or of its
    # first byte, on a kept-alive connection), its body within body_timeout of the headers.
    header_timeout: float = Field(default=10.0, gt=0, description="seconds")
    body_timeout: float = Field(default=30.0, gt=0, description="seconds")
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    # All request bodies being received at once may hold this much; one client address
    # (the proxy's X-Forwarded-For where trusted) this share of it.
    body_budget_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    body_budget_per_client_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Open connections in all (lowered to fit the open-files limit) and from one address
    # (0: no per-address cap; addresses in FORWARDED_ALLOW_IPS, the proxies, are exempt).
    max_connections: int = Field(default=1024, ge=1)
    max_connections_per_client: int = Field(default=128, ge=0)
    # Requests a second per account (token bucket of rate_burst); 0 turns the limit off.
    rate_limit: float = Field(default=20.0, ge=0)
    rate_burst: int = Field(default=100, ge=1)
    # Failures before an account is proven (bad signature, unknown key, unreadable body...):
    # a second per client address, and in all; 0 turns each off.
    failure_rate_limit: float = Field(default=5.0, ge=0)
    failure_rate_burst: int = Field(default=50, ge=1)
    failure_global_rate_limit: float = Field(default=50.0, ge=0)
    failure_global_burst: int = Field(default=500, ge=1)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("only sqlite:/// and postgresql+psycopg:// URLs are supported")
        if value.startswith("postgresql://"):
            # Use psycopg 3, the driver we ship, rather than SQLAlchemy's psycopg2 default.
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @model_validator(mode="after")
    def _retries_outlast_the_window(self) -> Settings:
        span = shortest_retry_span(self.max_attempts, self.retry_base_delay, self.retry_max_delay)
        if span >= self.retry_window:
            return self
        needed = attempts_for_window(self.retry_window, self.retry_base_delay, self.retry_max_delay)
        fix = (
            f"set max_attempts to {needed} or more"
            if needed is not None and needed <= 1000
            else "raise retry_base_delay or retry_max_delay"
        )
        raise ValueError(
            f"max_attempts={self.max_attempts} with retry_base_delay={self.retry_base_delay:g} "
            f"and retry_max_delay={self.retry_max_delay:g} retries a failing upload for at "
            f"least {span:.0f} s, less than retry_window={self.retry_window:g} s: {fix}, "
            "or lower retry_window (0: no minimum)"
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    def public_dict(self) -> dict[str, Any]:
        """Settings for display: secrets masked."""
        data = self.model_dump(mode="json")  # SecretStr dumps as "**********"
        data["database_url"] = make_url(self.database_url).render_as_string(hide_password=True)
        return data


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


def setting_variables() -> set[str]:
    """The environment variables the settings read (``VODPUSH_CONFIG`` included)."""
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {CONFIG_FILE_ENV}
