"""The delivery worker: claim pending messages, post them to Segment in batches, retry, dead-letter."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence

import requests
from segment.analytics.consumer import BATCH_SIZE_LIMIT
from segment.analytics.request import APIError, post

from .backoff import Backoff, retry_after
from .outbox import Claimed, Outbox, StoreUnavailable

log = logging.getLogger(__name__)

# Rejections that are about our credentials or host, not about a message: bisecting would
# wrongly dead-letter everything, so they wait and retry while the operator fixes the setting.
CONFIGURATION_STATUSES = frozenset({401, 403, 404})
BATCH_OVERHEAD = 200  # bytes of the {"batch": [...], "sentAt": ..., "writeKey": ...} envelope
DAY = 86400.0
# Receipts are what make a resent webhook a duplicate; they are tiny, so they outlive the
# delivered messages by far (Refiner gives up retrying long before).
RECEIPT_RETENTION_DAYS = 90
PURGE_EVERY = 3600.0
DEFAULT_BACKOFF = Backoff(base=0.5, cap=60.0)


def is_configuration(status: int) -> bool:
    # A 3xx reaching us is one requests would not follow: SEGMENT_HOST points at a proxy or redirector.
    return status in CONFIGURATION_STATUSES or 300 <= status < 400


def is_retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500 or is_configuration(status)


class RetryLater(Exception):
    """Segment or the network said "not now"; `delay` is how long to wait (Retry-After if given);
    `status` is Segment's HTTP status when it answered, None when it could not be reached."""

    def __init__(self, reason: str, delay: float | None, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay
        self.status = status


class _DropLibraryErrors(logging.Filter):
    """segment-analytics-python logs an ERROR of its own for an answer that is not Segment's JSON
    ("Unknown error: [503] ..."); the worker logs each answer itself, with what it will do about
    it, so that copy is dropped. The library's other records (its redirect hint, Retry-After) pass."""

    DUPLICATES = ("Unknown error:",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.DUPLICATES))


def quiet_library_duplicates() -> None:
    library = logging.getLogger("segment")
    if not any(isinstance(f, _DropLibraryErrors) for f in library.filters):
        library.addFilter(_DropLibraryErrors())


def pack(items: Sequence[Claimed], limit: int = BATCH_SIZE_LIMIT - BATCH_OVERHEAD) -> list[list[Claimed]]:
    """Split claimed messages into request bodies under Segment's 500 KB batch limit, in order."""
    chunks: list[list[Claimed]] = []
    size = 0
    for item in items:
        item_size = (item.size or len(json.dumps(item.message))) + 2  # ", " between messages
        if not chunks or size + item_size > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += item_size
    return chunks


class Worker:
    """Sends what the outbox holds. `run()` loops until `stop()` (or SIGTERM through `install_signal_handlers`)."""

    def __init__(
        self,
        outbox: Outbox,
        write_key: str,
        host: str,
        *,
        batch_size: int = 250,
        lease_seconds: float = 60.0,
        idle_poll: float = 0.2,
        backoff: Backoff = DEFAULT_BACKOFF,
        timeout: float = 15.0,
        retention_days: int = 7,
    ) -> None:
        self.outbox = outbox
        self.write_key = write_key
        self.host = host
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.idle_poll = idle_poll
        self.backoff = backoff
        self.timeout = timeout
        self.retention_days = retention_days
        self._next_purge = 0.0
        self.name = f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xFFFF:x}"
        self._stop = threading.Event()
        self._failures = 0  # consecutive retryable failures, for the backoff exponent
        quiet_library_duplicates()

    def stop(self, *_args: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        log.info("delivery worker started", extra={"worker": self.name, "segment_host": self.host})
        while not self._stop.is_set():
            try:
                self.purge_if_due()
                wait = self.run_once()
            except StoreUnavailable as exc:
                log.error("store unavailable; retrying", extra={"error": str(exc)})
                wait = self.backoff.delay(self._bump())
            if wait:
                self._stop.wait(wait)
        log.info("delivery worker stopped", extra={"worker": self.name})

    def purge_if_due(self) -> None:
        """Hourly: drop delivered messages older than REFINER_RETENTION_DAYS (dead letters stay)."""
        now = time.time()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        messages, receipts = self.outbox.purge(now - self.retention_days * DAY, now - RECEIPT_RETENTION_DAYS * DAY)
        if messages or receipts:
            log.info("purged", extra={"delivered_messages": messages, "receipts": receipts, "retention_days": self.retention_days})

    def run_once(self) -> float:
        """Claim and send one batch; return how long to sleep before the next (0: go on at once)."""
        claimed = self.outbox.claim(self.batch_size, self.lease_seconds, self.name)
        send_until = time.monotonic() + self.lease_seconds / 2
        if not claimed:
            due = self.outbox.next_due_in()
            return self.idle_poll if due is None else min(max(due, 0.01), self.idle_poll * 5)
        chunks = pack(claimed)
        for i, chunk in enumerate(chunks):
            unsent = [item.id for later in chunks[i:] for item in later]
            # SIGTERM, or a slow Segment eating into the lease: the request in flight is finished,
            # the rest handed back before another worker could claim it too.
            if i and (self._stop.is_set() or time.monotonic() > send_until):
                self.outbox.release(unsent, 0.0, "handed back unsent")
                return 0.0
            try:
                self._send(chunk)
            except RetryLater as exc:
                delay = exc.delay if exc.delay is not None else self.backoff.delay(self._bump())
                self.outbox.release(unsent, delay, exc.reason)
                what = "Segment not reachable now" if exc.status is None else f"Segment answered HTTP {exc.status}"
                log.warning(
                    f"{what}; will retry",
                    extra={
                        "reason": exc.reason,
                        "status": exc.status,
                        "messages": len(unsent),
                        "retry_in": round(delay, 2),
                        "outcome": "retry",
                    },
                )
                return delay
        self._failures = 0
        return 0.0 if len(claimed) >= self.batch_size else self.idle_poll

    def _bump(self) -> int:
        self._failures += 1
        return self._failures - 1

    def _send(self, chunk: list[Claimed]) -> None:
        """Deliver `chunk`, bisecting on a message-level rejection so only the culprit is dead-lettered."""
        try:
            post(self.write_key, self.host, gzip=True, timeout=self.timeout, batch=[c.message for c in chunk])
        except APIError as exc:
            if is_retryable(exc.status):
                if is_configuration(exc.status):
                    log.error(
                        "Segment rejected the request: check SEGMENT_WRITE_KEY and SEGMENT_HOST",
                        extra={"status": exc.status, "outcome": "retry"},
                    )
                raise RetryLater(f"HTTP {exc.status}: {exc.code}", retry_after(exc.response), exc.status) from exc
            if len(chunk) > 1:
                middle = len(chunk) // 2
                self._send(chunk[:middle])
                self._send(chunk[middle:])
                return
            self.outbox.mark_dead([chunk[0].id], f"HTTP {exc.status} {exc.code}: {exc.message}")
            log.error(
                "Segment rejected a message; kept as a dead letter",
                extra={"response_id": chunk[0].response_id, "status": exc.status, "code": exc.code, "outcome": "dead"},
            )
            return
        except requests.RequestException as exc:
            raise RetryLater(f"network: {type(exc).__name__}", None) from exc
        self.outbox.mark_delivered([c.id for c in chunk])
        for response_id in dict.fromkeys(c.response_id for c in chunk):
            log.info("delivered", extra={"response_id": response_id, "outcome": "delivered"})
