"""The one classification of HTTP answers (refiner_source.delivery.answers), and its Retry-After parser."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
import requests

from refiner_source.delivery.answers import MAX_RETRY_AFTER, Rejected, RetryLater, Verdict, raise_for, retry_after, verdict


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        *[(s, Verdict.TAKEN) for s in (200, 201, 202, 204, 299)],
        # What Segment's own delivery retries below 500, and every 5xx.
        *[(s, Verdict.RETRY) for s in (408, 423, 429, 500, 502, 503, 504, 599)],
        # The key (401, 403), the address (404, or a redirect no client follows).
        *[(s, Verdict.SETTING) for s in (401, 403, 404, 301, 302, 304, 307, 308)],
        # Any other 4xx: the call itself is at fault.
        *[(s, Verdict.REJECTED) for s in (400, 405, 409, 410, 413, 415, 422, 451)],
    ],
)
def test_verdict_is_one_table_for_every_client(status, expected):
    assert verdict(status) is expected


def answer(retry_after_header: str | None) -> requests.Response:
    response = requests.Response()
    if retry_after_header is not None:
        response.headers["Retry-After"] = retry_after_header
    return response


def test_retry_after_in_seconds():
    assert retry_after(answer("7")) == 7
    assert retry_after(answer(" 0 ")) == 0


def test_retry_after_is_capped_at_five_minutes():
    assert MAX_RETRY_AFTER == 300
    assert retry_after(answer("86400")) == 300


def test_retry_after_as_an_http_date_is_the_seconds_until_then():
    now = 1_800_000_000.0
    when = datetime.fromtimestamp(now + 42, UTC)
    assert retry_after(answer(format_datetime(when, usegmt=True)), now=now) == pytest.approx(42)
    # "-0000" (no zone said) is read as UTC, whatever the machine's zone
    assert retry_after(answer(when.strftime("%a, %d %b %Y %H:%M:%S -0000")), now=now) == pytest.approx(42)
    assert retry_after(answer(format_datetime(datetime.fromtimestamp(now + 10_000, UTC), usegmt=True)), now=now) == 300


@pytest.mark.parametrize("header", [None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2026 99:99:99 GMT"])
def test_retry_after_that_is_absent_or_unreadable_is_none(header):
    assert retry_after(answer(header)) is None


def test_retry_after_a_date_gone_by_is_none_so_backoff_decides():
    now = 1_800_000_000.0
    assert retry_after(answer(format_datetime(datetime.fromtimestamp(now - 60, UTC), usegmt=True)), now=now) is None


def test_retry_after_without_an_answer_is_none():
    assert retry_after(None) is None


def test_raise_for_follows_the_table():
    raise_for(204, "taken", None)  # returns
    with pytest.raises(RetryLater) as busy:
        raise_for(429, "HTTP 429: slow down", answer("9"))
    assert busy.value.delay == 9 and busy.value.status == 429 and not busy.value.key_problem
    with pytest.raises(RetryLater) as setting:
        raise_for(404, "HTTP 404: no such path", None)
    assert setting.value.key_problem and setting.value.delay is None
    with pytest.raises(Rejected) as refused:
        raise_for(422, "HTTP 422: bad email", answer("9"))
    assert refused.value.status == 422 and refused.value.detail == "HTTP 422: bad email"
