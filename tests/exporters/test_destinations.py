"""Destinations from the settings: kinds validated with clear errors, shorthands, study filters."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select, update

from preread.schemas.database import session_scope
from preread.schemas.settings import Settings
from preread.schemas.tables import Delivery, Study
from preread.worker.exporters.deliveries import plan
from preread.worker.exporters.destinations import (
    DestinationError,
    DicomDestination,
    FolderDestination,
    WebhookDestination,
    destinations_from_settings,
    parse_destinations,
)
from tests.support.drafted import drafted_study


def test_each_kind_with_its_fields_and_the_shorthands() -> None:
    settings = Settings(export_fhir=True, webhook_url="http://127.0.0.1:9/hook", webhook_secret="s", destinations=[
        {"name": "pacs", "kind": "dicom", "ae_title": "ORTHANC", "host": "10.0.0.5", "port": 104,
         "storage_commitment": True, "tls": {"ca": "/etc/pacs-ca.pem"}},
    ])
    pacs, fhir_file, hook = destinations_from_settings(settings)
    assert isinstance(pacs, DicomDestination) and pacs.storage_commitment and pacs.tls is not None
    assert str(pacs.tls.ca) == "/etc/pacs-ca.pem" and pacs.sends == ("sr",)
    assert isinstance(fhir_file, FolderDestination) and fhir_file.name == "fhir-file" and fhir_file.sends == ("fhir",)
    assert isinstance(hook, WebhookDestination) and (hook.url, hook.secret) == ("http://127.0.0.1:9/hook", "s")


@pytest.mark.parametrize(("raw", "message"), [
    ([{"name": "pacs", "kind": "dicom", "host": "h", "port": 104}], "destination 'pacs': ae_title: Field required"),
    ([{"name": "pacs", "kind": "dicom", "ae_title": "A", "host": "h", "port": 104, "colour": "red"}],
     "destination 'pacs': colour: Extra inputs are not permitted"),
    ([{"name": "x", "kind": "smtp"}], "destination 'x': kind:"),
    ([{"name": "a", "kind": "fhir", "url": "http://h"}, {"name": "a", "kind": "webhook", "url": "http://h"}],
     "destination 'a' is named twice"),
])
def test_wrong_destinations_are_named(raw: list[dict[str, object]], message: str) -> None:
    with pytest.raises(DestinationError) as info:
        parse_destinations(raw)
    assert message in str(info.value)


def test_modalities_and_min_urgency_choose_the_studies(pg_url: str, tmp_path: Path) -> None:
    stat_cr, _ = drafted_study(pg_url, tmp_path / "src", n=0)  # CR, urgency stat
    routine_cr, _ = drafted_study(pg_url, tmp_path / "src", n=1)
    with session_scope(pg_url) as session:
        session.execute(update(Study).where(Study.id == routine_cr).values(urgency="routine"))
    destinations = parse_destinations([
        {"name": "ct-only", "kind": "folder", "modalities": ["ct"]},
        {"name": "urgent", "kind": "folder", "min_urgency": "priority"},
        {"name": "all", "kind": "folder"},
    ])
    with session_scope(pg_url) as session:
        assert plan(session, destinations) == 3
        rows = sorted(session.execute(select(Delivery.study_id, Delivery.destination)).all())
    assert rows == sorted([(stat_cr, "urgent"), (stat_cr, "all"), (routine_cr, "all")])


def test_a_study_no_destination_wants_is_exported_with_nothing_sent(pg_url: str, tmp_path: Path) -> None:
    from preread.schemas.tables import StudyState

    study_id, _ = drafted_study(pg_url, tmp_path / "src")  # a CR
    with session_scope(pg_url) as session:
        assert plan(session, parse_destinations([{"name": "ct-only", "kind": "folder", "modalities": ["CT"]}])) == 0
    with session_scope(pg_url) as session:
        assert session.get(Study, study_id).state == StudyState.EXPORTED
        assert session.scalars(select(Delivery)).all() == []


def test_two_planners_at_once_make_one_row_per_destination(pg_url: str, tmp_path: Path) -> None:
    """A second coordinator (or the export task) planning the same report at once adds nothing and does not fail."""
    import threading

    drafted_study(pg_url, tmp_path / "src")
    destinations = parse_destinations([{"name": "a", "kind": "folder"}, {"name": "b", "kind": "folder"}])
    results: list[int] = []
    with session_scope(pg_url) as first:
        assert plan(first, destinations) == 2  # inserted, not committed yet: the second planner waits on the index

        def second() -> None:
            with session_scope(pg_url) as session:
                results.append(plan(session, destinations))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "the second planner is blocked behind the first's uncommitted rows"
    thread.join(30)
    assert results == [0]
    with session_scope(pg_url) as session:
        assert sorted(session.scalars(select(Delivery.destination))) == ["a", "b"]
