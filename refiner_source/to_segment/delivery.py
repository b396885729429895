"""The delivery worker to Segment: claim stored events, map them, post the messages in batches, retry, dead-letter."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
from segment.analytics.consumer import BATCH_SIZE_LIMIT
from segment.analytics.request import APIError, post

from refiner_source.config import MappingRules
from refiner_source.delivery.backoff import Backoff, retry_after
from refiner_source.delivery.loop import DEFAULT_BACKOFF, HandBack, Loop, RetryLater, Round, received_times
from refiner_source.directions import SEGMENT
from refiner_source.store import Claimed, DeadLetter, Outbox
from refiner_source.to_segment.events import event_from_json
from refiner_source.to_segment.mapping import MessageTooLarge, map_event

log = logging.getLogger(__name__)

# Rejections that are about our credentials or host, not about a message: bisecting would
# wrongly dead-letter everything, so they wait and retry while the operator fixes the setting.
CONFIGURATION_STATUSES = frozenset({401, 403, 404})
BATCH_OVERHEAD = 200  # bytes of the {"batch": [...], "sentAt": ..., "writeKey": ...} envelope


def is_configuration(status: int) -> bool:
    # A 3xx reaching us is one requests would not follow: SEGMENT_HOST points at a proxy or redirector.
    return status in CONFIGURATION_STATUSES or 300 <= status < 400


def is_retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500 or is_configuration(status)


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
    ) -> None:
        super().__init__(outbox, batch_size=batch_size, lease_seconds=lease_seconds, idle_poll=idle_poll, backoff=backoff)
        self.write_key = write_key
        self.host = host
        self.rules = rules
        self.timeout = timeout
        quiet_library_duplicates()

    def describe(self) -> dict[str, Any]:
        return {"segment_host": self.host}

    def run_once(self) -> float:
        """Claim events, map them, send their messages; return how long to sleep before the next round."""
        claimed = self.outbox.claim(SEGMENT, self.batch_size, self.lease_seconds, self.name)
        if not claimed:
            return self.idle_wait()
        send_until = time.monotonic() + self.lease_seconds / 2
        items, dead = self._map(claimed)
        outcome = Round({c.id: c.response_id for c in claimed}, send_until, dead=dead, tally=self.tally, received=received_times(claimed))
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

    def _send(self, chunk: list[Item], outcome: Round) -> None:
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
