"""Backfill: Refiner's REST API, page by page, validated as webhooks are and stored as events, like them."""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests

from .backoff import Backoff, retry_after
from .config import MappingRules
from .intake import Entry, ignore_stop_signals, map_api_page
from .mapping import map_event
from .outbox import BackfillState, Outbox
from .schemas import event_from_json

log = logging.getLogger(__name__)


class BackfillError(Exception):
    """Refiner's API cannot be used (key refused, unexpected answer); str() is the line to show."""


class Interrupted(Exception):
    """The run was asked to stop while it waited to retry a page."""


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_cursor: str | None
    next_page: int | None
    current_page: int | None
    last_page: int | None


class RefinerApi:
    """`GET $REFINER_API_URL/responses`, one page a call, retrying what is worth retrying."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        backoff: Backoff = Backoff(base=1.0, cap=60.0),  # noqa: B008 - frozen, shared safely
        max_attempts: int = 10,
        sleep: Callable[[float], object] | None = None,
        page_length: int = 100,
        stop: threading.Event | None = None,
        on_retry: Callable[[str, float, int, int], None] = lambda problem, wait, attempt, of: None,
    ) -> None:
        """`stop` cuts a wait between retries short (Ctrl-C); `on_retry(problem, wait, attempt, of)`
        hears of each retry before its wait."""
        self.url = base_url.rstrip("/") + "/responses"
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {api_key}", "Accept": "application/json"})
        self.timeout = timeout
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.stop = stop
        self.sleep = sleep or self._sleep
        self.on_retry = on_retry
        self.page_length = page_length

    def fetch(self, filters: dict[str, str], cursor: str | None = None, page: int | None = None) -> Page:
        query: dict[str, Any] = {**filters, "page_length": self.page_length}
        if cursor:
            query["page_cursor"] = cursor
        elif page:
            query["page"] = page
        problem = ""
        for attempt in range(self.max_attempts):
            try:
                answer = self.session.get(self.url, params=query, timeout=self.timeout)
            except requests.RequestException as exc:
                problem = f"network: {type(exc).__name__}"
                self._pause(problem, self.backoff.delay(attempt), attempt)
                continue
            if answer.status_code == 200:
                return _page(answer, page)
            if answer.status_code in (401, 403):
                raise BackfillError(f"Refiner refused REFINER_API_KEY (HTTP {answer.status_code}): check that it is your project's API key")
            if answer.status_code in (408, 429) or answer.status_code >= 500:
                problem = f"HTTP {answer.status_code}"
                wait = retry_after(answer)
                self._pause(problem, wait if wait is not None else self.backoff.delay(attempt), attempt)
                continue
            raise BackfillError(f"Refiner's API answered HTTP {answer.status_code} for {answer.url}: {answer.text[:200]}")
        raise BackfillError(f"Refiner's API did not answer after {self.max_attempts} attempts ({problem}); run the command again to resume")

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
    return Page(items, cursor, next_page, current, last)


@dataclass
class Progress:
    pages: int = 0
    seen: int = 0  # responses read from the API
    stored: int = 0  # new: their messages are in the outbox
    duplicates: int = 0  # already received (webhook or an earlier backfill): not sent again
    not_completed: int = 0
    invalid: int = 0
    last_page: int | None = None
    started: float = field(default_factory=time.monotonic)
    sample: list[dict[str, Any]] = field(default_factory=list)  # first messages, for --dry-run
    resumed: bool = False
    seen_before: int = 0  # read by the run this one resumes

    @property
    def rate(self) -> float:
        """Responses read per second by this run."""
        return (self.seen - self.seen_before) / max(time.monotonic() - self.started, 1e-9)


def filters(since: datetime | None, until: datetime | None, form: str | None) -> dict[str, str]:
    """The API's query filters; also the name under which a run's progress is kept."""
    out: dict[str, str] = {}
    if since:
        out["date_range_start"] = _api_time(since)
    if until:
        out["date_range_end"] = _api_time(until)
    if form:
        out["form_uuid"] = form
    return out


def _api_time(value: datetime) -> str:
    # Refiner writes times as YYYY-MM-DD HH:MM:SS in UTC; a bare date stays a date.
    if value.time() == datetime.min.time() and value.tzinfo is None:
        return value.strftime("%Y-%m-%d")
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _submit(pool, items: list[Any], rules: MappingRules) -> Future:
    """pool.submit(map_api_page, ...), with stop signals held back while it may start a process.

    A spawned process inherits the blocked signals, so a Ctrl-C to the whole process group cannot
    kill it before intake.ignore_stop_signals() runs; this process gets the signal once unblocked.
    """
    stops = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        return pool.submit(map_api_page, items, rules)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Inline:
    """The pool's interface, mapping in this process (workers=0, or a single page)."""

    def submit(self, fn, *args):
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, *args, **kwargs) -> None:
        pass


def run_backfill(
    api: RefinerApi,
    outbox: Outbox,
    rules: MappingRules,
    query: dict[str, str],
    *,
    dry_run: bool = False,
    report: Callable[[Progress], None] = lambda progress: None,
    should_stop: Callable[[], bool] = lambda: False,
    sample_size: int = 3,
    workers: int = 0,
) -> Progress:
    """Read every completed response of `query`, map it as a webhook would, store what is new.

    Each page is committed together with the next page to ask for, so a run that is stopped
    (Ctrl-C, a crash, an API that gave up) resumes where it was when started again with the
    same filters. A finished run started again reads everything anew and stores only what is
    new. A dry run stores nothing and keeps no progress.

    With `workers`, pages are mapped in that many processes while this one fetches the next
    pages and stores the mapped ones, in order; at most 2 pages per worker are in flight, so
    memory stays flat.
    """
    run_key = json.dumps(query, sort_keys=True)
    state = None if dry_run else outbox.backfill_state(run_key)
    progress = Progress()
    cursor, page = None, None
    if state is not None and not state.done:
        cursor, page = state.next_cursor, state.next_page
        progress = Progress(pages=state.pages, seen=state.seen, stored=state.stored, resumed=True, seen_before=state.seen)
    # spawn, not fork: a forked child would share this process's database connections.
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=ignore_stop_signals)
        if workers
        else _Inline()
    )
    in_flight: deque[tuple[Page, Future]] = deque()
    window = max(1, 2 * workers)
    fetching = True
    failure: BackfillError | None = None
    try:
        while fetching or in_flight:
            while fetching and len(in_flight) < window:
                if should_stop():
                    fetching = False  # store what is in flight; the saved cursor follows the last stored page
                    break
                try:
                    result = api.fetch(query, cursor, page)
                except Interrupted:
                    fetching = False  # as should_stop(): the pages in flight are stored, the cursor saved
                    break
                except BackfillError:
                    if not in_flight:
                        raise
                    fetching, failure = False, sys.exc_info()[1]  # store the pages fetched, then fail
                    break
                in_flight.append((result, _submit(pool, result.items, rules)))
                cursor, page = result.next_cursor, result.next_page
                fetching = cursor is not None or page is not None
            if not in_flight:
                break
            result, future = in_flight.popleft()
            try:
                entries, not_completed, invalid = future.result()
            except BrokenProcessPool:  # a mapping process died (killed, out of memory): map here
                entries, not_completed, invalid = map_api_page(result.items, rules)
            _store_page(outbox, run_key, result, entries, not_completed, invalid, progress, dry_run, sample_size, rules)
            report(progress)
    finally:
        pool.shutdown(cancel_futures=True)
    if failure is not None:
        raise failure
    return progress


def _store_page(
    outbox: Outbox,
    run_key: str,
    result: Page,
    entries: list[Entry],
    not_completed: int,
    invalid: int,
    progress: Progress,
    dry_run: bool,
    sample_size: int,
    rules: MappingRules,
) -> None:
    progress.pages += 1
    progress.seen += len(result.items)
    progress.last_page = result.last_page
    progress.not_completed += not_completed
    progress.invalid += invalid
    finished = result.next_cursor is None and result.next_page is None
    saved = BackfillState(result.next_cursor, result.next_page, finished, progress.pages, progress.seen, progress.stored)
    if dry_run:
        new = len(entries) - len(outbox.known_receipts([e.receipt_key for e in entries]))
        for entry in entries:
            if len(progress.sample) >= sample_size:
                break
            messages = map_event(event_from_json(entry.event), rules, datetime.now(UTC))  # as delivery will map it
            progress.sample.extend(messages[: sample_size - len(progress.sample)])
    else:
        new = outbox.store_many(entries, backfill=(run_key, saved))
    progress.stored += new
    progress.duplicates += len(entries) - new
