"""What an HTTP answer means, for every client of the project (Segment's batch API, Refiner's writes,
Refiner's reads): one table (`verdict`), how long an answer asks us to wait (`retry_after`), and the
two exceptions a destination's `send` raises for the delivery loop (`RetryLater`, `Rejected`).
docs/delivery.md has the table in words."""

from __future__ import annotations

import enum
import time
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Protocol


class Verdict(enum.Enum):
    TAKEN = "taken"  # 2xx
    RETRY = "retry"  # not now: the peer is busy or down (the network failing is this too)
    SETTING = "setting"  # a setting is wrong (the key, or the address): nothing in the call is at fault
    REJECTED = "rejected"  # the call itself is at fault: sending it again cannot help


# 408 Request Timeout, 423 Locked, 429 Too Many Requests: the statuses below 500 that Segment's own
# delivery retries too.
RETRY_STATUSES = frozenset({408, 423, 429})
# The key refused (401, 403), or no such endpoint (404): the URL setting names the wrong place. Both
# Refiner's write calls create the user they name, so a 404 never means "no such user".
SETTING_STATUSES = frozenset({401, 403, 404})


def verdict(status: int) -> Verdict:
    """The one classification of an HTTP status. A 3xx is a setting problem: no client here follows
    a redirect (a POST would be resent as a GET, and requests drops the key on the way), so the URL
    setting points at a redirector, which the operator fixes by setting where it leads."""
    if 200 <= status < 300:
        return Verdict.TAKEN
    if status in RETRY_STATUSES or status >= 500:
        return Verdict.RETRY
    if status in SETTING_STATUSES or 300 <= status < 400:
        return Verdict.SETTING
    return Verdict.REJECTED


MAX_RETRY_AFTER = 300.0  # seconds: a longer Retry-After is taken as this, so one answer cannot park an event for days


class _Answer(Protocol):
    headers: object


def retry_after(answer: _Answer | None, now: float | None = None) -> float | None:
    """The wait an answer's Retry-After asks for, in seconds, within 0 to MAX_RETRY_AFTER: a number
    of seconds, or an HTTP date (one without a zone is read as UTC). None without an answer, without
    the header, or when it is neither or a date gone by (the caller's backoff then decides)."""
    value = answer.headers.get("Retry-After") if answer is not None else None  # type: ignore[attr-defined]
    if not value or not isinstance(value, str):
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" gives a naive datetime; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    seconds = when.timestamp() - (time.time() if now is None else now)
    return min(seconds, MAX_RETRY_AFTER) if seconds > 0 else None  # a date gone by asks for nothing: backoff


class RetryLater(Exception):
    """The destination or the network said "not now". `delay` is its Retry-After when given;
    `status` its HTTP status when it answered (None: not reachable); `key_problem` when a setting
    is wrong (Verdict.SETTING: retried while the operator fixes it, logged as an error)."""

    def __init__(self, reason: str, delay: float | None, status: int | None = None, *, key_problem: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay
        self.status = status
        self.key_problem = key_problem


class Rejected(Exception):
    """The destination refused the call itself (Verdict.REJECTED): the one event at fault becomes a
    dead letter; `detail` is the destination's answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def raise_for(status: int, detail: str, answer: _Answer | None) -> None:
    """What a destination's send does with an answer that is not 2xx: RetryLater or Rejected, by `verdict`."""
    kind = verdict(status)
    if kind is Verdict.REJECTED:
        raise Rejected(status, detail)
    if kind is not Verdict.TAKEN:
        raise RetryLater(detail, retry_after(answer), status, key_problem=kind is Verdict.SETTING)
