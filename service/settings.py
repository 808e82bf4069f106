"""The service's settings: one pydantic-settings class, read from ``GRADWATCH_*`` environment variables.

Every knob of the service lives here (the full-stack-fastapi-template way): code asks
``get_settings()`` and never reads ``os.environ`` itself.

    GRADWATCH_DATABASE_URL=postgresql+psycopg://user:pw@db/gradwatch gradwatch worker
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def parse_api_keys(raw: str) -> list[tuple[str, str]]:
    """``"acme:k1,globex:k2"`` -> ``[("acme", "k1"), ("globex", "k2")]``.

    Whitespace around entries is ignored and empty entries are skipped. A malformed entry
    raises ValueError naming it (the key itself is never echoed back, only its tenant).
    """
    pairs: list[tuple[str, str]] = []
    for position, entry in enumerate(raw.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        tenant, sep, key = entry.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not tenant or not key:
            raise ValueError(
                f"GRADWATCH_API_KEYS entry {position} is not of the form tenant:key "
                "(comma-separated tenant:key pairs, e.g. 'acme:s3cret,globex:0ther')"
            )
        pairs.append((tenant, key))
    keys = [key for _, key in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("GRADWATCH_API_KEYS holds the same key twice; every key must be unique")
    return pairs


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GRADWATCH_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        hide_input_in_errors=True,  # a validation error must never print GRADWATCH_API_KEYS
    )

    # --- storage ---------------------------------------------------------------------------
    database_url: str = "sqlite:///./gradwatch.db"
    """SQLAlchemy URL. SQLite file (the default, one machine) or ``postgresql+psycopg://...``
    (plain ``postgresql://`` and ``postgres://`` are accepted and mean psycopg 3)."""

    # --- auth ------------------------------------------------------------------------------
    api_keys: str = ""
    """Comma-separated ``tenant:key`` pairs; empty means no keys from the environment."""

    # --- queue -----------------------------------------------------------------------------
    lease_seconds: float = Field(30.0, gt=0)
    """How long a silent worker keeps its job before another worker may take it over."""
    heartbeat_seconds: float | None = Field(None, gt=0)
    """How often a busy worker renews its lease (and sees cancel requests). Default
    ``min(lease_seconds / 3, 1.0)``: the heartbeat is also how a running job learns it was
    cancelled, so a cancel is noticed within about a second (one tiny UPDATE per second per
    busy worker)."""
    max_attempts: int = Field(3, ge=1)
    """A job whose worker stops responding this many times fails with ``max_attempts``."""
    poll_seconds: float = Field(0.5, gt=0)
    """How long an idle worker sleeps between looks at the queue."""
    external_abandon_seconds: float = Field(3600.0, gt=0)
    """An external job that sent nothing (no epoch, no heartbeat) for this long is abandoned:
    it ends ``failed`` with error code ``abandoned`` and a final report on the epochs that
    arrived (W&B calls such a run "crashed"). The SDK heartbeats an open run, so a slow epoch
    is not mistaken for a dead run."""

    # --- webhooks (callback_url; docs/webhooks.md) -----------------------------------------
    webhook_max_attempts: int = Field(8, ge=1)
    """Delivery attempts per finished job before giving up (every attempt is stored)."""
    webhook_backoff_base_seconds: float = Field(2.0, gt=0)
    """Retry n waits ``base * 2**(n-1)`` seconds (2, 4, 8, ... by default), capped below."""
    webhook_backoff_max_seconds: float = Field(600.0, gt=0)
    """The longest wait between two attempts."""
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    """How long a receiver may take to answer one attempt."""
    webhook_lease_seconds: float = Field(60.0, gt=0)
    """A claimed delivery whose dispatcher died is sent again by another after this long."""
    webhook_poll_seconds: float = Field(0.5, gt=0)
    """How often an idle dispatcher looks for due deliveries (the delivery latency)."""
    webhook_secret_grace_seconds: float = Field(86400.0, ge=0)
    """After a rotation the previous secret still signs deliveries (a second ``v1=``) this long."""

    # --- spec limits (models.validation.Limits) ---------------------------------------------
    max_parameters: int = Field(20_000_000, ge=1)
    max_epochs: int = Field(1000, ge=1)
    max_layers: int = Field(2000, ge=1)
    max_depth: int = Field(32, ge=1)
    max_samples: int = Field(100_000, ge=1)
    max_verify_remedies: int = Field(3, ge=0)

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: str) -> str:
        parse_api_keys(value)
        return value

    @model_validator(mode="after")
    def _check_heartbeat(self) -> Settings:
        if self.heartbeat_seconds is not None and self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"GRADWATCH_HEARTBEAT_SECONDS ({self.heartbeat_seconds}) must be shorter than "
                f"GRADWATCH_LEASE_SECONDS ({self.lease_seconds}), or every lease would expire "
                "between two heartbeats"
            )
        if self.webhook_lease_seconds <= self.webhook_timeout_seconds:
            raise ValueError(
                f"GRADWATCH_WEBHOOK_LEASE_SECONDS ({self.webhook_lease_seconds}) must be longer than "
                f"GRADWATCH_WEBHOOK_TIMEOUT_SECONDS ({self.webhook_timeout_seconds}), or a slow "
                "receiver would get the same attempt twice"
            )
        return self

    @property
    def heartbeat_interval(self) -> float:
        """The effective heartbeat period in seconds."""
        if self.heartbeat_seconds is not None:
            return self.heartbeat_seconds
        return min(self.lease_seconds / 3.0, 1.0)

    @property
    def api_key_pairs(self) -> list[tuple[str, str]]:
        """``api_keys`` parsed: ``[(tenant, key), ...]``."""
        return parse_api_keys(self.api_keys)

    def limit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``models.validation.Limits(**settings.limit_kwargs())``."""
        return {
            "max_parameters": self.max_parameters,
            "max_epochs": self.max_epochs,
            "max_layers": self.max_layers,
            "max_depth": self.max_depth,
            "max_samples": self.max_samples,
            "max_verify_remedies": self.max_verify_remedies,
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once (``get_settings.cache_clear()`` re-reads them)."""
    return Settings()
