"""``preread run`` on the embedded default starts the API, prints the dashboard's URL and makes a first admin token."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import httpx

from tests.support.procs import Proc, base_env, free_port, preread_argv, wait_until


def test_first_run_makes_an_admin_token_and_serves_the_dashboard(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "data"
    api_port = free_port()
    env = base_env(data_dir=data, api_port=api_port, port=free_port(), model=tiny_model_dir)
    token_file = data / "api-admin-token"
    run = Proc(preread_argv("run", "--no-live"), env, tmp_path / "run.log").start()
    try:
        wait_until(lambda: "dashboard: http://127.0.0.1:" in run.output(), 180, what="the dashboard banner")
        out = run.output()
        assert f"http://127.0.0.1:{api_port}/" in out
        assert str(token_file.resolve()) in out, "the first run says where the admin token is"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert token not in out, "the token itself is not printed to the log"
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=2).status_code == 200, 180, what="the API")
        worklist = httpx.get(f"http://127.0.0.1:{api_port}/api/v1/worklist", headers={"Authorization": f"Bearer {token}"})
        assert worklist.status_code == 200 and worklist.json() == {"items": [], "next_cursor": None}
    finally:
        run.stop()
    # A second run keeps the first token and still says where it is.
    again = Proc(preread_argv("run", "--no-live"), env, tmp_path / "run2.log").start()
    try:
        wait_until(lambda: "dashboard:" in again.output(), 180, what="the second banner")
        assert str(token_file.resolve()) in again.output()
    finally:
        again.stop()
    assert token_file.read_text().strip() == token
    listed = subprocess.run(preread_argv("token", "list"), env=env, capture_output=True, text=True, timeout=120)
    assert listed.stdout.count("admin") == 2, "one admin token (name and role), not one per run"
