"""The dashboard in Debian's Chromium (Playwright): sign in, worklist by urgency, images beside the draft,
reject with an edit, and the quality page changing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sqlalchemy import select

from preread.schemas.database import session_scope
from preread.schemas.tables import Delivery, DeliveryState, Report, Study
from tests.api.conftest import Stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RANK = {"stat": 2, "priority": 1, "routine": 0}

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture
def page(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator:  # type: ignore[type-arg]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1920, "height": 1080})
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield page
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        context.close()
        browser.close()


def _shot(page, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=False)


def _fits_a_laptop(page, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    """At 1366x768 the page needs no sideways scrolling; then back to the reading-room screen."""
    page.set_viewport_size({"width": 1366, "height": 768})
    page.wait_for_timeout(200)
    _shot(page, tmp_path, f"{name}-laptop")
    width = page.evaluate("document.documentElement.scrollWidth")
    page.set_viewport_size({"width": 1920, "height": 1080})
    assert width <= 1366, f"{name} page is {width}px wide on a 1366px laptop screen"


def test_read_and_answer_a_draft(stack: Stack, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with stack.client("write") as api:
        expected = [i["study_instance_uid"] for i in api.get("/api/v1/worklist").json()["items"]]
        rejects_before = {v["verdict"]: v["count"] for v in api.get("/api/v1/quality").json()["verdicts"]}["reject"]

    # Not signed in: every page leads to the login form; a wrong token is refused.
    page.goto(stack.url + "/")
    assert page.url.endswith("/login")
    page.fill("#token", "prt_0000000000000000_" + "n" * 43)
    page.click("button[type=submit]")
    assert page.locator(".error").is_visible()
    page.fill("#token", stack.tokens["write"])
    page.click("button[type=submit]")
    page.wait_for_url(stack.url + "/")

    rows = page.locator("#worklist tbody tr")
    rows.first.wait_for()
    _shot(page, tmp_path, "worklist")
    shown = [rows.nth(i).get_attribute("data-uid") for i in range(rows.count())]
    assert shown == expected, "the table shows the API's order"
    urgencies = page.locator("#worklist tbody tr td:first-child .badge").all_inner_texts()
    ranks = [RANK[u.strip().lower()] for u in urgencies]
    assert ranks == sorted(ranks, reverse=True), "most urgent first"
    assert page.locator("#worklist tbody tr .bar").count() > 0, "probe scores as bars"
    _fits_a_laptop(page, tmp_path, "worklist")

    # A cookie session cannot be used cross-site: a POST without the page's CSRF value is refused.
    uid = stack.studies["stat"]
    forged = page.request.post(f"{stack.url}/api/v1/studies/{uid}/feedback", data={"verdict": "accept"})
    assert forged.status == 403

    # The PACS refused the SR: the reader sees it beside the draft (the delivery rows are the exporters').
    with session_scope(stack.db_url) as session:
        report = session.execute(select(Report.id, Report.study_id).join(Study, Study.id == Report.study_id)
                                 .where(Study.study_instance_uid == uid, Report.current.is_(True))).one()
        session.add(Delivery(report_id=report.id, study_id=report.study_id, destination="pacs", kind="dicom",
                             state=DeliveryState.FAILED, attempts=3, last_error="the PACS refused the association"))

    page.locator(f'#worklist tbody tr[data-uid="{uid}"]').click()
    page.wait_for_url(f"{stack.url}/studies/{uid}")
    page.locator("#thumbs img").first.wait_for()
    with stack.client("read") as api:
        study = api.get(f"/api/v1/studies/{uid}").json()
    thumbs = page.locator("#thumbs img")
    assert thumbs.count() == len(study["images"]) >= 1
    page.wait_for_function("[...document.querySelectorAll('#thumbs img, #main-image')].every(i => i.complete)")
    widths = page.eval_on_selector_all("#thumbs img, #main-image", "imgs => imgs.map(i => i.naturalWidth)")
    assert widths and all(w > 0 for w in widths), f"every image loads: {widths}"
    assert page.locator("#probes .probe").count() == len(study["probes"])
    assert page.locator("#impression").inner_text().strip() == (study["report"]["impression"] or "—")
    sent = page.locator('#deliveries li[data-destination="pacs"]')
    assert sent.locator(".delivery-state").inner_text() == "failed"
    assert "the PACS refused the association" in sent.inner_text() and "3 attempts" in sent.inner_text()
    _shot(page, tmp_path, "study")
    _fits_a_laptop(page, tmp_path, "study")

    # Reject with an edit and a probe label.
    page.click("button[data-verdict=reject]")
    page.fill("#feedback-text", "Findings: no acute abnormality.\nImpression: normal chest.")
    probe = study["probes"][0]["condition"]
    page.select_option(f'#labels select[name="{probe}"]', "false")
    page.click("#send")
    page.locator("#message").filter(has_text="Saved: reject").wait_for()
    with stack.client("read") as api:
        answered = api.get(f"/api/v1/studies/{uid}").json()
    assert answered["feedback"][0]["verdict"] == "reject"
    assert answered["feedback"][0]["text"].startswith("Findings: no acute abnormality.")
    assert answered["feedback"][0]["labels"] == {probe: False}
    assert answered["report"] == study["report"], "the draft itself is unchanged"

    page.click("nav >> text=Quality")
    page.wait_for_url(f"{stack.url}/quality")
    page.locator('#verdict-table tr[data-verdict="reject"] .count').wait_for()
    assert int(page.locator('#verdict-table tr[data-verdict="reject"] .count').inner_text()) == rejects_before + 1
    assert page.locator(f'#probe-table tr[data-probe="{probe}"]').count() == 1
    assert page.locator("#chart svg rect").count() > 0
    _shot(page, tmp_path, "quality")


def test_docs_render_without_internet(stack: Stack, page) -> None:  # type: ignore[no-untyped-def]
    """Swagger UI renders the API's operations with every request to another origin blocked (a hospital network)."""
    outside: list[str] = []

    def only_here(route) -> None:  # type: ignore[no-untyped-def]
        if route.request.url.startswith(stack.url + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    page.set_extra_http_headers({"Authorization": f"Bearer {stack.tokens['read']}"})
    page.goto(stack.url + "/docs")
    page.locator(".swagger-ui .info .title").wait_for()
    assert "infimed-preread" in page.locator(".swagger-ui .info .title").inner_text()
    page.locator(".opblock").first.wait_for()
    assert page.locator(".opblock").count() >= 8, "the API's operations are listed"
    assert outside == [], f"/docs asked other origins for {outside}"
