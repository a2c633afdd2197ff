"""The FastAPI application: the JSON API, health and metrics, and the dashboard, with their safety rails."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from preread.api.metrics import PipelineCollector, registry_for
from preread.api.tokens import TokenCache
from preread.api.worklist import Plans
from preread.schemas.database import engine_for, views_engine
from preread.schemas.settings import Settings
from preread.worker.inference.thresholds import probe_thresholds

log = logging.getLogger(__name__)

HERE = Path(__file__).parent


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by header or as they stream in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes (PREREAD_API_MAX_BODY)"},
                                        status_code=status.HTTP_413_CONTENT_TOO_LARGE)
                await response(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                                        detail=f"request body over {self.max_bytes} bytes (PREREAD_API_MAX_BODY)")
            return message

        await self.app(scope, limited, send)


def _validation_errors(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each bad field and why, without echoing the value (it may be a patient identifier)."""
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, Any]] = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", "invalid"), "type": e.get("type", "")} for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: log its type and where, never its message (it could quote data); answer 500 plainly."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-4:]))
    log.error("internal error on %s %s: %s at %s", request.method, request.url.path, type(exc).__name__, where)
    return JSONResponse({"detail": "internal error; see the API log"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)


def create_app(settings: Settings) -> FastAPI:
    """The application for ``settings``: one engine, the prompt file's thresholds, a metrics registry."""
    from preread.api.dashboard import pages
    from preread.api.routes import api, ops
    from preread.api.worker_images import worker_api

    app = FastAPI(
        title="infimed-preread reading queue",
        version="1",
        description="Drafted pre-reads for radiologists: worklist, studies, feedback, quality, health and metrics.",
        docs_url=None,  # served below, behind a token like everything but /healthz
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.sessions = sessionmaker(engine_for(settings.effective_database_url), expire_on_commit=False)
    #: Audited reads (preread.api.views): autocommit, commits without the flush wait, pinged only when idle.
    app.state.views = sessionmaker(views_engine(settings.effective_database_url), expire_on_commit=False)
    app.state.tokens = TokenCache()
    app.state.thresholds = probe_thresholds(settings)
    app.state.plans = Plans()
    app.state.registry = registry_for(
        PipelineCollector(app.state.sessions, settings, app.state.thresholds, _queue_depths(settings))
    )
    app.include_router(api)
    app.include_router(ops)
    app.include_router(worker_api)
    _add_docs(app)
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(RequestValidationError, _validation_errors)
    app.add_exception_handler(Exception, _internal_error)
    if settings.api_cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        origins = [o.strip() for o in settings.api_cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body)
    return app


#: Where Swagger UI's own files (from the swagger-ui-bundle-v2 package) are served: same origin, no CDN.
SWAGGER_ASSETS = "/docs-assets"


def _add_docs(app: FastAPI) -> None:
    """OpenAPI schema and Swagger UI at /openapi.json and /docs, for any valid token or dashboard session.

    Swagger UI's script, style sheet and icon come from this server, so /docs renders on a
    hospital network without internet access; they hold no data and need no token.
    """
    from fastapi import Depends
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    from preread.api.auth import SCRAPERS, require

    allowed = Depends(require(SCRAPERS))
    app.mount(SWAGGER_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/openapi.json", include_in_schema=False, dependencies=[allowed])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[allowed])
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="infimed-preread API",
            swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from the public validator
        )


def _queue_depths(settings: Settings):  # type: ignore[no-untyped-def]
    """Asks the broker for queue depths (only a server broker; the embedded file queue has none to ask)."""
    if not settings.broker_url:
        return None
    app = None

    def depths() -> dict[str, int | None]:
        nonlocal app
        from preread.worker.pipeline.celery_app import make_celery
        from preread.worker.pipeline.status import queue_depths

        if app is None:
            app = make_celery(settings)
        return queue_depths(app)

    return depths
