"""Who is calling: API keys -> (tenant, role). Keys are kept as sha256 digests only.

Keys come from settings entries and from a TOML file that is read again when it changes, so
keys can be added or revoked without a restart::

    [[key]]
    sha256 = "<hex sha256 of the key>"
    tenant = "acme"
    role = "tenant"     # or "admin"

Without any key configured the worker is single-tenant: every caller is an admin of the
default tenant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ortmux.worker.adapters.local_store import DEFAULT_TENANT
from ortmux.worker.errors import InvalidArgument, PermissionDenied, Unauthenticated
from ortmux.worker.files import read_toml

log = logging.getLogger(__name__)

ROLES = ("tenant", "admin")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RELOAD_CHECK_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Identity:
    tenant: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def require_admin(self, action: str) -> None:
        if not self.is_admin:
            raise PermissionDenied(f"{action} needs an admin key; tenant '{self.tenant}' has a tenant key")


SINGLE_TENANT = Identity(DEFAULT_TENANT, "admin")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_entry(entry: str, source: str) -> tuple[str, Identity]:
    """``SHA256:TENANT:ROLE`` -> (digest, identity)."""
    parts = entry.strip().split(":")
    if len(parts) != 3:
        raise InvalidArgument(f"{source}: API key entry must be SHA256:TENANT:ROLE", field="api_keys")
    return _checked(parts[0], parts[1], parts[2], source)


def _checked(digest: str, tenant: str, role: str, source: str) -> tuple[str, Identity]:
    if not _SHA256.match(digest):
        raise InvalidArgument(f"{source}: sha256 must be 64 lower-case hex digits", field="api_keys")
    if not _TENANT.match(tenant):
        raise InvalidArgument(
            f"{source}: tenant {tenant!r} must be 1-64 letters, digits, '.', '_' or '-'", field="api_keys"
        )
    if role not in ROLES:
        raise InvalidArgument(
            f"{source}: role must be one of {', '.join(ROLES)}, got {role!r}", field="api_keys"
        )
    return digest, Identity(tenant, role)


class KeyRing:
    """API keys from settings entries plus a TOML file re-read when its modification time changes."""

    def __init__(self, entries: Sequence[str] = (), path: Path | None = None) -> None:
        self._fixed = dict(parse_entry(entry, "api_keys") for entry in entries)
        self._path = path
        self._lock = threading.Lock()
        self._file_keys: dict[str, Identity] = {}
        self._file_stamp: tuple[int, int] | None = None
        self._checked_at = 0.0
        if path is not None:
            self._file_keys = self._read(path)  # a bad file at start is an error, not a warning
            self._file_stamp = _stamp(path)

    @property
    def enabled(self) -> bool:
        return bool(self._fixed) or self._path is not None

    def identify(self, key: str | None) -> Identity:
        """The identity of ``key``; UNAUTHENTICATED when it is missing or unknown."""
        if not self.enabled:
            return SINGLE_TENANT
        if not key:
            raise Unauthenticated("this worker needs an API key: send 'authorization: Bearer <key>'")
        digest = key_digest(key)
        identity = self._fixed.get(digest) or self._current_file_keys().get(digest)
        if identity is None:
            raise Unauthenticated("the API key is not valid")
        return identity

    def _current_file_keys(self) -> dict[str, Identity]:
        if self._path is None:
            return {}
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= _RELOAD_CHECK_SECONDS:
                self._checked_at = now
                stamp = _stamp(self._path)
                if stamp != self._file_stamp:
                    try:
                        self._file_keys = self._read(self._path)
                        log.info("API keys reloaded from %s: %d keys", self._path, len(self._file_keys))
                    except (OSError, InvalidArgument) as exc:
                        log.error(
                            "API keys file %s not reloaded, keeping the last good one: %s", self._path, exc
                        )
                    self._file_stamp = stamp
            return self._file_keys

    @staticmethod
    def _read(path: Path) -> dict[str, Identity]:
        document = read_toml(path, "API keys file", "api_keys_file")
        keys = {}
        for index, entry in enumerate(document.get("key", [])):
            source = f"{path} key {index + 1}"
            if not isinstance(entry, dict):
                raise InvalidArgument(f"{source}: not a table", field="api_keys_file")
            digest, identity = _checked(
                str(entry.get("sha256", "")),
                str(entry.get("tenant", "")),
                str(entry.get("role", "tenant")),
                source,
            )
            keys[digest] = identity
        return keys


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size
