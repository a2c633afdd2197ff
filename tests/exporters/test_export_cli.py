"""``preread export``: sends current reports again, to one destination or all, and names a wrong destination."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from sqlalchemy import select, update

from preread.schemas.database import session_scope
from preread.schemas.tables import Delivery, DeliveryState, utcnow
from tests.support.drafted import Recorder, drafted_study
from tests.support.procs import base_env, preread_argv


def _export(*args: str, **settings: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(preread_argv("export", *args), env=base_env(**settings), capture_output=True, text=True,
                          timeout=300)


def test_export_sends_again_and_names_a_wrong_destination(pg_url: str, tmp_path: Path) -> None:
    _, first = drafted_study(pg_url, tmp_path / "src", n=0)
    _, second = drafted_study(pg_url, tmp_path / "src", n=1)
    with Recorder() as ehr:
        destinations = json.dumps([{"name": "ehr", "kind": "fhir", "url": ehr.url},
                                   {"name": "files", "kind": "folder", "path": str(tmp_path / "out"), "sends": ["sr"]}])
        settings = dict(database_url=pg_url, data_dir=tmp_path / "data", destinations=destinations)
        result = _export(**settings)
        assert result.returncode == 0, result.stderr
        assert len(ehr.received) == 2 and sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
            [f"{first}.sr.dcm", f"{second}.sr.dcm"])
        # A files delivery due now stays for the coordinator when another destination is named.
        (tmp_path / "out" / f"{second}.sr.dcm").unlink()
        with session_scope(pg_url) as session:
            session.execute(update(Delivery).where(Delivery.destination == "files")
                            .values(state=DeliveryState.PENDING, next_attempt_at=utcnow()))
        again = _export(first, "--destination", "ehr", **settings)
        assert again.returncode == 0, again.stderr
        assert len(ehr.received) == 3, "only the named study, only to the named destination"
        assert first in json.loads(ehr.received[-1][2])["entry"][-2]["resource"]["imagingStudy"][0]["identifier"]["value"]
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{first}.sr.dcm"], \
            "--destination ehr sent nothing to the files destination"
        files_again = _export("--destination", "files", **settings)
        assert files_again.returncode == 0, files_again.stderr
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([f"{first}.sr.dcm", f"{second}.sr.dcm"])
        assert len(ehr.received) == 3
        wrong = _export("--destination", "pacs", **settings)
    assert wrong.returncode == 2
    assert "no destination named 'pacs'" in wrong.stderr and "ehr, files" in wrong.stderr and "Traceback" not in wrong.stderr
    with session_scope(pg_url) as session:
        rows = session.execute(select(Delivery.destination, Delivery.state)).all()
        assert sorted(rows) == [("ehr", DeliveryState.DELIVERED)] * 2 + [("files", DeliveryState.DELIVERED)] * 2
