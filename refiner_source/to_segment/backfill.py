"""Backfill: Refiner's REST API, page by page, validated as webhooks are and stored as events, like them."""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from refiner_source.directions import SEGMENT
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.privacy import Suppressed
from refiner_source.refiner_rest import BackfillError, Interrupted, Page, RefinerClient
from refiner_source.store import BackfillState, Store
from refiner_source.to_segment.events import event_from_json
from refiner_source.to_segment.intake import MappedPage, ignore_stop_signals, map_api_page
from refiner_source.to_segment.mapping import map_event

log = logging.getLogger(__name__)


@dataclass
class Progress:
    pages: int = 0
    seen: int = 0  # responses read from the API
    stored: int = 0  # new: their messages are in the outbox
    duplicates: int = 0  # already received (webhook or an earlier backfill): not sent again
    not_completed: int = 0
    invalid: int = 0
    forgotten: int = 0  # of people `refiner-source forget` erased: not stored
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
    api: RefinerClient,
    outbox: Store,
    rules: MappingRules,
    query: dict[str, str],
    *,
    dry_run: bool = False,
    report: Callable[[Progress], None] = lambda progress: None,
    should_stop: Callable[[], bool] = lambda: False,
    sample_size: int = 3,
    workers: int = 0,
    suppressed: Suppressed | None = None,
) -> Progress:
    """Read every completed response of `query`, map it as a webhook would, store what is new.

    Each page is committed together with the next page to ask for, so a run that is stopped
    (Ctrl-C, a crash, an API that gave up) resumes where it was when started again with the
    same filters. A finished run started again reads everything anew and stores only what is
    new. A dry run stores nothing and keeps no progress.

    With `workers`, pages are mapped in that many processes while this one fetches the next
    pages and stores the mapped ones, in order; at most 2 pages per worker are in flight, so
    memory stays flat. A response of a person on the suppression list (`suppressed`, checked
    as the webhooks check it) is counted, never stored.
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
                mapped = future.result()
            except BrokenProcessPool:  # a mapping process died (killed, out of memory): map here
                mapped = map_api_page(result.items, rules)
            if suppressed is not None:
                mapped.entries, forgotten = suppressed.set_aside(mapped.entries)
                progress.forgotten += len(forgotten)
            _store_page(outbox, run_key, result, mapped, progress, dry_run, sample_size, rules)
            report(progress)
    finally:
        pool.shutdown(cancel_futures=True)
    if failure is not None:
        raise failure
    return progress


def _store_page(
    outbox: Store,
    run_key: str,
    result: Page,
    mapped: MappedPage,
    progress: Progress,
    dry_run: bool,
    sample_size: int,
    rules: MappingRules,
) -> None:
    for skipped in mapped.skipped:  # logged here: a mapping process has no logging of its own
        log.warning(
            "skipped an API item that is not a valid response", extra={"response_id": skipped.response_id, "fields": skipped.fields}
        )
    entries = mapped.entries
    progress.pages += 1
    progress.seen += len(result.items)
    progress.last_page = result.last_page
    progress.not_completed += mapped.not_completed
    progress.invalid += len(mapped.skipped)
    finished = result.next_cursor is None and result.next_page is None
    saved = BackfillState(result.next_cursor, result.next_page, finished, progress.pages, progress.seen, progress.stored)
    if dry_run:
        known = outbox.known_receipts([e.receipt_key for e in entries], destination=SEGMENT)
        fresh = [e for e in entries if e.receipt_key not in known]
        new = len(fresh)
        for entry in fresh:  # a response already sent would not be sent again: no sample of it
            if len(progress.sample) >= sample_size:
                break
            messages = map_event(event_from_json(entry.event), rules, datetime.now(UTC))  # as delivery will map it
            progress.sample.extend(messages[: sample_size - len(progress.sample)])
    else:
        new = outbox.store_many(entries, backfill=(run_key, saved))
    progress.stored += new
    progress.duplicates += len(entries) - new
