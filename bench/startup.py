"""Startup benchmark: ``preread --help`` against a bare interpreter start.

    .venv/bin/python bench/startup.py [--runs 15]

Runs, interleaved and ``--runs`` times each, a bare ``python -c pass``, ``preread --help`` and
``preread render --help`` (the console script beside this interpreter, or ``python -m
preread.cli.main``), and prints the median wall time of each and its excess over the bare start
as a Markdown table. The goal (issue 10, item 8) is an excess under 0.3 s for ``preread --help``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def preread_argv() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("preread")
    return [str(script)] if script.exists() else [sys.executable, "-m", "preread.cli.main"]


def wall(argv: list[str]) -> float:
    """Seconds for one run of ``argv`` to exit (output discarded; it must succeed)."""
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "preread --help": preread_argv() + ["--help"],
        "preread render --help": preread_argv() + ["render", "--help"],
    }
    for argv in cases.values():  # warm the page cache and bytecode caches
        wall(argv)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, argv in cases.items():
            times[name].append(wall(argv))
    bare = statistics.median(times["python -c pass"])
    print(f"\nmedian of {args.runs} runs each, interleaved\n")
    print("| command | median s | min s | above bare start s |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {min(ts):.3f} | {med - bare:+.3f} |")


if __name__ == "__main__":
    main()
