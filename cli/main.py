"""The ``preread`` console command: one entry point, one subcommand per job."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="infimed-preread: DICOM in, draft pre-reads out.")


def main() -> None:
    """Console-script entry point."""
    app()
