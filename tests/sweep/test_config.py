"""Sweep configuration: sources from the settings file, the off-peak window, the cron schedule, scheduled starts."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from preread.ingest.sweep.runner import start_scheduled
from preread.ingest.sweep.sources import DicomSource, SourceError, find_source, load_sources
from preread.ingest.sweep.window import parse_cron, parse_window
from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Sweep

TOML = """
[[sources]]
name = "main-pacs"
kind = "dicom"
ae_title = "PACS"
host = "10.0.0.5"
port = 104
retrieve = "c-get"
max_results = 500

[[sources]]
name = "web"
kind = "dicomweb"
url = "https://pacs.example/dicom-web/"
max_in_flight = 8

[[sources]]
name = "disk"
kind = "folder"
path = "/srv/old-studies"
"""


def test_sources_are_read_from_the_settings_file_with_their_defaults(tmp_path: Path) -> None:
    path = tmp_path / "preread.toml"
    path.write_text(TOML)
    sources = load_sources(config_file=path)
    assert [s.name for s in sources] == ["main-pacs", "web", "disk"]
    pacs = find_source(sources, "main-pacs")
    assert isinstance(pacs, DicomSource) and pacs.retrieve == "c-get" and pacs.max_results == 500
    assert (pacs.max_associations, pacs.max_in_flight) == (2, 4)
    web = find_source(sources, "web")
    assert web.url == "https://pacs.example/dicom-web" and web.max_in_flight == 8  # type: ignore[union-attr]


def test_settings_with_a_sources_list_win_over_the_file(tmp_path: Path) -> None:
    class WithSources:
        sources = [{"name": "only", "kind": "folder", "path": str(tmp_path)}]

    assert [s.name for s in load_sources(WithSources(), config_file=tmp_path / "absent.toml")] == ["only"]


@pytest.mark.parametrize("text,needle", [
    ('[[sources]]\nname = "a"\nkind = "ftp"\n', "[[sources]]"),
    ('[[sources]]\nname = "a"\nkind = "dicom"\nhost = "h"\nport = 104\n', "ae_title"),
    ('[[sources]]\nname = "a"\nkind = "folder"\npath = "/x"\n[[sources]]\nname = "a"\nkind = "folder"\npath = "/y"\n', "twice"),
])
def test_a_wrong_source_is_an_error_naming_the_setting(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SourceError) as caught:
        load_sources(config_file=path)
    assert needle in str(caught.value)


def test_an_unknown_source_name_lists_the_configured_ones(tmp_path: Path) -> None:
    path = tmp_path / "preread.toml"
    path.write_text(TOML)
    with pytest.raises(SourceError) as caught:
        find_source(load_sources(config_file=path), "nope")
    assert "main-pacs, web, disk" in str(caught.value)


def test_window_across_midnight() -> None:
    window = parse_window("20:00-06:00")
    assert window is not None
    inside = [datetime(2026, 1, 1, 20, 0), datetime(2026, 1, 1, 23, 59), datetime(2026, 1, 2, 5, 59)]
    outside = [datetime(2026, 1, 1, 6, 0), datetime(2026, 1, 1, 12, 0), datetime(2026, 1, 1, 19, 59)]
    assert all(window.contains(t) for t in inside) and not any(window.contains(t) for t in outside)
    day = parse_window("09:30-17:00")
    assert day is not None and day.contains(datetime(2026, 1, 1, 9, 30)) and not day.contains(datetime(2026, 1, 1, 17, 0))
    assert parse_window(None) is None and parse_window("") is None
    with pytest.raises(ValueError, match="PREREAD_SWEEP_WINDOW"):
        parse_window("8pm-6am")


def test_cron_previous_firing() -> None:
    nightly = parse_cron("30 1 * * *")
    assert nightly.previous(datetime(2026, 3, 5, 9, 0)) == datetime(2026, 3, 5, 1, 30)
    assert nightly.previous(datetime(2026, 3, 5, 1, 29)) == datetime(2026, 3, 4, 1, 30)
    weekdays = parse_cron("0 22 * * 1-5")  # Mon-Fri 22:00; 2026-03-08 is a Sunday
    assert weekdays.previous(datetime(2026, 3, 8, 23, 0)) == datetime(2026, 3, 6, 22, 0)
    every = parse_cron("*/15 * * * *")
    assert every.previous(datetime(2026, 3, 5, 9, 44)) == datetime(2026, 3, 5, 9, 30)
    assert parse_cron("@daily").previous(datetime(2026, 3, 5, 0, 0)) == datetime(2026, 3, 5, 0, 0)
    assert parse_cron("0 0 * * 7").previous(datetime(2026, 3, 9, 12, 0)) == datetime(2026, 3, 8, 0, 0)
    for bad in ("* * * *", "61 * * * *", "a b c d e"):
        with pytest.raises(ValueError, match="PREREAD_SWEEP_SCHEDULE"):
            parse_cron(bad)


def test_a_scheduled_sweep_of_the_previous_day_starts_once_per_deployment(tmp_path: Path, pg_url: str) -> None:
    settings = Settings(data_dir=tmp_path, database_url=pg_url)
    path = tmp_path / "preread.toml"
    path.write_text(TOML)
    sources = load_sources(config_file=path)
    now = datetime(2026, 3, 5, 2, 10).astimezone()
    first = start_scheduled(settings, sources, "0 2 * * *", now=now)
    again = start_scheduled(settings, sources, "0 2 * * *", now=now.replace(minute=40))  # another coordinator, later
    assert len(first) == 3 and again == []
    with session_scope(pg_url) as session:
        sweeps = session.execute(select(Sweep.source, Sweep.date_from, Sweep.date_to, Sweep.state)).all()
    assert sorted(sweeps) == sorted((s.name, date(2026, 3, 4), date(2026, 3, 4), "queued") for s in sources)
    assert start_scheduled(settings, sources, "0 2 * * *", now=datetime(2026, 3, 5, 1, 0).astimezone()) == [], \
        "nothing new before the next firing (yesterday's 02:00 is past the grace period)"
