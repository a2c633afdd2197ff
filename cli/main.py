"""The ``preread`` console command: one entry point, one subcommand per job."""

from __future__ import annotations

import logging
import os

import typer

from preread.cli.cleanup import cleanup
from preread.cli.db import db_app
from preread.cli.draft import draft
from preread.cli.listen import listen
from preread.cli.render import render as render_command
from preread.cli.run import coordinate, run
from preread.cli.status import status
from preread.cli.worker import worker

app = typer.Typer(no_args_is_help=True, add_completion=False, help="infimed-preread: DICOM in, draft pre-reads out.")
app.add_typer(db_app, name="db")
app.command("draft")(draft)
app.command("worker")(worker)
app.command("status")(status)
app.command("run")(run)
app.command("coordinate")(coordinate)
app.command("listen")(listen)
app.command("render")(render_command)
app.command("cleanup")(cleanup)


def main() -> None:
    """Console-script entry point."""
    from preread.ingest.listener.ae import quiet_pydicom

    quiet_pydicom()  # pydicom's warnings can quote attribute values: keep patient data out of logs
    logging.basicConfig(
        level=os.environ.get("PREREAD_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per migration is enough
    app()


if __name__ == "__main__":
    main()
