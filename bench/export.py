"""Results-out benchmark: SR build time and sending rate to Orthanc, against storescu.

    OMP_NUM_THREADS=1 .venv/bin/python bench/export.py [--studies 200] [--workdir DIR]

Makes ``--studies`` drafted chest CR studies (a source file on disk, a current report with
two findings and three probe scores) in an embedded SQLite database, then in one run:

* times building each study's SR (TID 1500 Comprehensive 3D SR, highdicom) from its report;
* delivers every report to a fresh Orthanc as a ``dicom`` destination through the product's
  deliverer (plan rows, claim, build, C-STORE, record), timing the whole;
* sends the same SRs, saved as files, to another fresh Orthanc with dcmtk's ``storescu`` over
  one association (the baseline).

Prints one Markdown table with the ratio of the two sending rates and the number of
associations the exporter opened. Goals: SR build <= 50 ms each; exporter >= 0.8x storescu.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preread.schemas.database import session_scope, upgrade  # noqa: E402
from preread.schemas.settings import Settings  # noqa: E402
from preread.schemas.tables import Delivery, DeliveryState, Report  # noqa: E402
from preread.worker.exporters.context import load_context  # noqa: E402
from preread.worker.exporters.deliveries import deliver_due  # noqa: E402
from preread.worker.exporters.dicom import DicomExporter  # noqa: E402
from preread.worker.exporters.sr import build_sr  # noqa: E402
from tests.support.drafted import drafted_study  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=args.workdir) as tmp_name:
        run(Path(tmp_name), args.studies)


def run(tmp: Path, n: int) -> None:
    url = f"sqlite:///{tmp / 'preread.db'}"
    upgrade(url)
    for i in range(n):
        drafted_study(url, tmp / "src", n=i)
    settings = Settings(database_url=url, data_dir=tmp / "data")

    # 1. SR build time per study (contexts loaded first: the build alone is timed).
    with session_scope(url) as session:
        contexts = [load_context(session, settings, rid) for rid in session.scalars(select(Report.id).order_by(Report.id)).all()]
    build_sr(contexts[0], settings)  # warm-up (imports, code dictionaries)
    build_ms, files = [], []
    sr_dir = tmp / "sr"
    sr_dir.mkdir()
    for ctx in contexts:
        started = time.perf_counter()
        ds = build_sr(ctx, settings)
        build_ms.append((time.perf_counter() - started) * 1000)
        path = sr_dir / f"{ctx.report_id}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)

    # 2. The product's deliverer to Orthanc (one destination, everything due at once).
    with Orthanc(tmp / "orthanc-a") as orthanc:
        dest_settings = settings.model_copy(update={"destinations": [
            {"name": "pacs", "kind": "dicom", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port},
        ]})
        before = DicomExporter.total_associations
        started = time.perf_counter()
        deliver_due(dest_settings, wait=True)
        exporter_s = time.perf_counter() - started
        associations = DicomExporter.total_associations - before
        stored = len(orthanc.instances())
    with session_scope(url) as session:
        delivered = session.query(Delivery).filter(Delivery.state == DeliveryState.DELIVERED).count()

    # 3. storescu, the same SR files, one association.
    with Orthanc(tmp / "orthanc-b") as orthanc:
        started = time.perf_counter()
        subprocess.run(["storescu", "--required", "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
                       check=True, capture_output=True)
        storescu_s = time.perf_counter() - started
        baseline_stored = len(orthanc.instances())

    exporter_rate, storescu_rate = n / exporter_s, n / storescu_s
    print(f"\n{n} drafted studies, SR = TID 1500 Comprehensive 3D SR, Orthanc on loopback\n")
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| SR build, median per study | {statistics.median(build_ms):.1f} ms | <= 50 ms |")
    print(f"| SR build, p95 per study | {sorted(build_ms)[int(0.95 * (len(build_ms) - 1))]:.1f} ms | |")
    print(f"| exporter (plan, build, C-STORE, record) | {exporter_rate:.1f} SR/s ({delivered} delivered, {stored} in Orthanc) | |")
    print(f"| storescu, same SR files, one association | {storescu_rate:.1f} SR/s ({baseline_stored} in Orthanc) | |")
    print(f"| exporter / storescu | {exporter_rate / storescu_rate:.2f}x | >= 0.8x |")
    print(f"| associations the exporter opened | {associations} | |")


if __name__ == "__main__":
    main()
