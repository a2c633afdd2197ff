"""Request authentication: Bearer tokens or the dashboard's session cookie, roles, open scrape addresses.

Cookie-authenticated requests that change something must carry the session's
anti-forgery value in ``X-CSRF-Token`` (the dashboard's pages embed it); the
cookie itself is HttpOnly and SameSite=Strict.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterator
from functools import lru_cache

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from preread.api.tokens import Principal, csrf_token, verify_token
from preread.schemas.tables import ApiRole

SESSION_COOKIE = "preread_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

READERS = frozenset({ApiRole.READ, ApiRole.WRITE, ApiRole.ADMIN})
WRITERS = frozenset({ApiRole.WRITE, ApiRole.ADMIN})
SCRAPERS = frozenset({ApiRole.WORKER, ApiRole.READ, ApiRole.WRITE, ApiRole.ADMIN})
#: Who an address in PREREAD_API_OPEN_TO is taken to be.
OPEN_SCRAPER = Principal("open-to", ApiRole.WORKER)


def db_session(request: Request) -> Iterator[Session]:
    """One database session per request: committed when the handler returns, rolled back on error."""
    session: Session = request.app.state.sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def unauthorized(detail: str) -> HTTPException:
    """401 asking for a Bearer token."""
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def presented_token(request: Request) -> tuple[str | None, bool]:
    """The token a request carries and whether it came from the session cookie."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise unauthorized("use 'Authorization: Bearer <token>'")
        return value.strip(), False
    cookie = request.cookies.get(SESSION_COOKIE)
    return (cookie, True) if cookie else (None, False)


def authenticate(request: Request, session: Session) -> Principal:
    """The caller, or 401; a cookie session's unsafe request without its CSRF value is refused (403)."""
    token, via_cookie = presented_token(request)
    if token is None:
        raise unauthorized("this endpoint needs a token: 'Authorization: Bearer <token>'")
    principal = verify_token(session, token)
    if principal is None:
        raise unauthorized("the token is unknown or revoked")
    if via_cookie and request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), csrf_token(token).encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="missing or wrong X-CSRF-Token for a cookie session")
    request.state.principal = principal
    return principal


def require(roles: frozenset[ApiRole]) -> Callable[..., Principal]:
    """A dependency admitting only ``roles`` (401 without a valid token, 403 with the wrong role)."""

    def dependency(request: Request, session: Session = Depends(db_session, scope="function")) -> Principal:
        principal = authenticate(request, session)
        if principal.role not in roles:
            allowed = ", ".join(sorted(str(r) for r in roles))
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"the {principal.role} role cannot do this (needs {allowed})")
        return principal

    return dependency


@lru_cache(maxsize=16)
def _networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


def open_to(spec: str | None, client: str | None) -> bool:
    """Whether ``client`` lies in the comma-separated addresses/networks of PREREAD_API_OPEN_TO."""
    if not spec or not client:
        return False
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in net for net in _networks(spec))


def scraper(request: Request, session: Session = Depends(db_session, scope="function")) -> Principal:
    """For /metrics and /readyz: an address in PREREAD_API_OPEN_TO, or any valid token."""
    if request.headers.get("authorization") is None and open_to(
        request.app.state.settings.api_open_to, request.client.host if request.client else None
    ):
        return OPEN_SCRAPER
    return require(SCRAPERS)(request, session)


def page_token(request: Request, session: Session) -> tuple[Principal, str] | None:
    """For dashboard pages: the cookie session's principal and CSRF value, or None (go to the login page)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    principal = verify_token(session, token)
    if principal is None or principal.role not in READERS:
        return None
    return principal, csrf_token(token)
