"""A real install: ``pip install .`` (not editable) gives a ``preread`` that works from any folder.

The package is installed with ``--no-deps`` into a fresh virtual environment
whose dependencies are this test interpreter's (a ``.pth`` file lists its
site-packages), so torch is not installed twice. The source copy it was built
from is deleted before the command runs: migrations and prompts must travel
inside the package.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image as PILImage

from tests.support.procs import REPO, base_env
from tests.support.studies import testdata

#: Import names a product must never claim: Alembic's own, and generic folder names of this repository.
GENERIC_NAMES = ("alembic", "cli", "api", "ingest", "worker", "schemas", "tests", "bench", "docker")


def _dependency_paths() -> list[str]:
    """This interpreter's site-packages folders, in import order (where the dependencies are)."""
    paths = [p for p in sys.path if p.rstrip(os.sep).endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    for extra in site.getsitepackages():
        if extra not in paths and Path(extra).is_dir():
            paths.append(extra)
    return paths


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with infimed-preread installed from a copy of the repository; the copy is gone afterwards."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".mypy_cache", ".pytest_cache", "build", "dist", "*.egg-info", "__pycache__",
            "preread-data", "tests", "bench", "docker",
        ),
    )
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, dict(os.environ))
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    (Path(purelib) / "zz_test_dependencies.pth").write_text("\n".join(_dependency_paths()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
         "--ignore-installed", str(source)],  # the test venv's own (editable) install is not this one
        root,
        env,
    )
    shutil.rmtree(source)
    return venv


def _env(data_dir: Path, **settings: object) -> dict[str, str]:
    env = base_env(data_dir=data_dir, **settings)
    env.pop("PYTHONPATH", None)
    return env


def test_installed_package_claims_only_the_preread_name(installed: Path) -> None:
    python = str(installed / "bin" / "python")
    probe = (
        "import json, sysconfig, preread, preread.migrations, preread.worker.inference, alembic, alembic.command\n"
        "print(json.dumps({'purelib': sysconfig.get_paths()['purelib'], 'preread': list(preread.__path__),"
        " 'migrations': list(preread.migrations.__path__), 'alembic': alembic.__file__}))"
    )
    found = json.loads(_run([python, "-c", probe], installed, _env(installed / "data")).stdout)
    purelib = Path(found["purelib"])
    assert [Path(p) for p in found["preread"]] == [purelib / "preread"], "preread comes from the install, not the source"
    assert Path(found["migrations"][0]) == purelib / "preread" / "migrations"
    assert not Path(found["alembic"]).is_relative_to(purelib), "the Alembic library is not shadowed"
    top_level = sorted(p.name for p in purelib.iterdir() if not p.name.endswith((".dist-info", ".pth")))
    assert top_level == ["preread"]
    (dist_info,) = purelib.glob("infimed_preread-*.dist-info")
    recorded = {line.split(",", 1)[0].split("/", 1)[0] for line in (dist_info / "RECORD").read_text().splitlines()}
    claimed = {name for name in recorded if not name.endswith(".dist-info") and name != ".."}
    assert claimed == {"preread"}
    for name in GENERIC_NAMES:
        assert not (purelib / name).exists() and not (purelib / f"{name}.py").exists()
    packaged = purelib / "preread"
    assert sorted(p.name for p in (packaged / "migrations" / "versions").glob("*.py"))
    assert (packaged / "migrations" / "env.py").is_file() and (packaged / "migrations" / "script.py.mako").is_file()
    assert sorted((packaged / "worker" / "inference" / "prompts").iterdir()), "the prompts travel as package data"


def test_installed_command_upgrades_renders_and_drafts_from_any_folder(
    installed: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    preread = str(installed / "bin" / "preread")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data_dir = tmp_path / "data"
    env = _env(data_dir)

    _run([preread, "db", "upgrade"], elsewhere, env)
    with sqlite3.connect(data_dir / "preread.db") as db:
        (version,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    heads = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "from alembic.script import ScriptDirectory; from preread.schemas.database import alembic_config;"
         "print(ScriptDirectory.from_config(alembic_config('sqlite://')).get_current_head())"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert version == heads
    assert {"studies", "series", "instances", "reports", "images", "outbox"} <= tables

    out = tmp_path / "png"
    _run([preread, "render", str(testdata("CT_small.dcm")), "--out", str(out)], elsewhere, env)
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 1
    with PILImage.open(pngs[0]) as png:
        assert png.size == (128, 128) and png.mode == "L"

    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(testdata("CT_small.dcm"), study / "ct.dcm")
    drafted = _run(
        [preread, "draft", str(study), "--json"], elsewhere, _env(data_dir, model=tiny_model_dir, max_images=1)
    )
    (draft,) = json.loads(drafted.stdout)
    assert draft["model_id"] == str(tiny_model_dir)
    assert draft["raw_output"], "the tiny model's output is kept"
    assert len(draft["images"]) == 1
    assert list(elsewhere.iterdir()) == [], "nothing written to the working folder"
