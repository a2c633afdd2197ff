"""Idle CPU of ``preread run``: what polling the embedded queue costs when nothing arrives (issue 16).

Starts two ``preread run --no-live`` at once, tiny model, each on its own SQLite data dir:
(a) the embedded default (the server-less file queue, which consumers poll) and (b) the
baseline of the same run, a private Redis as broker (workers block in BRPOP: no polling).
Each gets one single-image CR study by ``storescu``; once it is drafted, the CPU time
(user + system, from ``/proc``) of every process of each run is summed per role over
``--window`` seconds twice: right after the study (the queue is polled at its busy pace) and
after ``--quiet`` seconds without a message (its idle pace). Prints % of one core per role.

    python bench/idle.py [--window 30] [--quiet 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from tests.support.procs import Proc  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
#: The roles of a run's processes, by what their command line holds (first match wins).
ROLES = [("render-worker", "render"), ("infer-worker", "infer"), ("listener", " listen"), ("api", " api"),
         ("run (coordinator)", " run")]


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks) of ``pid``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far of each role's processes under ``root`` (children counted with their role's process)."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(int(p))) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)

    def total(pid: int) -> int:
        return stats[pid][1] + sum(total(c) for c in children.get(pid, []))

    out = {"run (coordinator)": stats[root][1] / TICK}
    for child in children.get(root, []):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        role = next((name for name, key in ROLES if key in cmd), "other")
        out[role] = out.get(role, 0.0) + total(child) / TICK
    return out


def _start(tmp: Path, name: str, model_dir: Path, broker_url: str | None) -> tuple[Proc, int, str]:
    from tests.support.procs import base_env, free_port, preread_argv

    port = free_port()
    work = tmp / name
    work.mkdir()
    data = work / "preread-data"
    env = base_env(data_dir=data, model=model_dir, port=port, host="127.0.0.1", stable_after=600, min_free_bytes=0,
                   max_images=1, api_port=free_port(), broker_url=broker_url)
    proc = Proc(preread_argv("run", "--no-live"), env, tmp / f"{name}.log", cwd=work).start()
    return proc, port, f"sqlite:///{(data / 'preread.db').resolve()}"


def _draft_one(port: int, url: str, path: Path, uid: str) -> None:
    from tests.support.procs import storescu, wait_port, wait_until

    wait_port(port, 180)
    time.sleep(10)  # the infer worker loads its model
    sent = storescu(port, [path])
    assert sent.returncode == 0, sent.stderr
    engine = create_engine(url)

    def drafted() -> bool:
        with engine.connect() as conn:
            return conn.execute(text("select count(*) from reports r join studies s on s.id = r.study_id "
                                     "where s.study_instance_uid = :u"), dict(u=uid)).scalar_one() > 0

    wait_until(drafted, 300, interval=0.2, what="the study drafted")
    engine.dispose()


def _window(roots: dict[str, int], seconds: float) -> dict[str, dict[str, float]]:
    """% of one core per role of each run over ``seconds``."""
    before = {name: _tree_cpu(pid) for name, pid in roots.items()}
    time.sleep(seconds)
    after = {name: _tree_cpu(pid) for name, pid in roots.items()}
    return {name: {role: 100.0 * (after[name].get(role, 0.0) - before[name].get(role, 0.0)) / seconds
                   for role in after[name]} for name in roots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of each CPU sample")
    parser.add_argument("--quiet", type=float, default=300.0, help="seconds without messages before the second sample")
    args = parser.parse_args()

    from pydicom.uid import generate_uid

    from tests.support.procs import RedisServer
    from tests.support.synthetic import projection, save
    from tests.support.tiny_model import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="preread-idle-"))
    model_dir = build_tiny_model(tmp / "tiny-model")
    redis = RedisServer(tmp / "redis").start()
    runs = {"embedded (file queue)": None, "Redis (baseline)": redis.url}
    procs = {}
    try:
        for name, broker in runs.items():
            procs[name] = _start(tmp, f"run-{name.split()[0].lower()}", model_dir, broker)
        for i, (name, (_, port, url)) in enumerate(procs.items()):
            uid = generate_uid()
            ds = projection(study_uid=uid, series_uid=generate_uid(), series_number=1, instance_number=1, view="PA")
            _draft_one(port, url, save(ds, tmp / f"in-{i}"), uid)
        roots = {name: proc.pid for name, (proc, _, _) in procs.items()}
        busy = _window(roots, args.window)
        time.sleep(max(0.0, args.quiet - args.window))
        quiet = _window(roots, args.window)
    finally:
        for proc, _, _ in procs.values():
            proc.kill()
        redis.kill()

    table = Table(title=f"bench/idle.py: CPU of `preread run` with nothing arriving, % of one core over {args.window:.0f} s",
                  caption=f"'after a study': the {args.window:.0f} s after a draft; 'quiet': after {args.quiet:.0f} s "
                          "without a message")
    table.add_column("process", justify="left")
    for name in runs:
        table.add_column(f"{name}: after a study", justify="right")
        table.add_column(f"{name}: quiet", justify="right")
    roles = [r for r, _ in ROLES if any(r in busy[n] for n in runs)]
    for role in roles + ["total"]:
        cells = []
        for name in runs:
            for phase in (busy, quiet):
                value = sum(phase[name].values()) if role == "total" else phase[name].get(role, 0.0)
                cells.append(f"{value:.2f}")
        table.add_row(role, *cells)
    base = list(runs)[-1]
    table.add_row("total ÷ baseline's", *(
        f"{sum(phase[name].values()) / max(sum(phase[base].values()), 1e-9):.2f}" for name in runs for phase in (busy, quiet)))
    Console().print(table)


if __name__ == "__main__":
    main()
