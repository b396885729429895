"""The operator's "Forget a person" form in a real browser (Debian's Chromium, Playwright) against
the real `refiner-source serve`: fill in a user id, see what would be erased, confirm, see it done,
and the person's webhooks ignored afterwards. Screenshots under the test's tmp_path."""

from __future__ import annotations

import requests

from refiner_source.to_segment.mapping import message_id
from tests.conftest import survey_body
from tests.ops.test_operator import PASSWORD, start_service
from tests.ops.test_operator_browser import browser, figure, post, reload_until, screenshot  # noqa: F401 - browser is a fixture
from tests.service import wait_until


def test_browser_forget_a_person_shows_the_counts_asks_to_confirm_and_erases(tmp_path, store_url, segment, browser):  # noqa: F811
    kept, dead, other = survey_body(1), survey_body(2), survey_body(3)
    dead["remote_id"] = "user-1"
    segment.reject[message_id("r2", "Completed Survey", "track")] = (400, {"code": "invalid", "message": "refused by the test"})
    service = start_service(tmp_path, store_url, segment)
    try:
        for body in (kept, dead, other):
            assert post(service, body).status_code == 202
        context = browser.new_context(http_credentials={"username": "admin", "password": PASSWORD}, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        assert page.goto(f"{service.url}/status?refresh=off").status == 200
        reload_until(page, {"segment-delivered": "2", "segment-dead": "1", "segment-pending": "0"})
        assert figure(page, "suppressed") == "0"

        page.fill("#forget input[name=user]", "user-1")
        with page.expect_navigation():
            page.click("#forget button[type=submit]")
        assert page.locator("h1").inner_text() == "Forget this person?"
        counts = page.locator("table.forget-counts tr:has-text('Refiner to Segment')")
        assert counts.locator('[data-erased="events"]').inner_text() == "2"
        assert counts.locator('[data-erased="dead_letters"]').inner_text() == "1"
        assert counts.locator('[data-erased="waiting"]').inner_text() == "0"
        screenshot(page, tmp_path / "forget-confirm.png")
        assert figure_after_reload(service) == (2, 1)  # a dry run: nothing erased yet

        with page.expect_navigation():
            page.click("#forget-confirm")
        assert page.locator("h1").inner_text() == "Forgotten"
        assert "Erased 2 events" in page.locator("#forgotten").inner_text()
        assert "user-1" not in page.content()
        screenshot(page, tmp_path / "forget-done.png")

        page.goto(f"{service.url}/status?refresh=off")
        assert figure(page, "suppressed") == "1" and figure(page, "segment-dead") == "0" and figure(page, "segment-delivered") == "1"
        answer = wait_until(lambda: (a := post(service, kept).json())["status"] == "ignored" and a, 10, "the resend ignored")
        assert answer == {"status": "ignored", "reason": "forgotten"}

        # The form is a POST behind the password and the page's token.
        forged = requests.post(
            f"{service.url}/status/forget", data={"user": "user-3", "confirm": "1"}, auth=("admin", PASSWORD), timeout=10
        )
        assert forged.status_code == 403 and forged.json()["error"] == "csrf"
        anonymous = requests.post(f"{service.url}/status/forget", data={"user": "user-3"}, timeout=10)
        assert anonymous.status_code == 401
        assert post(service, survey_body(4)).status_code == 202 and post(service, other).json()["status"] == "duplicate"
        context.close()
    finally:
        service.stop()


def figure_after_reload(service) -> tuple[int, int]:
    """(delivered, dead) of Refiner to Segment, read from the page anew."""
    page = requests.get(f"{service.url}/status?refresh=off", auth=("admin", PASSWORD), timeout=10).text
    pick = {name: page.split(f'data-figure="segment-{name}">')[1].split("<")[0] for name in ("delivered", "dead")}
    return int(pick["delivered"]), int(pick["dead"])
