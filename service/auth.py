"""API keys and tenants.

Keys come from `GRADWATCH_API_KEYS` ("tenant:key,tenant:key") and from `gradwatch keys create`.
Only SHA-256 digests are kept (keys are 32 random bytes, so a fast hash is enough: there is
nothing to brute-force), and digests are compared with `hmac.compare_digest`.
With no key configured anywhere the API is open, but to loopback clients only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.tables import ApiKey

DEFAULT_TENANT = "default"
KEY_PREFIX = "gw_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def env_digests(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """[(tenant, key)] from GRADWATCH_API_KEYS -> {sha256(key): tenant}: plain keys are not kept."""
    return {hash_key(key): tenant for tenant, key in pairs}


def create_key(session: Session, tenant: str) -> str:
    """Store a new key for `tenant` (hashed) and return it: the only time it is ever shown."""
    key = generate_key()
    session.add(ApiKey(tenant=tenant, key_hash=hash_key(key), prefix=key[:8]))
    return key


def is_loopback(host: str | None) -> bool:
    if host in ("localhost", "testclient"):  # starlette's TestClient reports "testclient"
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


@dataclass
class KeyRing:
    """Resolves a bearer key to a tenant. DB keys are looked up by digest; whether any key
    exists at all is cached briefly so an open server does not query on every request."""

    env_digests: dict[str, str]
    _db_has_keys: tuple[float, bool] = field(default=(0.0, False))

    def any_keys(self, session: Session) -> bool:
        if self.env_digests:
            return True
        checked_at, has = self._db_has_keys
        if time.monotonic() - checked_at > 5.0:
            has = bool(session.scalar(select(func.count()).select_from(ApiKey)))
            self._db_has_keys = (time.monotonic(), has)
        return has

    def tenant_for(self, session: Session, key: str) -> str | None:
        digest = hash_key(key)
        found = None
        for known, tenant in self.env_digests.items():  # every entry compared: constant time
            if hmac.compare_digest(known, digest):
                found = tenant
        if found is None:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            if row is not None and hmac.compare_digest(row.key_hash, digest):
                found = row.tenant
        return found
