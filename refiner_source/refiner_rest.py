"""Refiner's REST API, what both directions share: `Authorization: Bearer $REFINER_API_KEY` on a
session per thread (`Sessions`), and `GET /responses` a page at a time for the backfill (Refiner ->
Segment). The calls Segment's events become (Segment -> Refiner) are in to_refiner/api.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from refiner_source.delivery.answers import Verdict, retry_after, verdict
from refiner_source.delivery.backoff import Backoff
from refiner_source.errors import RefinerSourceError

PAGE_LENGTH = 500  # responses a page: five times fewer requests than the API's default pages


class BackfillError(RefinerSourceError):
    """Refiner's API cannot be used (key refused, unexpected answer); str() is the line to show."""


class Interrupted(Exception):
    """The run was asked to stop while it waited to retry a page."""


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_cursor: str | None
    next_page: int | None
    last_page: int | None


class Sessions:
    """A requests session per thread, each with the key: the delivery loop sends from a pool of
    threads, and a session (its connection pool) is not to be shared between them."""

    def __init__(self, api_key: str) -> None:
        self.headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self._local = threading.local()

    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self.headers)
        return session


class RefinerClient:
    """Refiner's REST API for reading: `GET /responses` a page at a time for the backfill, retrying
    what the answer's status says is worth retrying (refiner_source.delivery.answers.verdict)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        backoff: Backoff = Backoff(base=1.0, cap=60.0),  # noqa: B008 - frozen, shared safely
        max_attempts: int = 10,
        sleep: Callable[[float], object] | None = None,
        page_length: int = PAGE_LENGTH,
        stop: threading.Event | None = None,
        on_retry: Callable[[str, float, int, int], None] = lambda problem, wait, attempt, of: None,
    ) -> None:
        """`stop` cuts a wait between retries short (Ctrl-C); `on_retry(problem, wait, attempt, of)`
        hears of each retry before its wait."""
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/responses"
        self.sessions = Sessions(api_key)
        self.timeout = timeout
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.stop = stop
        self.sleep = sleep or self._sleep
        self.on_retry = on_retry
        self.page_length = page_length
        self._answered = False  # whether the API has answered fetch() at all: a refusal after that is a blip

    def fetch(self, filters: dict[str, str], cursor: str | None = None, page: int | None = None) -> Page:
        # include=completed (unless `filters` says otherwise): the backfill sends completed responses
        # only, so views and partial responses need not cross the network. with_attributes=1: the
        # contact's attributes, which decide with the account's whether an answer is the user's, as
        # in a webhook (docs/backfill.md says what the API still leaves out).
        query: dict[str, Any] = {"include": "completed", "with_attributes": 1, **filters, "page_length": self.page_length}
        if cursor:
            query["page_cursor"] = cursor
        elif page:
            query["page"] = page
        problem = ""
        for attempt in range(self.max_attempts):
            try:
                answer = self.sessions.session().get(self.url, params=query, timeout=self.timeout, allow_redirects=False)
            except requests.RequestException as exc:
                if not self._answered and _refused(exc):
                    # Refused before the API ever answered this run: a wrong REFINER_API_URL (or a
                    # local stand-in not started), which ten retries over minutes would only hide.
                    raise BackfillError(f"Refiner's API at {self.base_url} refused the connection: check REFINER_API_URL") from None
                problem = f"network: {type(exc).__name__}"
                self._pause(problem, self.backoff.delay(attempt), attempt)
                continue
            self._answered = True
            status = answer.status_code
            kind = verdict(status)
            if kind is Verdict.TAKEN:
                return _page(answer, page)
            if kind is Verdict.RETRY:
                problem = f"HTTP {status}"
                wait = retry_after(answer)
                self._pause(problem, wait if wait is not None else self.backoff.delay(attempt), attempt)
                continue
            # A setting or the request is wrong: a command run by hand stops and says which.
            if status in (401, 403):
                raise BackfillError(f"Refiner refused REFINER_API_KEY (HTTP {status}): check that it is your project's API key")
            if kind is Verdict.SETTING:
                where = f" (to {answer.headers['Location']})" if 300 <= status < 400 and answer.headers.get("Location") else ""
                raise BackfillError(f"Refiner's API answered HTTP {status}{where} for {answer.url}: check REFINER_API_URL")
            raise BackfillError(f"Refiner's API answered HTTP {status} for {answer.url}: {answer.text[:200]}")
        raise BackfillError(f"Refiner's API did not answer after {self.max_attempts} attempts ({problem})")

    def _pause(self, problem: str, seconds: float, attempt: int) -> None:
        if attempt + 1 >= self.max_attempts:
            return  # no retry follows
        self._check_stop()
        self.on_retry(problem, seconds, attempt + 1, self.max_attempts - 1)
        self.sleep(seconds)
        self._check_stop()

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Interrupted

    def _sleep(self, seconds: float) -> None:
        # Short naps that look at `stop`, not stop.wait(): the stop is set from a signal handler,
        # which could run while this thread holds the Event's own lock.
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not (self.stop is not None and self.stop.is_set()):
            time.sleep(min(left, 0.1))


def _refused(exc: BaseException) -> bool:
    """Whether a connection was refused, somewhere in what requests wraps (urllib3's MaxRetryError,
    its NewConnectionError, the OSError under it)."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ConnectionRefusedError):
            return True
        todo.extend([item.__cause__, item.__context__, getattr(item, "reason", None), *item.args])
    return False


def _page(answer: requests.Response, asked_page: int | None) -> Page:
    try:
        body = answer.json()
        items = body["items"]
        pagination = body.get("pagination") or {}
        if not isinstance(items, list) or not isinstance(pagination, dict):
            raise TypeError
        current = int(pagination.get("current_page") or asked_page or 1)
        last = int(pagination["last_page"]) if pagination.get("last_page") is not None else None
    except (ValueError, KeyError, TypeError):
        raise BackfillError(f"Refiner's API answered something that is not a page of responses: {answer.text[:200]}") from None
    cursor = pagination.get("next_page_cursor") or None
    next_page = None if cursor else (current + 1 if last is not None and current < last and items else None)
    return Page(items, cursor, next_page, last)
