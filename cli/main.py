"""The ``preread`` console command: one entry point, one subcommand per job.

Only typer and the command modules' signatures are imported here; each command imports the stack it
needs (torch, pynetdicom, celery, SQLAlchemy) when it runs, so ``preread --help`` starts quickly.
Every command runs inside :class:`~preread.cli.errors.OperatorErrorGroup`: expected failures print
one or two lines and exit 2; ``--debug`` or ``PREREAD_DEBUG=1`` keeps the traceback.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Annotated

import typer

from preread.cli.api import api
from preread.cli.audit import audit
from preread.cli.cleanup import cleanup
from preread.cli.db import db_app
from preread.cli.draft import draft
from preread.cli.errors import DEBUG_ENV, OperatorErrorGroup
from preread.cli.export import export
from preread.cli.listen import listen
from preread.cli.render import render as render_command
from preread.cli.retry import retry
from preread.cli.run import coordinate, run
from preread.cli.status import status
from preread.cli.token import token_app
from preread.cli.sweep import sweep_app
from preread.cli.worker import worker

app = typer.Typer(
    cls=OperatorErrorGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="infimed-preread: DICOM in, draft pre-reads out.",
)


@app.callback()
def _global_options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors (also PREREAD_DEBUG=1).")
    ] = False,
) -> None:
    """infimed-preread: DICOM in, draft pre-reads out."""
    if debug:
        os.environ[DEBUG_ENV] = "1"  # children of `preread run` inherit it


app.add_typer(db_app, name="db")
app.add_typer(sweep_app, name="sweep")
app.command("draft")(draft)
app.command("worker")(worker)
app.command("status")(status)
app.command("run")(run)
app.command("coordinate")(coordinate)
app.command("listen")(listen)
app.command("render")(render_command)
app.command("retry")(retry)
app.command("export")(export)
app.command("api")(api)
app.add_typer(token_app, name="token")
app.command("audit")(audit)
app.command("cleanup")(cleanup)


def configure_console_logging() -> None:
    """Log lines on stderr at PREREAD_LOG_LEVEL; pydicom kept quiet (its warnings can quote patient data).

    Commands that read DICOM also call ``quiet_pydicom`` (value validation off) once they import pydicom.
    """
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    logging.basicConfig(
        level=os.environ.get("PREREAD_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per migration is enough


def main() -> None:
    """Console-script entry point."""
    configure_console_logging()
    app()


if __name__ == "__main__":
    main()
