"""The operator's page in a real browser: Debian's Chromium driven by Playwright, against the real
`refiner-source serve` (two gunicorn workers and the delivery worker) and a stand-in for Segment.

Log in, see the counts of what was posted and the chart's time labels, switch the chart to 24
hours, open an event by its response id, delete one dead event and replay another with their own
buttons, replay the rest with "replay all", and see them delivered; on a fresh install, see
"nothing yet", and the page refresh itself keeping the search and the scroll position.
Screenshots are kept under the test's tmp_path (the path is printed) and, when
REFINER_TEST_ARTIFACTS is set, copied there for CI to collect.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

from refiner_source.to_segment.mapping import message_id
from tests.conftest import SECRET, survey_body
from tests.ops.test_operator import PASSWORD, start_service

CHROMIUM = "/usr/bin/chromium"
DEAD = "rdead"  # Segment rejects its identify and track calls: one event, two dead letters; replayed on its own
GONE = "rgone"  # Segment rejects its track call; deleted with its own button
REST = "rrest"  # Segment rejects its track call; replayed with "replay all"
REJECTION = "Segment says: this message is rejected by the test"


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def screenshot(page, path: Path) -> None:
    """A full-page screenshot, kept as a test artifact (never in the checkout)."""
    page.screenshot(path=path, full_page=True)
    assert path.stat().st_size > 1000, f"{path} is not a screenshot"
    print(f"screenshot: {path}")
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


def dead_row_button(page, source_id: str, kind: str):
    """The replay or delete button of a dead event, found by its response id in the dead-letter list."""
    return page.locator(f'#segment tr.dead-letter:has(a:text-is("{source_id}")) button[data-{kind}]')


def response(uuid: str, i: int) -> dict:
    body = survey_body(i)
    body["response"]["uuid"] = uuid
    return body


def test_browser_counts_chart_event_by_key_delete_one_replay_one_replay_all(tmp_path, store_url, segment, browser):
    for uuid, calls in ((DEAD, ("identify", "track")), (GONE, ("track",)), (REST, ("track",))):
        for call in calls:
            segment.reject[message_id(uuid, "Completed Survey", call)] = (400, {"code": "invalid", "message": REJECTION})
    service = start_service(tmp_path, store_url, segment)
    try:
        for i in range(6):
            assert post(service, survey_body(i)).status_code == 202
        assert post(service, survey_body(0)).json()["status"] == "duplicate"
        assert post(service, survey_body(50, event="Created Contact")).json()["status"] == "ignored"
        assert post(service, '{"triggered_event": "Completed Survey"}').status_code == 422
        for i, uuid in enumerate((DEAD, GONE, REST)):
            assert post(service, response(uuid, 20 + i)).status_code == 202

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
        problems: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        assert page.goto(status_url).status == 200
        assert page.title() == "refiner-source status"

        # The counts of what was posted: 12 webhooks, 9 stored, 6 delivered, 3 dead.
        wanted = {"segment-hour-received": "12", "segment-hour-delivered": "6", "segment-hour-dead": "3", "segment-dead": "3"}
        reload_until(page, wanted | {"segment-pending": "0"})
        expected = {"received": "12", "accepted": "9", "duplicate": "1", "ignored": "1", "rejected": "1", "unavailable": "0"}
        expected |= {"delivered": "6", "dead": "3", "retry": "0"}
        for name, count in expected.items():
            assert figure(page, f"segment-hour-{name}") == count, name
            assert figure(page, f"segment-day-{name}") == count, name
        assert re.fullmatch(r"as of \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", page.locator("#as-of").inner_text())
        assert page.locator('[data-health="segment"]').inner_text() == "3 dead events"

        # The last hour's chart, labelled every 10 minutes on the UTC clock.
        assert page.locator("#segment svg polyline").count() == 2
        times = page.locator("#segment svg text.time").all_text_contents()
        assert len(times) == 6 and all(re.fullmatch(r"\d\d:\d0", t) for t in times), times
        assert "per minute, last hour, times in UTC." in page.locator("#segment figcaption").inner_text()
        # Segment to Refiner is off in this service (its variables are unset): said so, with what turns it on, and no figures.
        assert page.locator('[data-off="refiner"]').inner_text() == "off"
        assert "SEGMENT_SHARED_SECRET and REFINER_API_KEY turn it on." in page.locator("#refiner").inner_text()
        assert page.locator("#refiner [data-figure]").count() == 0 and page.locator("#refiner svg").count() == 0

        # The dead letters, by event: their errors' kinds, and a button for each event and one for all.
        letters = page.locator("#segment table.dead-letters")
        assert page.locator('[data-dead-count="segment"]').inner_text() == "4 messages of 3 events"
        for uuid in (DEAD, GONE, REST):
            assert uuid in letters.inner_text() and message_id(uuid, "Completed Survey", "track") in letters.inner_text()
        assert message_id(DEAD, "Completed Survey", "identify") in letters.inner_text() and "HTTP 400 invalid" in letters.inner_text()
        assert REJECTION not in page.content()  # Segment's answer may quote the data: only on the opened event
        assert "HTTP 400 invalid" in page.locator("#segment .last-error").inner_text()
        assert page.locator("#replay-segment").inner_text() == "Replay 3 events" and page.locator("#replay-refiner").count() == 0
        assert dead_row_button(page, DEAD, "replay").count() == 1 and dead_row_button(page, DEAD, "delete").count() == 1
        screenshot(page, tmp_path / "status-dead-letters.png")

        # 24 hours on request: labels every 3 hours; the choice stays through a search.
        with page.expect_navigation():
            page.click("#segment .ranges a")
        assert parse_qs(urlsplit(page.url).query) == {"range": ["24h"]}
        times = page.locator("#segment svg text.time").all_text_contents()
        assert len(times) in (7, 8) and all(re.fullmatch(r"(00|03|06|09|12|15|18|21):00|[A-Z][a-z]{2} \d{1,2}", t) for t in times), times
        assert "per 10 minutes, last 24 hours, times in UTC." in page.locator("#segment figcaption").inner_text()
        screenshot(page, tmp_path / "status-24h.png")
        assert search(page, "r3") == ["delivered"]
        assert parse_qs(urlsplit(page.url).query) == {"q": ["r3"], "range": ["24h"]}

        # An event opens at its response id; its answer only there.
        assert page.goto(f"{service.url}/status/events/{DEAD}").status == 200
        assert DEAD in page.locator("h1").inner_text() and page.locator(".state").inner_text() == "dead"
        assert REJECTION in page.content() and "Product Manager" in page.content()
        screenshot(page, tmp_path / "event-by-response-id.png")

        # Delete one with its own button: it asks first; dismissed, nothing happens.
        page.goto(f"{status_url}?range=24h")
        page.once("dialog", lambda dialog: dialog.dismiss())
        dead_row_button(page, GONE, "delete").click()
        assert page.locator("#deleted").count() == 0 and figure(page, "segment-dead") == "3"
        page.once("dialog", lambda dialog: dialog.accept())
        with page.expect_navigation():
            dead_row_button(page, GONE, "delete").click()
        assert page.locator("#deleted").inner_text().startswith("Deleted the dead letters of 1 event")
        assert parse_qs(urlsplit(page.url).query) == {"range": ["24h"], "deleted": ["1"]}
        assert figure(page, "segment-dead") == "2" and page.locator("#replay-segment").inner_text() == "Replay 2 events"
        assert search(page, GONE) == ["purged"]

        # Segment takes them now. Replay one with its own button; the page keeps its scroll position.
        with segment.lock:
            segment.reject.clear()
        page.set_viewport_size({"width": 1280, "height": 500})
        page.goto(status_url)
        button = dead_row_button(page, DEAD, "replay")
        button.scroll_into_view_if_needed()
        scrolled = page.evaluate("window.scrollY")
        assert scrolled > 0
        with page.expect_navigation():
            button.click()
        assert page.locator("#replayed").inner_text() == "Queued again: 1 event."
        # Where it was, or as far down as the page (a row shorter now) goes.
        bottom = page.evaluate("document.documentElement.scrollHeight - window.innerHeight")
        assert page.evaluate("window.scrollY") == min(scrolled, bottom) > 0, "the page jumped to the top after the button"
        page.set_viewport_size({"width": 1280, "height": 900})
        reload_until(page, {"segment-dead": "1", "segment-pending": "0", "segment-hour-delivered": "7"})
        assert search(page, DEAD) == ["delivered"] and search(page, REST) == ["dead"]

        # And the rest with "replay all".
        page.goto(status_url)
        with page.expect_navigation():
            page.click("#replay-segment")
        assert urlsplit(page.url).path == "/status" and "replayed=1" in page.url
        assert page.locator("#replayed").inner_text() == "Queued again: 1 event."
        reload_until(page, {"segment-dead": "0", "segment-pending": "0", "segment-hour-delivered": "8"})
        assert page.locator("#replay-segment").count() == 0 and page.locator("#segment table.dead-letters").count() == 0
        received = {m["messageId"] for m in segment.received()}
        for uuid in (DEAD, REST):
            assert message_id(uuid, "Completed Survey", "track") in received
        assert message_id(GONE, "Completed Survey", "track") not in received

        page.goto(status_url)
        assert "recovered" in page.locator("#segment .last-delivery-error").inner_text()
        assert page.locator('[data-health="segment"]').inner_text() == "ok"
        screenshot(page, tmp_path / "status.png")

        # Everything the page loaded came from the service itself: no script or style from elsewhere,
        # and the browser refused nothing (the inline script runs by its nonce).
        assert {"/status", "/status/replay", "/status/delete"} <= {urlsplit(url).path for url in requested}, requested
        elsewhere = [url for url in requested if urlsplit(url).hostname != "127.0.0.1" or urlsplit(url).port != service.port]
        assert elsewhere == [], elsewhere
        assert not [p for p in problems if "Content Security Policy" in p], problems
        context.close()
    finally:
        service.stop()


def test_browser_fresh_install_says_nothing_yet_and_refreshes_keeping_search_and_scroll(tmp_path, store_url, segment, browser):
    service = start_service(tmp_path, store_url, segment)
    try:
        context = browser.new_context(http_credentials={"username": "admin", "password": PASSWORD}, viewport={"width": 1280, "height": 400})
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        assert page.goto(f"{service.url}/status").status == 200
        assert page.locator("#segment .nothing-yet").inner_text().startswith("Nothing yet")
        assert page.locator("#segment svg").count() == 0
        assert page.locator("#refreshing").inner_text().startswith("refreshes every 10 s")
        screenshot(page, tmp_path / "status-fresh.png")

        # Every 2 seconds here: the same search, the same place on the page, a newer "as of".
        page.goto(f"{service.url}/status?q=no-such-response&refresh=2")
        page.evaluate("window.scrollTo(0, 150)")
        assert page.evaluate("window.scrollY") == 150, "the page is too short to scroll"
        first = page.locator("#as-of").inner_text()
        with page.expect_navigation(timeout=10_000):
            pass
        assert parse_qs(urlsplit(page.url).query) == {"q": ["no-such-response"], "refresh": ["2"]}
        assert page.input_value("input[name=q]") == "no-such-response"
        assert page.evaluate("window.scrollY") == 150, "the refresh lost the scroll position"
        assert page.locator("#as-of").inner_text() > first

        # A search being typed is not refreshed away.
        loaded = page.evaluate("performance.timeOrigin")
        page.fill("input[name=q]", "r-being-typed")
        time.sleep(5)  # two refresh periods and more
        assert page.evaluate("performance.timeOrigin") == loaded and page.input_value("input[name=q]") == "r-being-typed"

        # Stopped, it stays as it is.
        page.goto(f"{service.url}/status?refresh=off")
        loaded = page.evaluate("performance.timeOrigin")
        assert page.locator("#refreshing").inner_text().startswith("not refreshing")
        time.sleep(2.5)
        assert page.evaluate("performance.timeOrigin") == loaded
        assert not [p for p in problems if "Content Security Policy" in p], problems
        context.close()
    finally:
        service.stop()
