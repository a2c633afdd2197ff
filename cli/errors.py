"""Operator errors: the failures an operator can fix, each told in one or two lines with exit code 2.

Every ``preread`` command runs inside :class:`OperatorErrorGroup`, which turns the expected failures
(a port in use, a bad or unreachable database URL, a missing database, an unwritable data dir, an
unknown device, a missing model, a bad setting value) into a message naming the setting or resource
and the fix. Anything else, and everything under ``--debug`` or ``PREREAD_DEBUG=1``, keeps its
traceback. Only the standard library is imported here: ``preread --help`` must start quickly.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

#: The exit code of every operator error (1 stays "the command ran and found nothing to do").
EXIT_OPERATOR = 2
#: Environment variable that keeps tracebacks, like ``--debug``.
DEBUG_ENV = "PREREAD_DEBUG"
#: Settings whose values are never printed.
SECRET_FIELDS = frozenset({"webhook_secret", "tls_key", "worker_token"})
#: Settings that hold URLs, printed with the password masked.
URL_FIELDS = frozenset({"database_url", "broker_url", "webhook_url", "images_url"})

#: errno of a failed write or mkdir -> what to tell the operator.
_WRITE_ERRORS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file of that name is in the way",
}
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@\s]*)(?P<tail>@)")


class OperatorError(Exception):
    """A failure the operator fixes by changing a setting or a resource; ``str`` is the message."""


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (works on URLs SQLAlchemy cannot parse)."""
    return _PASSWORD_IN_URL.sub(lambda m: f"{m['head']}***{m['tail']}", url)


def debug_requested(argv: list[str] | None = None) -> bool:
    """Whether tracebacks were asked for (``--debug`` anywhere before the command, or PREREAD_DEBUG)."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return f"PREREAD_{field.upper()}"


_current: dict[str, Any] = {}


def use_settings(settings: Any) -> None:
    """Name ``settings`` (a command's settings after its options) in messages instead of the environment's."""
    _current["settings"] = settings


def _settings() -> Any | None:
    """The current settings, or None when they cannot be read (the error at hand may be theirs)."""
    if "settings" in _current:
        return _current["settings"]
    try:
        from preread.schemas.settings import get_settings

        return get_settings()
    except Exception:
        return None


def _database_url() -> str:
    """The database URL in use, masked, for messages."""
    settings = _settings()
    if settings is None:
        return os.environ.get("PREREAD_DATABASE_URL", "?")
    return mask_url(settings.effective_database_url)


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text, passwords masked."""
    for line in str(exc).splitlines():
        if line.strip():
            return mask_url(line.strip())
    return type(exc).__name__


def _validation_message(exc: Any) -> str | None:
    """A pydantic ``ValidationError`` of the settings, one line per bad setting (at most two)."""
    title = str(getattr(exc, "title", ""))
    if not title.endswith("Settings"):
        return None
    lines = []
    for err in exc.errors()[:2]:
        loc = [str(part) for part in err.get("loc", ()) if not isinstance(part, int)]
        field = loc[0] if loc else "?"
        value = err.get("input")
        if field in SECRET_FIELDS or isinstance(value, dict):
            shown = ""
        elif field in URL_FIELDS and isinstance(value, str):
            shown = f"={mask_url(value)!r}"
        else:
            shown = f"={value!r}"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"bad setting {env_name(field)}{shown}: {msg}; fix it in the environment or the config file")
    return "\n".join(lines)


def _oserror_message(exc: OSError) -> str | None:
    """Ports in use and data dirs we cannot write."""
    port = getattr(exc, "port", None)
    if exc.errno == errno.EADDRINUSE:
        where = f"port {port}" if port is not None else "the listening port"
        host = getattr(exc, "host", None)
        on = f" on {host}" if host else ""
        return (
            f"{where}{on} is already in use (PREREAD_PORT): stop the program using it, "
            f"or set PREREAD_PORT (or --port) to a free port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot bind address {getattr(exc, 'host', '?')} (PREREAD_HOST): set PREREAD_HOST to an address of this machine"
    if exc.errno in _WRITE_ERRORS and exc.filename:
        settings = _settings()
        path = Path(str(exc.filename))
        reason = _WRITE_ERRORS[exc.errno]
        if settings is not None and _inside(path, settings.data_dir):
            return (
                f"cannot write to the data dir {settings.data_dir.resolve()} (PREREAD_DATA_DIR): {reason}; "
                f"set PREREAD_DATA_DIR to a writable folder"
            )
        return f"cannot write {path}: {reason}"
    return None


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both made absolute)."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _database_message(exc: BaseException) -> str | None:
    """SQLAlchemy's errors for bad, unreachable or missing databases."""
    module = type(exc).__module__
    if not module.startswith("sqlalchemy"):
        return None
    name = type(exc).__name__
    text = _first_line(getattr(exc, "orig", None) or exc)
    example = "e.g. postgresql+psycopg://user@host:5432/preread or sqlite:////var/lib/preread/preread.db"
    if name in {"ArgumentError", "NoSuchModuleError"}:
        raw = os.environ.get("PREREAD_DATABASE_URL", "")
        return f"PREREAD_DATABASE_URL={mask_url(raw)!r} is not a database URL; use {example}"
    if name == "OperationalError":
        url = _database_url()
        missing = re.search(r'database "([^"]+)" does not exist', text)
        if missing:
            return (
                f"no database {missing[1]!r} at {url} (PREREAD_DATABASE_URL): "
                f"create it (createdb {missing[1]}) or point PREREAD_DATABASE_URL at an existing one"
            )
        if "unable to open database file" in text or "readonly database" in text:
            settings = _settings()
            folder = settings.data_dir.resolve() if settings is not None else "the data dir"
            return (
                f"cannot open the SQLite database {url}: the data dir {folder} (PREREAD_DATA_DIR) is not writable; "
                f"set PREREAD_DATA_DIR to a writable folder or PREREAD_DATABASE_URL to another database"
            )
        return f"cannot reach the database at {url} (PREREAD_DATABASE_URL): {text}; start it or fix the URL"
    return None


def _device_message(exc: BaseException) -> str | None:
    """Torch's errors for a device this machine does not have."""
    text = str(exc)
    markers = ("Invalid device string", "Torch not compiled with CUDA", "no NVIDIA driver", "CUDA driver",
               "invalid device ordinal", "Expected one of cpu, cuda")
    if isinstance(exc, (RuntimeError, AssertionError, ValueError)) and any(m in text for m in markers):
        settings = _settings()
        device = getattr(settings, "device", os.environ.get("PREREAD_DEVICE", "?"))
        return f"device {device!r} (PREREAD_DEVICE) is not usable here: {_first_line(exc)}; set PREREAD_DEVICE=cpu or auto"
    return None


def _model_message(exc: BaseException) -> str | None:
    """Hugging Face's errors for a model that is neither a local folder nor reachable on the hub."""
    module = type(exc).__module__
    text = str(exc)
    hub = module.startswith(("huggingface_hub", "transformers"))
    looks = "is not a local folder" in text or "Can't load" in text or "does not appear to have a file" in text
    if not (hub or (isinstance(exc, OSError) and looks)):
        return None
    settings = _settings()
    model = str(getattr(settings, "model", os.environ.get("PREREAD_MODEL", "?")))
    device = getattr(settings, "device", "?")
    looks_like_folder = model.startswith(("/", ".", "~")) or model.count("/") > 1
    if looks_like_folder and not Path(model).expanduser().is_dir():
        why = "no such folder"
    else:
        why = _first_line(exc)[:160]
    return (
        f"cannot load the model {model!r} (PREREAD_MODEL) on device {device!r}: {why}\n"
        f"set PREREAD_MODEL=/path/to/folder (a downloaded model, or --model) or PREREAD_DEVICE=cpu"
    )


def explain(exc: BaseException) -> str | None:
    """The operator's message for ``exc``, or None when it is not an expected failure (keep the traceback)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # also look at what the error wraps
        seen.add(id(current))
        if isinstance(current, OperatorError):
            return str(current)
        if type(current).__name__ in {"SettingsError", "SettingsFileError"}:  # already one line per bad setting
            return mask_url(str(current))
        if type(current).__name__ == "ValidationError" and type(current).__module__.startswith("pydantic"):
            message = _validation_message(current)
        elif isinstance(current, OSError) and not type(current).__module__.startswith(("huggingface_hub", "transformers")):
            message = _oserror_message(current) or _model_message(current)
        else:
            message = _database_message(current) or _device_message(current) or _model_message(current)
        if message:
            return message
        current = current.__cause__ or current.__context__
    return None


def report(exc: BaseException, command: str = "preread") -> int:
    """Print the one-line message for ``exc`` on stderr and return the exit code; re-raise when unexpected."""
    message = explain(exc)
    if message is None or debug_requested():
        raise exc
    first, *rest = message.splitlines()
    typer.echo(f"{command}: {first}", err=True)
    for line in rest[:1]:
        typer.echo(f"  {line}", err=True)
    return EXIT_OPERATOR


class OperatorErrorGroup(TyperGroup):
    """The ``preread`` command group: every subcommand's expected failures become one-line errors."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped below, re-raised when not an operator error
            if type(exc).__module__.startswith(("typer", "click")):  # usage errors: typer prints those itself
                raise
            name = ctx.invoked_subcommand or ctx.info_name or "preread"
            code = report(exc, f"preread {name}" if name != "preread" else name)
            ctx.exit(code)
