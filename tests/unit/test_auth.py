"""API keys: parsing, hashing, single-tenant mode, and file reloads that keep the last good keys."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ortmux.worker import auth
from ortmux.worker.auth import SINGLE_TENANT, Identity, KeyRing, key_digest
from ortmux.worker.errors import InvalidArgument, PermissionDenied, Unauthenticated


def test_without_keys_every_caller_is_the_single_tenant_admin() -> None:
    ring = KeyRing()
    assert not ring.enabled
    assert ring.identify(None) == ring.identify("anything") == SINGLE_TENANT


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("abc:acme:tenant", "sha256 must be 64 lower-case hex digits"),
        (f"{key_digest('k')}:../x:tenant", "tenant '../x' must be"),
        (f"{key_digest('k')}:acme:root", "role must be one of tenant, admin"),
        (f"{key_digest('k')}:acme", "SHA256:TENANT:ROLE"),
    ],
)
def test_bad_key_entries_are_refused_by_name(entry: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")):
        KeyRing([entry])


def test_keys_resolve_to_tenant_and_role() -> None:
    ring = KeyRing([f"{key_digest('t-key')}:acme:tenant", f"{key_digest('a-key')}:ops:admin"])
    assert ring.identify("t-key") == Identity("acme", "tenant")
    assert ring.identify("a-key").is_admin
    with pytest.raises(Unauthenticated):
        ring.identify("other")
    with pytest.raises(Unauthenticated):
        ring.identify(None)
    with pytest.raises(PermissionDenied, match="needs an admin key"):
        ring.identify("t-key").require_admin("loading a base model")


def test_a_broken_keys_file_keeps_the_last_good_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_RELOAD_CHECK_SECONDS", 0.0)
    path = tmp_path / "keys.toml"
    path.write_text(f'[[key]]\nsha256 = "{key_digest("k1")}"\ntenant = "acme"\n')
    ring = KeyRing(path=path)
    assert ring.identify("k1") == Identity("acme", "tenant")
    path.write_text("this is [not toml")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert ring.identify("k1") == Identity("acme", "tenant")
    path.write_text(f'[[key]]\nsha256 = "{key_digest("k2")}"\ntenant = "globex"\nrole = "admin"\n')
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert ring.identify("k2") == Identity("globex", "admin")
    with pytest.raises(Unauthenticated):
        ring.identify("k1")
