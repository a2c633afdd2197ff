"""The reading-queue API against a real uvicorn process and Postgres filled by ``preread draft``."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select, update

from preread.api import models
from preread.schemas.findings import Urgency
from preread.schemas.tables import AuditEvent, Delivery, Feedback, Heartbeat, Outbox, ProbeScore, Report, Study, utcnow
from tests.api.conftest import PHI, Stack
from tests.support.procs import Proc, base_env, free_port, preread_argv, wait_until

RANK = {u.value: u.rank for u in Urgency}


def _db(stack: Stack):  # type: ignore[no-untyped-def]
    return create_engine(stack.db_url)


def _expected_order(stack: Stack) -> list[str]:
    """The worklist order computed independently from the database: urgency, highest current probe, arrival."""
    engine = _db(stack)
    with engine.connect() as conn:
        top = (
            select(ProbeScore.study_id, func.max(ProbeScore.score).label("top"))
            .where(ProbeScore.current.is_(True))
            .group_by(ProbeScore.study_id)
            .subquery()
        )
        rows = conn.execute(
            select(Study.study_instance_uid, Study.priority, func.coalesce(top.c.top, 0.0), Study.first_received_at, Study.id)
            .outerjoin(top, top.c.study_id == Study.id)
        ).all()
    engine.dispose()
    return [r[0] for r in sorted(rows, key=lambda r: (-r[1], -r[2], r[3], r[4]))]


def _same_as_model(response: httpx.Response) -> None:
    """The worklist's JSON, written without building models, is byte for byte what WorklistPage gives."""
    assert models.WorklistPage.model_validate_json(response.content).model_dump_json().encode() == response.content


def _worklist(client: httpx.Client, **params: object) -> list[dict]:
    response = client.get("/api/v1/worklist", params={k: v for k, v in params.items() if v is not None})
    assert response.status_code == 200, response.text
    _same_as_model(response)
    return response.json()["items"]


def test_worklist_order_and_pages(stack: Stack) -> None:
    with stack.client("read") as client:
        items = _worklist(client)
        uids = [i["study_instance_uid"] for i in items]
        assert set(uids) == set(stack.studies.values())
        assert uids == _expected_order(stack)
        stat = items[uids.index(stack.studies["stat"])]
        assert stat["urgency"] == "stat" and stat["patient_name"] == PHI[0], "the order's STAT priority holds"
        assert all(i["urgency"] == "stat" for i in items[: uids.index(stack.studies["stat"])])
        if stat["report_urgency"] != "stat":
            assert stat["urgency_reason"], "a study whose draft says otherwise explains why"
        ranks = [(RANK[i["urgency"]], i["top_probe"]["score"] if i["top_probe"] else 0.0) for i in items]
        assert ranks == sorted(ranks, key=lambda r: (-r[0], -r[1]))
        # One row per page, following the cursor, gives the same order.
        paged, cursor = [], None
        for _ in range(10):
            response = client.get("/api/v1/worklist", params={"limit": 1, **({"cursor": cursor} if cursor else {})})
            body = response.json()
            paged += [i["study_instance_uid"] for i in body["items"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert paged == uids
        assert client.get("/api/v1/worklist", params={"cursor": "garbage!"}).status_code == 422


def test_worklist_filters(stack: Stack) -> None:
    engine = _db(stack)
    with engine.begin() as conn:
        # A hand-made difference the since filter must see: the MR arrived long ago.
        conn.execute(update(Study).where(Study.study_instance_uid == stack.studies["mr"])
                     .values(first_received_at=datetime(2020, 1, 1, tzinfo=timezone.utc)))
        scores = conn.execute(
            select(Study.study_instance_uid, ProbeScore.condition, ProbeScore.score)
            .join(ProbeScore, ProbeScore.study_id == Study.id).where(ProbeScore.current.is_(True))
        ).all()
    engine.dispose()
    with stack.client("read") as client:
        assert [i["study_instance_uid"] for i in _worklist(client, modality="CT")] == [stack.studies["ct"]]
        assert {i["study_instance_uid"] for i in _worklist(client, modality="CR")} == {stack.studies["stat"], stack.studies["routine"]}
        recent = {i["study_instance_uid"] for i in _worklist(client, since=(utcnow() - timedelta(days=1)).isoformat())}
        assert stack.studies["mr"] not in recent and stack.studies["ct"] in recent
        stat_only = _worklist(client, urgency="stat")
        assert stack.studies["stat"] in {i["study_instance_uid"] for i in stat_only}
        assert all(i["urgency"] == "stat" for i in stat_only)
        assert all(i["state"] == "DRAFTED" for i in _worklist(client, state="DRAFTED"))
        assert _worklist(client, state="FAILED") == []
        # Probe filter: a threshold between two studies' scores of the same probe splits them.
        per_condition: dict[str, list[float]] = {}
        for _, c, score in scores:
            per_condition.setdefault(c, []).append(score)
        condition = max(per_condition, key=lambda c: len(set(per_condition[c])))
        values = sorted(set(per_condition[condition]))
        assert len(values) >= 2, "two studies share a probe with different scores"
        cut = values[-1]
        expected = {uid for uid, c, score in scores if c == condition and score >= cut}
        got = {i["study_instance_uid"] for i in _worklist(client, probe=condition, min_score=cut)}
        assert got == expected and got
        assert len(got) < len(per_condition[condition]), "the cut leaves some studies out"
        assert client.get("/api/v1/worklist", params={"urgency": "urgentest"}).status_code == 422
        assert client.get("/api/v1/worklist", params={"min_score": 0.5}).status_code == 422


def test_auth_and_roles(stack: Stack) -> None:
    uid = stack.studies["routine"]
    assert httpx.get(f"{stack.url}/healthz").status_code == 200
    for path in ("/api/v1/worklist", f"/api/v1/studies/{uid}", "/api/v1/quality", "/metrics", "/readyz", "/docs", "/openapi.json"):
        response = httpx.get(stack.url + path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
    bad = httpx.get(f"{stack.url}/api/v1/worklist", headers={"Authorization": "Bearer prt_0123456789abcdef_" + "x" * 43})
    assert bad.status_code == 401
    with stack.client("read") as reader:
        assert reader.post(f"/api/v1/studies/{uid}/feedback", json={"verdict": "accept"}).status_code == 403
        assert reader.post(f"/api/v1/studies/{uid}/reprocess").status_code == 403
    with stack.client("read") as reader:
        schema = reader.get("/openapi.json").json()
        assert "/api/v1/worklist" in schema["paths"] and "/api/v1/studies/{study_uid}/feedback" in schema["paths"]
        assert reader.get("/docs").status_code == 200
    with stack.client("worker") as worker:
        assert worker.get("/api/v1/worklist").status_code == 403, "a worker token sees no patient data"
        assert worker.get("/metrics").status_code == 200
    # A revoked token stops working at once.
    created = stack.run("token", "create", "temp-user", "--role", "read")
    token = created.stdout.strip()
    assert httpx.get(f"{stack.url}/api/v1/worklist", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert stack.run("token", "revoke", "temp-user").returncode == 0
    assert httpx.get(f"{stack.url}/api/v1/worklist", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    listed = stack.run("token", "list")
    assert "temp-user" in listed.stdout and token not in listed.stdout
    dup = stack.run("token", "create", "read-user")
    assert dup.returncode == 2 and "exists" in dup.stderr


def _audit_actions(stack: Stack, token_name: str) -> list[str]:
    engine = _db(stack)
    with engine.connect() as conn:
        actions = conn.execute(select(AuditEvent.action).where(AuditEvent.token_name == token_name)
                               .order_by(AuditEvent.id)).scalars().all()
    engine.dispose()
    return list(actions)


def test_every_view_is_audited_and_a_revoked_token_sees_nothing(stack: Stack) -> None:
    """Views served with a recently verified (cached) token still write their audit row each time, and
    revoking the token refuses its very next request with 401, on every view, even where the answer would be 404."""
    uid = stack.studies["stat"]
    token = stack.run("token", "create", "shift-reader", "--role", "read").stdout.strip()
    views = [
        ("GET", "/api/v1/worklist", None, "view_worklist"),
        ("GET", f"/api/v1/studies/{uid}", None, "view_study"),
        ("GET", f"/api/v1/studies/{uid}/images/0", None, "view_image"),
        ("POST", "/api/v1/search", {"accession_number": "ACC-STAT"}, "search"),
    ]
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        for _ in range(3):  # the first request looks the token up, the next ones find it verified
            for method, path, body, _action in views:
                assert client.request(method, path, json=body).status_code == 200, path
        assert _audit_actions(stack, "shift-reader") == [action for _ in range(3) for *_, action in views]
        assert stack.run("token", "revoke", "shift-reader").returncode == 0
        # First an unknown study (it would be 404) while the token is still remembered as verified.
        for method, path, body, _action in [("GET", "/api/v1/studies/1.2.3.4.5.6", None, ""),
                                            ("GET", "/api/v1/studies/1.2.abc", None, ""), *views]:
            refused = client.request(method, path, json=body)
            assert refused.status_code == 401, (path, refused.status_code)
            assert refused.headers["www-authenticate"] == "Bearer" and "items" not in refused.text
    assert len(_audit_actions(stack, "shift-reader")) == 3 * len(views), "nothing is recorded as seen after revocation"


def test_docs_load_only_their_own_assets(stack: Stack) -> None:
    """/docs (Swagger UI) names no other origin and its script, style sheet and icon are served here (offline sites)."""
    from html.parser import HTMLParser

    class Assets(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.urls: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.urls += [v for k, v in attrs if k in ("src", "href") and v]

    with stack.client("read") as client:
        docs = client.get("/docs")
        assert docs.status_code == 200
        assert "http://" not in docs.text and "https://" not in docs.text and "//cdn" not in docs.text
        parser = Assets()
        parser.feed(docs.text)
        assert len(parser.urls) == 3, parser.urls  # script, style sheet, icon
        kinds = set()
        for url in parser.urls:
            assert url.startswith("/") and not url.startswith("//"), url
            asset = httpx.get(stack.url + url)  # no token needed: Swagger UI's own files, no data
            assert asset.status_code == 200 and len(asset.content) > 500, url
            kinds.add(asset.headers["content-type"].split(";")[0])
        assert {"text/javascript", "text/css", "image/png"} <= kinds
        assert "SwaggerUIBundle" in client.get("/docs-assets/swagger-ui-bundle.js").text
    assert httpx.get(stack.url + "/docs").status_code == 401, "the page itself still needs a token"


def test_study_view_bad_uids_and_images(stack: Stack) -> None:
    uid = stack.studies["stat"]
    with stack.client("read") as client:
        study = client.get(f"/api/v1/studies/{uid}").json()
        assert study["patient_name"] == PHI[0] and study["patient_id"] == PHI[1]
        assert study["issuer_of_patient_id"] == "HOSP-A" and study["patient_birth_date"] == "1961-02-03"
        assert study["series_count"] == 1 and study["instance_count"] == 2 and study["modality"] == "CR"
        assert study["report"]["model_id"] and study["report"]["prompt_version"]
        assert study["probes"] and all(0.0 <= p["score"] <= 1.0 for p in study["probes"])
        assert len(study["images"]) == 2
        for image in study["images"]:
            png = client.get(image["url"])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.get(f"/api/v1/studies/{uid}/images/7").status_code == 404
        malformed = client.get("/api/v1/studies/1.2.abc")
        assert malformed.status_code == 422 and "not a DICOM UID" in malformed.json()["detail"]
        unknown = client.get("/api/v1/studies/1.2.3.4.5.6")
        assert unknown.status_code == 404 and "no study" in unknown.json()["detail"]
        searched = client.post("/api/v1/search", json={"patient_id": PHI[1]})
        _same_as_model(searched)
        found = searched.json()["items"]
        assert [i["study_instance_uid"] for i in found] == [uid]
        assert client.post("/api/v1/search", json={"accession_number": "ACC-ROUT"}).json()["items"][0]["study_instance_uid"] == stack.studies["routine"]
        assert client.post("/api/v1/search", json={}).status_code == 422
        huge = client.post("/api/v1/search", content=b"{" + b" " * 200_000 + b"}", headers={"content-type": "application/json"})
        assert huge.status_code == 413
    engine = _db(stack)
    with engine.connect() as conn:
        actions = conn.execute(select(AuditEvent.action).where(AuditEvent.study_instance_uid == uid)).scalars().all()
    engine.dispose()
    assert "view_study" in actions and actions.count("view_image") >= 2
    printed = stack.run("audit", "--since", "1h")
    assert printed.returncode == 0 and uid in printed.stdout and "read-user" in printed.stdout


def test_feedback_changes_quality(stack: Stack) -> None:
    """Hand-made labels against the stored scores: the figures /quality reports follow by hand."""
    with stack.client("write") as client:
        before = client.get("/api/v1/quality").json()
        chosen = {}
        for key in ("stat", "routine"):
            study = client.get(f"/api/v1/studies/{stack.studies[key]}").json()
            chosen[key] = {p["condition"]: p for p in study["probes"]}
        probe = sorted(set(chosen["stat"]) & set(chosen["routine"]))[0]
        s_stat, s_rout = chosen["stat"][probe]["score"], chosen["routine"][probe]["score"]
        threshold = chosen["stat"][probe]["threshold"]
        # The study with the higher score is labelled positive: AUROC 1 (0.5 on a tie).
        hi, lo = ("stat", "routine") if s_stat >= s_rout else ("routine", "stat")
        draft_before = client.get(f"/api/v1/studies/{stack.studies[hi]}").json()["report"]
        r1 = client.post(f"/api/v1/studies/{stack.studies[hi]}/feedback", json={"verdict": "edit", "text": "Edited text.", "labels": {probe: True}})
        assert r1.status_code == 201, r1.text
        # A first answer, then a change of mind: only the latest per study counts.
        client.post(f"/api/v1/studies/{stack.studies[lo]}/feedback", json={"verdict": "accept", "labels": {probe: True}})
        r2 = client.post(f"/api/v1/studies/{stack.studies[lo]}/feedback", json={"verdict": "reject", "labels": {probe: False}})
        assert r2.status_code == 201 and r2.json()["token_name"] == "write-user"
        quality = client.get("/api/v1/quality").json()
        assert quality["answered_studies"] == before["answered_studies"] + 2
        row = next(p for p in quality["probes"] if p["probe"] == probe)
        hi_score = max(s_stat, s_rout)
        lo_score = min(s_stat, s_rout)
        assert row["labelled"] == 2 and row["positives"] == 1 and row["negatives"] == 1
        assert row["sensitivity"] == (1.0 if hi_score >= threshold else 0.0)
        assert row["specificity"] == (1.0 if lo_score < threshold else 0.0)
        assert row["auroc"] == (1.0 if hi_score > lo_score else 0.5)
        verdicts = {v["verdict"]: v["count"] for v in quality["verdicts"]}
        assert verdicts["edit"] >= 1 and verdicts["reject"] >= 1
        assert sum(v["answered"] for v in quality["versions"]) == quality["answered_studies"]
        after = client.get(f"/api/v1/studies/{stack.studies[hi]}").json()
        assert after["report"] == draft_before, "feedback never overwrites the draft"
        assert after["feedback"][0]["text"] == "Edited text."
        bad = client.post(f"/api/v1/studies/{stack.studies[hi]}/feedback", json={"verdict": "maybe"})
        assert bad.status_code == 422
        latest = {i["study_instance_uid"]: i["feedback"] for i in _worklist(client)}
        assert latest[stack.studies[hi]] == "edit" and latest[stack.studies[lo]] == "reject", "the worklist shows the latest verdict"


def _metric(text: str, name: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def test_metrics_parse_and_move(stack: Stack) -> None:
    with stack.client("worker") as client:
        before = client.get("/metrics").text
        families = {f.name for f in text_string_to_metric_families(before)}
        assert {"preread_studies_received", "preread_studies_drafted", "preread_stage_duration_seconds",
                "preread_model_info", "preread_probe_positives", "preread_queue_depth"} <= families
        assert _metric(before, "preread_studies_drafted_total") >= 4
        assert _metric(before, "preread_stage_duration_seconds_count") > 0
        # One more study drafted: the counters move.
        from tests.api.conftest import chest_study

        folder = stack.workdir / "in-more"
        chest_study(folder, name="Other^Person", patient_id="PID-OTHER-9", accession="ACC-MORE", priority=None)
        drafted = stack.run("draft", str(folder))
        assert drafted.returncode == 0, drafted.stderr
        after = client.get("/metrics").text
        assert _metric(after, "preread_studies_drafted_total") == _metric(before, "preread_studies_drafted_total") + 1
        assert _metric(after, "preread_studies_received_total") == _metric(before, "preread_studies_received_total") + 1
        assert 'modality="CR"' in after
    stack.studies["extra"] = ""  # the worklist now has five studies; later tests look studies up by key


def test_study_view_lists_deliveries_and_metrics_count_the_failing(stack: Stack) -> None:
    uid = stack.studies["stat"]
    engine = _db(stack)
    with engine.begin() as conn:
        study_id, report_id = conn.execute(
            select(Report.study_id, Report.id).join(Study, Study.id == Report.study_id)
            .where(Study.study_instance_uid == uid, Report.current.is_(True))).one()
        conn.execute(Delivery.__table__.insert(), [
            dict(report_id=report_id, study_id=study_id, destination="pacs", kind="dicom", state="pending", attempts=3,
                 last_error="association rejected by 'PACS'", sent_at=None, next_attempt_at=utcnow(), created_at=utcnow(), updated_at=utcnow()),
            dict(report_id=report_id, study_id=study_id, destination="ehr", kind="fhir", state="delivered", attempts=1,
                 last_error=None, sent_at=utcnow(), next_attempt_at=utcnow(), created_at=utcnow(), updated_at=utcnow()),
        ])
    try:
        with stack.client("read") as client:
            shown = client.get(f"/api/v1/studies/{uid}").json()["deliveries"]
        assert [(d["destination"], d["kind"], d["state"], d["attempts"], d["last_error"]) for d in shown] == [
            ("ehr", "fhir", "delivered", 1, None), ("pacs", "dicom", "pending", 3, "association rejected by 'PACS'")]
        with stack.client("worker") as client:
            metrics = client.get("/metrics").text
        assert 'preread_export_failures{destination="pacs"} 1.0' in metrics
        assert 'destination="ehr"' not in metrics, "a delivered row is no failure"
    finally:
        with engine.begin() as conn:
            conn.execute(Delivery.__table__.delete().where(Delivery.study_id == study_id))
        engine.dispose()


def _heartbeats(stack: Stack, roles: list[tuple[str, str]]) -> None:
    engine = _db(stack)
    with engine.begin() as conn:
        conn.execute(Heartbeat.__table__.delete())
        for i, (role, queues) in enumerate(roles):
            conn.execute(Heartbeat.__table__.insert().values(
                role=role, host="test-host", pid=1000 + i, queues=queues, state="ready", started_at=utcnow(), last_seen=utcnow()))
    engine.dispose()


def test_readyz_follows_broker_and_heartbeats(stack: Stack) -> None:
    with stack.client("worker") as client:
        _heartbeats(stack, [("listener", ""), ("coordinator", "")])
        red = client.get("/readyz")
        assert red.status_code == 503
        failed = {c["name"]: c["detail"] for c in red.json()["checks"] if not c["ok"]}
        assert set(failed) == {"worker:render", "worker:infer"} and "render" in failed["worker:render"]
        _heartbeats(stack, [("listener", ""), ("coordinator", ""), ("worker", "render"), ("worker", "infer,export")])
        assert client.get("/readyz").status_code == 200
        stack.redis.kill()
        red = client.get("/readyz")
        assert red.status_code == 503
        failed = {c["name"]: c["detail"] for c in red.json()["checks"] if not c["ok"]}
        assert set(failed) == {"broker"} and "PREREAD_BROKER_URL" in failed["broker"]
        stack.redis.start()
        _heartbeats(stack, [("listener", ""), ("coordinator", ""), ("worker", "render"), ("worker", "infer,export")])
        assert client.get("/readyz").status_code == 200


def test_reprocess_queues_once_and_keeps_history(stack: Stack) -> None:
    uid = stack.studies["routine"]
    engine = _db(stack)
    with stack.client("write") as client:
        before = client.get(f"/api/v1/studies/{uid}").json()
        first = client.post(f"/api/v1/studies/{uid}/reprocess")
        assert first.status_code == 202 and first.json()["queued"] is True
        second = client.post(f"/api/v1/studies/{uid}/reprocess")
        assert second.status_code == 202 and second.json()["queued"] is False
        with engine.connect() as conn:
            study_id = conn.execute(select(Study.id).where(Study.study_instance_uid == uid)).scalar_one()
            queued = conn.execute(select(func.count()).select_from(Outbox).where(Outbox.study_id == study_id, Outbox.topic == "render")).scalar_one()
        assert queued == 1, "a second request while one is pending does not queue twice"
        # The real pipeline takes it from the outbox: coordinator, render and infer workers on the private Redis.
        stack.start("coordinator", "coordinate")
        stack.start("worker", "worker", "--queues", "render,infer", "--concurrency", "1")

        def redrafted() -> bool:
            with engine.connect() as conn:
                return conn.execute(select(func.count()).select_from(Report).where(Report.study_id == study_id)).scalar_one() == 2 and \
                    conn.execute(select(Study.state).where(Study.id == study_id)).scalar_one() == "DRAFTED"

        wait_until(redrafted, 600, interval=1.0, what="the reprocessed study to be drafted again")
        after = client.get(f"/api/v1/studies/{uid}").json()
        assert len(after["history"]) == 2
        assert [h["current"] for h in after["history"]] == [True, False]
        assert after["history"][1]["id"] == before["report"]["id"], "the earlier report is kept"
        assert after["report"]["id"] != before["report"]["id"]
        assert [f["id"] for f in after["feedback"]] == [f["id"] for f in before["feedback"]], "answers survive a reprocess"
        with engine.connect() as conn:
            fb = conn.execute(select(func.count()).select_from(Feedback).where(Feedback.study_id == study_id)).scalar_one()
            audit = conn.execute(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.study_instance_uid == uid, AuditEvent.action == "reprocess")).scalar_one()
        assert fb == len(before["feedback"]) and audit == 2
    engine.dispose()


def test_open_to_lets_scrapers_in_and_nothing_else(stack: Stack) -> None:
    port = free_port()
    settings = dict(stack.settings, api_port=port, api_open_to="127.0.0.1/32")
    proc = Proc(preread_argv("api"), base_env(**settings), stack.workdir / "api-open.log").start()
    stack.extra.append(proc)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 120, what="the second API")
    assert httpx.get(f"{url}/metrics").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code in (200, 503)
    assert httpx.get(f"{url}/api/v1/worklist").status_code == 401, "open addresses see metrics, not patients"
    proc.stop()


def test_api_start_errors_are_one_line_exit_2(stack: Stack) -> None:
    busy = stack.run("api", "--port", stack.url.rsplit(":", 1)[1])
    assert busy.returncode == 2
    assert "PREREAD_API_PORT" in busy.stderr and "Traceback" not in busy.stderr
    bad = subprocess.run(preread_argv("api"), env=base_env(**dict(stack.settings, api_port=free_port(), api_open_to="not-a-net")),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "PREREAD_API_OPEN_TO" in bad.stderr and "Traceback" not in bad.stderr
