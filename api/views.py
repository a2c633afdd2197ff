"""Audited reads (worklist, search, study, image): one autocommit session and a token confirmed by its audit row.

A view costs its own queries and one INSERT, nothing else: no BEGIN or COMMIT
(the session autocommits), no token lookup when the token was verified in the
last minutes (:class:`~preread.api.tokens.TokenCache`), and no pre-ping on a
connection in use a moment ago. Revocation still holds at once: the audit row
is inserted only while the token is unrevoked, in the same statement, and a
view whose row could not be written answers 401 instead of its data. A view
that ends without an audit row (a 404, a 422) looks the token up before it
answers, so a revoked token never learns anything but 401.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from preread.api.audit import Action
from preread.api.auth import CSRF_HEADER, READERS, SAFE_METHODS, presented_token, unauthorized
from preread.api.tokens import Principal, TokenCache, csrf_token, verify_token
from preread.schemas.tables import ApiToken, AuditEvent, utcnow

REVOKED = "the token is unknown or revoked"

#: One audit event, written only if the token with ``key`` is unrevoked (Core, not the ORM's bulk INSERT,
#: and its row count kept before the cursor closes).
AUDIT_IF_VALID = insert(AuditEvent).from_select(
    ["at", "token_name", "action", "study_instance_uid", "client", "detail"],
    select(
        bindparam("at", type_=AuditEvent.at.type), ApiToken.name, bindparam("action", type_=AuditEvent.action.type),
        bindparam("study_uid", type_=AuditEvent.study_instance_uid.type), bindparam("client", type_=AuditEvent.client.type),
        bindparam("detail", type_=AuditEvent.detail.type),
    ).where(ApiToken.key == bindparam("key"), ApiToken.revoked_at.is_(None)),
).execution_options(preserve_rowcount=True)


@dataclass
class View:
    """One audited read: who asks, from where, and the session its queries use."""

    principal: Principal
    session: Session
    client: str | None
    #: Whether the database has said, during this request, that the token is unrevoked.
    confirmed: bool
    tokens: TokenCache

    def record(self, action: Action, *, study_uid: str | None = None, detail: str | None = None) -> None:
        """Write this view's audit event, only while its token is unrevoked (else 401, and nothing is answered).

        Call it last, once the answer is ready: the event commits at once (autocommit).
        """
        written = self.session.connection().execute(AUDIT_IF_VALID, {
            "at": utcnow(), "action": str(action), "study_uid": study_uid, "client": (self.client or "")[:64] or None,
            "detail": detail[:255] if detail else None, "key": self.principal.key,
        }).rowcount
        if not written:
            self.tokens.forget(self.principal.key)
            raise unauthorized(REVOKED)
        self.confirmed = True


def _lookup(request: Request, token: str) -> Principal | None:
    """The token's principal from the database (cached when valid), or None."""
    with request.app.state.views() as session:
        principal = verify_token(session, token)
    if principal is not None:
        request.app.state.tokens.put(token, principal)
    return principal


async def view(request: Request) -> AsyncIterator[View]:
    """The dependency of an audited read by a reader: 401/403 as :func:`preread.api.auth.require` answers them."""
    token, via_cookie = presented_token(request)
    if token is None:
        raise unauthorized("this endpoint needs a token: 'Authorization: Bearer <token>'")
    tokens: TokenCache = request.app.state.tokens
    principal, confirmed = tokens.get(token), True
    if principal is None:
        principal = await run_in_threadpool(_lookup, request, token)
        if principal is None:
            raise unauthorized(REVOKED)
    else:
        confirmed = False
    if via_cookie and request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), csrf_token(token).encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="missing or wrong X-CSRF-Token for a cookie session")
    if principal.role not in READERS:
        allowed = ", ".join(sorted(str(r) for r in READERS))
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"the {principal.role} role cannot do this (needs {allowed})")
    request.state.principal = principal
    session: Session = request.app.state.views()
    current = View(principal, session, request.client.host if request.client else None, confirmed, tokens)
    try:
        yield current
    except HTTPException as exc:
        if exc.status_code != status.HTTP_401_UNAUTHORIZED and not current.confirmed:
            await _confirm(request, token, current)
        raise
    else:
        if not current.confirmed:
            await _confirm(request, token, current)
    finally:
        # An autocommit connection has no transaction to roll back: returning it costs no round trip.
        session.close()


async def _confirm(request: Request, token: str, current: View) -> None:
    """401 unless the token, taken from the cache, is still valid (for a view that wrote no audit row)."""
    if await run_in_threadpool(_lookup, request, token) is None:
        current.tokens.forget(current.principal.key)
        raise unauthorized(REVOKED) from None
    current.confirmed = True


#: An audited read's session, principal and audit trail.
Viewer = Annotated[View, Depends(view, scope="function")]
