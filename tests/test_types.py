"""mypy, configured in ``pyproject.toml``, finds no error in the product packages.

The card's folders (``ingest/``, ``worker/``, ...) are the ``preread.*`` packages only through
setuptools' ``package-dir``, which mypy cannot follow; so the test lays out a ``preread/`` tree of
links to them (read from ``pyproject.toml``, so a new mapped folder is checked too) and runs mypy
over that, with the cache kept between runs in ``.mypy_cache/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support.procs import REPO


def _package_dirs() -> dict[str, str]:
    """setuptools' ``package-dir``: import name -> folder of the repository."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    mapping: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    return mapping


def _link_tree(root: Path, mapping: dict[str, str]) -> list[str]:
    """``root/preread/<name>`` -> each mapped folder; the mapped package names."""
    packages = []
    for package, folder in sorted(mapping.items()):
        link = root.joinpath(*package.split("."))
        link.parent.mkdir(parents=True, exist_ok=True)
        target = REPO / folder
        if link.is_symlink() and link.resolve() == target.resolve():
            packages.append(package)
            continue
        if link.is_symlink():
            link.unlink()
        try:
            link.symlink_to(target, target_is_directory=True)
        except FileExistsError:  # another run made it at the same moment
            pass
        packages.append(package)
    return packages


def test_mypy_finds_no_error_in_the_product_packages() -> None:
    cache = REPO / ".mypy_cache"
    root = cache / "tree"
    mapping = _package_dirs()
    packages = _link_tree(root, mapping)
    argv = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(cache)]
    for package in packages:
        argv += ["-p", package]
    env = {**os.environ, "MYPYPATH": str(root)}
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    # report errors against the repository's own paths, not the link tree's
    report = done.stdout + done.stderr
    for package, folder in mapping.items():
        report = report.replace(package.replace(".", os.sep) + os.sep, folder + os.sep)
    assert done.returncode == 0 and "Success: no issues found" in done.stdout, f"mypy found errors:\n{report}"
