"""The dashboard: server-rendered pages (Jinja2) whose small scripts call the JSON API with the session cookie."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from preread.api.auth import READERS, SESSION_COOKIE, WRITERS, db_session, page_token
from preread.api.tokens import verify_token
from preread.ingest.assembly.catalog import is_valid_uid

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
pages = APIRouter(include_in_schema=False)
Db = Annotated[Session, Depends(db_session, scope="function")]
#: A dashboard session lasts a reading shift.
SESSION_SECONDS = 12 * 3600


def _login() -> RedirectResponse:
    return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)


def _page(request: Request, session: Session, template: str, **context: object) -> Response:
    found = page_token(request, session)
    if found is None:
        return _login()
    principal, csrf = found
    return templates.TemplateResponse(
        request,
        template,
        {"user": principal.name, "role": str(principal.role), "can_write": principal.role in WRITERS, "csrf": csrf, **context},
    )


@pages.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    return templates.TemplateResponse(request, "login.html", {"error": None})


@pages.post("/login")
def login(request: Request, session: Db, token: Annotated[str, Form(max_length=256)]) -> Response:
    principal = verify_token(session, token)
    if principal is None or principal.role not in READERS:
        error = "That token is unknown, revoked, or cannot read the worklist."
        return templates.TemplateResponse(request, "login.html", {"error": error}, status_code=status.HTTP_401_UNAUTHORIZED)
    response = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        SESSION_COOKIE, token.strip(), max_age=SESSION_SECONDS, httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/",
    )
    return response


@pages.get("/logout")
def logout() -> Response:
    response = _login()
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@pages.get("/", response_class=HTMLResponse)
def worklist_page(request: Request, session: Db) -> Response:
    return _page(request, session, "worklist.html", page="worklist")


@pages.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, study_uid: str, session: Db) -> Response:
    if not is_valid_uid(study_uid):
        return HTMLResponse("<h1>Not a DICOM UID</h1>", status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
    return _page(request, session, "study.html", page="study", study_uid=study_uid)


@pages.get("/quality", response_class=HTMLResponse)
def quality_page(request: Request, session: Db) -> Response:
    return _page(request, session, "quality.html", page="quality")
