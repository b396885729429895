"""The operator's page in a real browser: Debian's Chromium driven by Playwright, against the real
`refiner-source serve` (two gunicorn workers and the delivery worker) and a stand-in for Segment.

Log in, see the counts of what was posted, search a response, see a dead letter, replay it with
the page's button and see it delivered. A screenshot is kept under the test's tmp_path and, when
REFINER_TEST_ARTIFACTS is set, copied there for CI to collect.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

from refiner_source.to_segment.mapping import message_id
from tests.conftest import SECRET, survey_body
from tests.test_operator import PASSWORD, start_service

CHROMIUM = "/usr/bin/chromium"
DEAD = "rdead"  # the response whose track call Segment rejects
REJECTION = "Segment says: this message is rejected by the test"


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def keep_artifact(path: Path) -> None:
    assert path.stat().st_size > 1000, f"{path} is not a screenshot"
    where = os.environ.get("REFINER_TEST_ARTIFACTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(where) / path.name)


def post(service, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(
        f"{service.url}/webhooks/refiner?token={SECRET}", data=data, headers={"Content-Type": "application/json"}, timeout=10
    )


def figure(page, name: str) -> str:
    return page.locator(f'[data-figure="{name}"]').inner_text().strip()


def reload_until(page, wanted: dict[str, str], timeout: float = 20.0) -> None:
    """Reload the page until its figures read `wanted` (counts reach the store once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {name: figure(page, name) for name in wanted}
        if seen == wanted:
            return
        assert time.monotonic() < deadline, f"the page shows {seen}, expected {wanted}"
        time.sleep(0.25)
        page.reload()


def search(page, query: str) -> list[str]:
    """Search the page's form for `query`: the state of each event found."""
    page.fill("input[name=q]", query)
    with page.expect_navigation():
        page.click("form[method=get] button[type=submit]")
    assert page.locator("#search h2").inner_text() == f"Events named {query}"
    return [s.strip() for s in page.locator("tr.event .state").all_inner_texts()]


def test_browser_log_in_see_counts_search_replay_a_dead_letter_and_see_it_delivered(tmp_path, store_url, segment, browser):
    dead_track = message_id(DEAD, "Completed Survey", "track")
    segment.reject[dead_track] = (400, {"code": "invalid", "message": REJECTION})
    service = start_service(tmp_path, store_url, segment)
    try:
        for i in range(6):
            assert post(service, survey_body(i)).status_code == 202
        assert post(service, survey_body(0)).json()["status"] == "duplicate"
        assert post(service, survey_body(50, event="Created Contact")).json()["status"] == "ignored"
        assert post(service, '{"triggered_event": "Completed Survey"}').status_code == 422
        dead_body = survey_body(0)
        dead_body["response"]["uuid"] = DEAD
        assert post(service, dead_body).status_code == 202

        status_url = f"{service.url}/status"
        # Without the password the browser is challenged and, having nothing to answer, gives up;
        # with a wrong one it is refused.
        refused = browser.new_context()
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            refused.new_page().goto(status_url)
        refused.close()
        refused = browser.new_context(http_credentials={"username": "admin", "password": "not-the-password-0123456789"})
        answer = refused.new_page().goto(status_url)
        assert answer.status == 401 and answer.headers["www-authenticate"].startswith("Basic")
        refused.close()

        context = browser.new_context(http_credentials={"username": "admin", "password": PASSWORD}, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        assert page.goto(status_url).status == 200
        assert page.title() == "refiner-source status"

        # The counts of what was posted: 10 webhooks, 7 stored, 6 delivered, 1 dead.
        wanted = {"segment-hour-received": "10", "segment-hour-delivered": "6", "segment-hour-dead": "1", "segment-dead": "1"}
        reload_until(page, wanted | {"segment-pending": "0"})
        expected = {"received": "10", "accepted": "7", "duplicate": "1", "ignored": "1", "rejected": "1", "unavailable": "0"}
        expected |= {"delivered": "6", "dead": "1", "retry": "0"}
        for name, count in expected.items():
            assert figure(page, f"segment-hour-{name}") == count, name
            assert figure(page, f"segment-day-{name}") == count, name
        assert page.locator("#segment svg polyline").count() == 2
        # Segment to Refiner is off in this service (its variables are unset): said so, with what turns it on, and no figures.
        assert page.locator('[data-off="refiner"]').inner_text() == "off"
        assert "SEGMENT_SHARED_SECRET and REFINER_API_KEY turn it on." in page.locator("#refiner").inner_text()
        assert page.locator("#refiner [data-figure]").count() == 0 and page.locator("#refiner svg").count() == 0

        # The dead letter, its error, and the button to replay it (only where something died).
        letters = page.locator("#segment table.dead-letters")
        assert DEAD in letters.inner_text() and dead_track in letters.inner_text() and "HTTP 400 invalid" in letters.inner_text()
        assert REJECTION not in page.content()  # Segment's answer may quote the data: only on the opened event
        assert "HTTP 400 invalid" in page.locator("#segment .last-error").inner_text()
        assert page.locator("#replay-segment").is_visible() and page.locator("#replay-refiner").count() == 0
        page.screenshot(path=tmp_path / "status-dead-letter.png", full_page=True)
        keep_artifact(tmp_path / "status-dead-letter.png")

        # A search by response id shows that event and its state; no answer until it is opened.
        assert search(page, "r3") == ["delivered"]
        assert search(page, DEAD) == ["dead"]
        assert "HTTP 400 invalid" in page.locator("tr.event").inner_text()
        assert "ada@initech.example" not in page.content() and "Product Manager" not in page.content()

        # Segment takes it now; one click replays it.
        with segment.lock:
            segment.reject.clear()
        page.goto(status_url)
        with page.expect_navigation():
            page.click("#replay-segment")
        assert urlsplit(page.url).path == "/status" and "replayed=1" in page.url
        assert page.locator("#replayed").inner_text() == "1 dead letter(s) queued again."
        reload_until(page, {"segment-dead": "0", "segment-pending": "0", "segment-hour-delivered": "7"})
        assert page.locator("#replay-segment").count() == 0
        assert search(page, DEAD) == ["delivered"]
        assert dead_track in {m["messageId"] for m in segment.received()}

        page.goto(status_url)
        page.screenshot(path=tmp_path / "status.png", full_page=True)
        keep_artifact(tmp_path / "status.png")

        # Everything the page loaded came from the service itself: no script or style from elsewhere.
        assert {"/status", "/status/replay"} <= {urlsplit(url).path for url in requested}, requested  # it was listening
        elsewhere = [url for url in requested if urlsplit(url).hostname != "127.0.0.1" or urlsplit(url).port != service.port]
        assert elsewhere == [], elsewhere
        context.close()
    finally:
        service.stop()
