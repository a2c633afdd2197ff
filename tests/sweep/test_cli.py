"""``preread sweep`` as an operator meets it: dry run, operator errors, pause/resume/cancel, status lines."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.procs import base_env, preread_argv
from tests.sweep.helpers import DAY1, DAY2, DAY3, three_dates


def cli(tmp_path: Path, *args: str, **settings: object) -> subprocess.CompletedProcess[str]:
    env = base_env(data_dir=tmp_path / "data", config_file=tmp_path / "preread.toml", **settings)
    return subprocess.run(preread_argv("sweep", *args), env=env, capture_output=True, text=True, timeout=300)


def write_folder_source(tmp_path: Path) -> None:
    (tmp_path / "preread.toml").write_text(f'[[sources]]\nname = "disk"\nkind = "folder"\npath = "{tmp_path / "in"}"\n')


def test_dry_run_lists_what_would_be_retrieved_and_changes_nothing(tmp_path: Path) -> None:
    studies = three_dates(tmp_path / "in", per_day=1, instances=2)
    write_folder_source(tmp_path)
    done = cli(tmp_path, "run", "disk", "--from", DAY1.isoformat(), "--to", DAY2.isoformat(), "--dry-run")
    assert done.returncode == 0, done.stderr
    for day in (DAY1, DAY2):
        assert f"{day} {studies[day][0][0]} CT 2" in done.stdout
    assert studies[DAY3][0][0] not in done.stdout
    assert "2 studies would be retrieved" in done.stdout
    listing = cli(tmp_path, "list")
    assert listing.stdout.strip() == "no sweeps", "a dry run creates no sweep"


def test_operator_errors_exit_2_with_one_line_naming_the_fix(tmp_path: Path) -> None:
    write_folder_source(tmp_path)
    unknown = cli(tmp_path, "run", "nope", "--from", "2024-01-01", "--to", "2024-01-02", "--detach")
    assert unknown.returncode == 2 and "no source named 'nope'" in unknown.stderr and "disk" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    bad_date = cli(tmp_path, "run", "disk", "--from", "01/02/2024", "--to", "2024-01-02")
    assert bad_date.returncode == 2 and "YYYY-MM-DD" in bad_date.stderr
    (tmp_path / "preread.toml").write_text('[[sources]]\nname = "x"\nkind = "dicom"\n')
    broken = cli(tmp_path, "run", "x", "--from", "2024-01-01", "--to", "2024-01-01")
    assert broken.returncode == 2 and "[[sources]]" in broken.stderr and "Traceback" not in broken.stderr


def test_pause_resume_cancel_and_list(tmp_path: Path) -> None:
    write_folder_source(tmp_path)
    (tmp_path / "in").mkdir()
    created = cli(tmp_path, "run", "disk", "--from", "2024-01-01", "--to", "2024-01-03", "--detach")
    assert created.returncode == 0, created.stderr
    sweep_id = created.stdout.strip()
    assert cli(tmp_path, "pause", sweep_id).returncode == 0
    assert "paused" in cli(tmp_path, "list").stdout
    assert cli(tmp_path, "resume", sweep_id).returncode == 0
    assert "queued" in cli(tmp_path, "status", sweep_id).stdout
    env = base_env(data_dir=tmp_path / "data", config_file=tmp_path / "preread.toml")
    status = subprocess.run(preread_argv("status"), env=env, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and f"sweep {sweep_id} disk 2024-01-01..2024-01-03 queued" in status.stdout, status.stdout
    assert cli(tmp_path, "cancel", sweep_id).returncode == 0
    again = cli(tmp_path, "pause", sweep_id)
    assert again.returncode == 2 and "cancelled" in again.stderr
    assert cli(tmp_path, "status", "999").returncode == 2
