"""``preread --help`` imports no heavy library: the stack is imported by the command that needs it."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "pynetdicom", "celery", "sqlalchemy", "pydicom", "numpy", "alembic", "pydantic_settings")


def modules_after(code: str) -> set[str]:
    """Top-level modules imported by a fresh interpreter running ``code``."""
    probe = code + "\nimport sys, json; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom preread.cli.main import app\nsys.argv = ['preread', '--help']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass"
    )
    loaded = modules_after(code)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_render_imports_no_database_or_model_stack() -> None:
    loaded = modules_after("import preread.cli.render, preread.ingest.render.batch")
    assert {"pydicom", "numpy"} <= loaded, "it does import what rendering needs"
    assert not loaded & {"torch", "transformers", "pynetdicom", "celery", "sqlalchemy", "alembic"}
