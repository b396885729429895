"""The delivery worker to Segment: claim stored events, map them, post the messages in batches, retry, dead-letter."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests
from segment.analytics.consumer import BATCH_SIZE_LIMIT
from segment.analytics.request import APIError, post

from .alerts import Alerts
from .backoff import Backoff, retry_after
from .config import MappingRules
from .directions import SEGMENT
from .mapping import MessageTooLarge, map_event
from .outbox import Claimed, DeadLetter, Outbox, StoreUnavailable
from .schemas import event_from_json
from .tally import DELIVERY, Tally

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


class HandBack(Exception):
    """Out of time for this claim (SIGTERM, or the lease running out): give back what is not settled."""


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


@dataclass(frozen=True)
class Item:
    """One message on its way: the event it belongs to, and its size as JSON in the request."""

    event_id: int
    response_id: str
    message: dict[str, Any]
    size: int


def pack(items: Sequence[Item], limit: int = BATCH_SIZE_LIMIT - BATCH_OVERHEAD) -> list[list[Item]]:
    """Split messages into request bodies under Segment's 500 KB batch limit, in order, an event's
    messages in one request (an event is a few messages of 32 KB at most)."""
    chunks: list[list[Item]] = []
    size = 0
    for event in _by_event(items):
        event_size = sum(item.size + 2 for item in event)  # ", " between messages
        if not chunks or size + event_size > limit:
            chunks.append([])
            size = 0
        chunks[-1].extend(event)
        size += event_size
    return chunks


def _by_event(items: Sequence[Item]) -> list[list[Item]]:
    groups: list[list[Item]] = []
    for item in items:
        if groups and groups[-1][0].event_id == item.event_id:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


class Loop:
    """What every destination's worker does: claim rounds until `stop()` (or SIGTERM through
    `install_signal_handlers`), backing off when the store or the destination fails."""

    destination: str

    def __init__(self, outbox: Outbox, *, batch_size: int, lease_seconds: float, idle_poll: float, backoff: Backoff) -> None:
        self.outbox = outbox
        self.batch_size = batch_size  # events per claim
        self.lease_seconds = lease_seconds
        self.idle_poll = idle_poll
        self.backoff = backoff
        self.name = f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xFFFF:x}"
        self._stopping = False
        self._failures = 0  # consecutive retryable failures, for the backoff exponent
        self.tally = Tally(outbox, background=False)  # what it delivered, added to the store after each round

    def stop(self, *_args: object) -> None:
        # A plain flag, no lock: stop() is a signal handler, and Python runs handlers in the main
        # thread wherever it is, also inside Event.wait() holding the Event's lock, where Event.set()
        # would wait for itself forever (seen: `worker` with the Refiner loop's threads hung on SIGTERM).
        self._stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        log.info("delivery worker started", extra={"worker": self.name, "destination": self.destination, **self.describe()})
        while not self._stopping:
            try:
                self.before_round()
                wait = self.run_once()
                self.tally.flush()
            except StoreUnavailable as exc:
                log.error("store unavailable; retrying", extra={"error": str(exc), "destination": self.destination})
                wait = self.backoff.delay(self._bump())
            except Exception:  # a bug must not end delivery: its claim was handed back, try again later
                log.exception("a delivery round failed; retrying", extra={"destination": self.destination})
                wait = self.backoff.delay(self._bump())
            if wait:
                self._nap(wait)
        log.info("delivery worker stopped", extra={"worker": self.name, "destination": self.destination})

    def describe(self) -> dict[str, Any]:
        return {}

    def before_round(self) -> None:
        pass

    def run_once(self) -> float:
        raise NotImplementedError

    def idle_wait(self) -> float:
        """Nothing claimed: sleep until the next event is due, checking at least every `idle_poll * 5`."""
        due = self.outbox.next_due_in(self.destination)
        return self.idle_poll if due is None else min(max(due, 0.01), self.idle_poll * 5)

    def _nap(self, seconds: float) -> None:
        """Sleep up to `seconds`, in short naps that look at stop()."""
        deadline = time.monotonic() + seconds
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    def _out_of_time(self, outcome: _Round) -> bool:
        return self._stopping or time.monotonic() > outcome.send_until

    def _bump(self) -> int:
        self._failures += 1
        return self._failures - 1


class Worker(Loop):
    """Sends what the outbox holds for Segment, in batches of messages."""

    destination = SEGMENT

    def __init__(
        self,
        outbox: Outbox,
        write_key: str,
        host: str,
        *,
        rules: MappingRules = MappingRules(),  # noqa: B008 - frozen, shared safely
        batch_size: int = 100,
        lease_seconds: float = 60.0,
        idle_poll: float = 0.2,
        backoff: Backoff = DEFAULT_BACKOFF,
        timeout: float = 15.0,
        retention_days: int = 7,
        alert_webhook_url: str | None = None,
        alert_pending_seconds: float = 900,
    ) -> None:
        super().__init__(outbox, batch_size=batch_size, lease_seconds=lease_seconds, idle_poll=idle_poll, backoff=backoff)
        self.write_key = write_key
        self.host = host
        self.rules = rules
        self.timeout = timeout
        self.retention_days = retention_days
        self._next_purge = 0.0
        # This loop always runs, so it watches both directions for ALERT_WEBHOOK_URL.
        self.alerts = Alerts(outbox, alert_webhook_url, alert_pending_seconds) if alert_webhook_url else None
        quiet_library_duplicates()

    def describe(self) -> dict[str, Any]:
        return {"segment_host": self.host}

    def before_round(self) -> None:
        self.purge_if_due()
        if self.alerts is not None:
            self.alerts.check_if_due()  # never raises: alerts must not stop delivery

    def purge_if_due(self) -> None:
        """Hourly: forget the answers of events delivered more than REFINER_RETENTION_DAYS ago, and
        delete their rows (the receipts) after RECEIPT_RETENTION_DAYS. Pending and dead stay."""
        now = time.time()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        forgotten, deleted = self.outbox.purge(
            now - self.retention_days * DAY, now - max(RECEIPT_RETENTION_DAYS, self.retention_days) * DAY
        )
        if forgotten or deleted:
            log.info("purged", extra={"forgotten_events": forgotten, "deleted_receipts": deleted, "retention_days": self.retention_days})
        self.outbox.fold_traffic(int(now // 60) - 25 * 60)  # per-minute counts older than a day: into the totals

    def run_once(self) -> float:
        """Claim events, map them, send their messages; return how long to sleep before the next round."""
        claimed = self.outbox.claim(SEGMENT, self.batch_size, self.lease_seconds, self.name)
        if not claimed:
            return self.idle_wait()
        send_until = time.monotonic() + self.lease_seconds / 2
        items, dead = self._map(claimed)
        outcome = _Round({c.id: c.response_id for c in claimed}, send_until, dead=dead, tally=self.tally, received=_received(claimed))
        chunks = pack(items)
        wait = 0.0 if len(claimed) >= self.batch_size else self.idle_poll
        i = 0
        try:
            for i, chunk in enumerate(chunks):
                # SIGTERM, or a slow Segment eating into the lease: the request in flight is finished,
                # the rest handed back before another worker could claim it too.
                if i and self._out_of_time(outcome):
                    raise HandBack
                self._send(chunk, outcome)
            self._failures = 0
        except HandBack:
            outcome.release(chunks[i:], 0.0, "handed back unsent")
            wait = 0.0
        except RetryLater as exc:
            delay = exc.delay if exc.delay is not None else self.backoff.delay(self._bump())
            outcome.release(chunks[i:], delay, exc.reason)
            what = "Segment not reachable now" if exc.status is None else f"Segment answered HTTP {exc.status}"
            log.warning(
                f"{what}; will retry",
                extra={
                    "reason": exc.reason,
                    "status": exc.status,
                    "messages": sum(len(c) for c in chunks[i:]),
                    "retry_in": round(delay, 2),
                    "outcome": "retry",
                },
            )
            wait = delay
        except BaseException as exc:  # whatever it is, what was learnt is kept and the rest handed back
            outcome.release(chunks[i:], 0.0, f"handed back: {type(exc).__name__}")
            raise
        finally:
            outcome.settle(self.outbox, self.name)
        return wait

    def _map(self, claimed: Sequence[Claimed]) -> tuple[list[Item], list[DeadLetter]]:
        """The messages of the claimed events, mapped now with the current mapping file (stored messages
        of an upgraded store are sent as they are). An event that cannot be mapped is dead at once."""
        items: list[Item] = []
        dead: list[DeadLetter] = []
        for claim in claimed:
            try:
                messages = messages_of(claim.event, claim.messages, claim.generation, claim.created_at, self.rules)
            except MessageTooLarge as exc:
                dead.append(DeadLetter(claim.id, None, None, f"too large for Segment: {exc}"))
                log.error(
                    "an event too large for Segment; kept as a dead letter", extra={"response_id": claim.response_id, "outcome": "dead"}
                )
                continue
            except Exception as exc:  # a bug, or an event stored by another version: keep it, say so
                dead.append(DeadLetter(claim.id, None, None, f"cannot be mapped: {type(exc).__name__}: {exc}"))
                log.exception(
                    "an event could not be mapped; kept as a dead letter", extra={"response_id": claim.response_id, "outcome": "dead"}
                )
                continue
            # Default separators, as segment-analytics-python's post() writes the batch: the length is
            # then the message's exact size in the request.
            items.extend(Item(claim.id, claim.response_id, m, len(json.dumps(m))) for m in messages)
        return items, dead

    def _send(self, chunk: list[Item], outcome: _Round) -> None:
        """Deliver `chunk`, bisecting on a message-level rejection so only the culprit is dead-lettered."""
        try:
            post(self.write_key, self.host, gzip=True, timeout=self.timeout, batch=[i.message for i in chunk])
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
                for half in (chunk[:middle], chunk[middle:]):
                    if self._out_of_time(outcome):  # bisecting may take many requests: the lease and SIGTERM still hold
                        raise HandBack from exc
                    self._send(half, outcome)
                return
            item = chunk[0]
            outcome.dead.append(
                DeadLetter(
                    item.event_id, item.message.get("messageId"), item.message.get("type"), f"HTTP {exc.status} {exc.code}: {exc.message}"
                )
            )
            log.error(
                "Segment rejected a message; kept as a dead letter",
                extra={"response_id": item.response_id, "status": exc.status, "code": exc.code, "outcome": "dead"},
            )
            return
        except requests.RequestException as exc:
            raise RetryLater(f"network: {type(exc).__name__}", None) from exc


def messages_of(
    event: str | None, kept: list[dict[str, Any]] | None, generation: str | None, created_at: float, rules: MappingRules
) -> list[dict[str, Any]]:
    """The Segment messages of a stored event: those kept from before version 3 as they are, else the
    event mapped now with `rules`; [] when its content is forgotten (past retention)."""
    if kept is not None:
        return kept
    if event is None:
        return []
    return map_event(event_from_json(event), rules, datetime.fromtimestamp(created_at, UTC), generation)


def _received(claimed: Sequence[Claimed]) -> dict[int, float]:
    """When each event was put in line (received, or replayed): what its delivery latency counts from."""
    return {c.id: c.queued_at or c.created_at for c in claimed}


@dataclass
class _Round:
    """One claim: its events (id -> response id), when it must stop sending, and what became of its
    events, written in one transaction at the end."""

    claimed: dict[int, str]
    send_until: float  # time.monotonic()
    destination: str = SEGMENT
    tally: Tally | None = None
    received: dict[int, float] = field(default_factory=dict)  # event -> when it was received (latency)
    id_name: str = "response_id"  # what the claimed ids are, in the log: Segment's messageIds for Refiner
    dead: list[DeadLetter] = field(default_factory=list)
    released: dict[int, tuple[float, str]] = field(default_factory=dict)  # event -> (delay, error)

    def release(self, chunks: Sequence[Sequence[Item]], delay: float, error: str) -> None:
        for chunk in chunks:
            self.release_events((item.event_id for item in chunk), delay, error)

    def release_events(self, event_ids: Iterable[int], delay: float, error: str) -> None:
        for event_id in event_ids:
            self.released.setdefault(event_id, (delay, error))

    def settle(self, outbox: Outbox, worker: str) -> None:
        dead_ids = {d.event_id for d in self.dead}
        delivered = [e for e in self.claimed if e not in dead_ids and e not in self.released]
        waits: dict[tuple[float, str], list[int]] = {}  # events given back, by how long they wait and why
        for event_id, wait in self.released.items():
            if event_id not in dead_ids:
                waits.setdefault(wait, []).append(event_id)
        groups = list(waits.items()) or [((0.0, ""), [])]
        (delay, error), released = groups[0]
        where = self.destination
        outbox.settle(worker, delivered=delivered, dead=self.dead, released=released, delay=delay, error=error, destination=where)
        for (delay, error), released in groups[1:]:
            outbox.settle(worker, released=released, delay=delay, error=error, destination=where)
        if self.tally is not None:
            now = time.time()
            self.tally.add(DELIVERY, where, "delivered", len(delivered))
            self.tally.add(DELIVERY, where, "dead", len(dead_ids))
            retried = sum(1 for e, (_, why) in self.released.items() if e not in dead_ids and not why.startswith("handed back"))
            self.tally.add(DELIVERY, where, "retry", retried)
            for event_id in delivered:
                self.tally.latency(where, now - self.received.get(event_id, now))
        for event_id in delivered:
            log.info("delivered", extra={self.id_name: self.claimed[event_id], "outcome": "delivered", "destination": self.destination})
