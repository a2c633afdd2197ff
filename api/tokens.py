"""API tokens: created once, stored only as a hash, checked in constant time, revoked by name.

A token reads ``prt_<key>_<secret>``: the key finds the row, the secret's SHA-256
is compared with :func:`hmac.compare_digest`. The secret itself is never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from preread.schemas.tables import ApiRole, ApiToken, utcnow

PREFIX = "prt"
#: Token names: letters, digits and ``._@-``, so they print and log safely.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_TOKEN_PATTERN = re.compile(rf"^{PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{20,100}})$")
#: Compared against when the key is unknown, so a miss costs what a hit costs.
_DUMMY_HASH = hashlib.sha256(b"no such token").hexdigest()


class TokenError(ValueError):
    """A token cannot be created or revoked as asked (the message says why)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's name and role (and its key, which finds its row)."""

    name: str
    role: ApiRole
    key: str = ""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as ``preread token list`` shows it (never its secret)."""

    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, name: str, role: ApiRole) -> str:
    """Store a new token named ``name`` and return it; it cannot be shown again."""
    if not NAME_PATTERN.match(name):
        raise TokenError("token names are 1-64 letters, digits or . _ @ -")
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise TokenError(f"a token named {name!r} exists; revoke it or choose another name")
    key = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, key=key, secret_hash=_hash(secret), role=str(role)))
    session.flush()
    return f"{PREFIX}_{key}_{secret}"


def revoke_token(session: Session, name: str) -> None:
    """Revoke the token named ``name``; it fails with 401 from then on."""
    token = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if token is None:
        raise TokenError(f"no token named {name!r}; `preread token list` shows them")
    if token.revoked_at is None:
        token.revoked_at = utcnow()


def list_tokens(session: Session) -> list[TokenInfo]:
    """Every token, oldest first, without secrets."""
    rows = session.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.id))
    return [TokenInfo(t.name, t.role, t.created_at, t.revoked_at) for t in rows]


def verify_token(session: Session, presented: str) -> Principal | None:
    """The principal of a valid, unrevoked token; None for anything else."""
    match = _TOKEN_PATTERN.match(presented.strip())
    key, secret = (match.group(1), match.group(2)) if match else ("", "")
    row = session.execute(
        select(ApiToken.name, ApiToken.role, ApiToken.secret_hash, ApiToken.revoked_at).where(ApiToken.key == key)
    ).first() if key else None
    expected = row.secret_hash if row is not None else _DUMMY_HASH
    ok = hmac.compare_digest(_hash(secret), expected)
    if not ok or row is None or row.revoked_at is not None:
        return None
    return Principal(row.name, ApiRole(row.role), key)


class TokenCache:
    """Tokens verified recently, by key: the presented secret's hash and the principal (never the secret).

    A hit spares the lookup, not the revocation check: whoever takes a principal from
    here must confirm in the database, before answering, that the token is still
    unrevoked (an audited view does it in the same statement as its audit row,
    :func:`preread.api.views.View.record`), and :meth:`forget` it when it is not.
    """

    def __init__(self, seconds: float = 300.0, size: int = 256) -> None:
        self.seconds, self.size = seconds, size
        self._known: dict[str, tuple[float, str, Principal]] = {}

    def get(self, presented: str) -> Principal | None:
        """The principal of a token verified within ``seconds`` whose secret matches, compared in constant time."""
        match = _TOKEN_PATTERN.match(presented.strip())
        if not match:
            return None
        found = self._known.get(match.group(1))
        if found is None or time.monotonic() - found[0] > self.seconds:
            return None
        return found[2] if hmac.compare_digest(_hash(match.group(2)), found[1]) else None

    def put(self, presented: str, principal: Principal) -> None:
        """Remember a token :func:`verify_token` has just accepted."""
        match = _TOKEN_PATTERN.match(presented.strip())
        if not match:
            return
        if len(self._known) >= self.size:
            self._known.clear()
        self._known[match.group(1)] = (time.monotonic(), _hash(match.group(2)), principal)

    def forget(self, key: str) -> None:
        """Drop a token found revoked (or gone), so its next request is looked up and refused."""
        self._known.pop(key, None)


def csrf_token(presented: str) -> str:
    """The anti-forgery value a cookie session's POSTs must carry: derived from, never equal to, its token."""
    return hmac.new(presented.encode(), b"preread-csrf", hashlib.sha256).hexdigest()
