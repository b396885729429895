"""Delivery to Segment: the claimed events mapped into Segment messages, packed into batches under
Segment's 500 KB limit, one lane in order; a refused batch is halved until the message at fault
is found. The loop (claims, retries, dead letters, SIGTERM) is the shared one."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from segment.analytics.consumer import BATCH_SIZE_LIMIT

from refiner_source.config import Settings
from refiner_source.delivery.backoff import Backoff
from refiner_source.delivery.destination import Call
from refiner_source.delivery.loop import DEFAULT_BACKOFF, Loop
from refiner_source.directions import SEGMENT
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.store import Claimed, DeadLetter, Store
from refiner_source.to_segment.api import SegmentApi
from refiner_source.to_segment.events import event_from_json
from refiner_source.to_segment.mapping import MessageTooLarge, map_event
from refiner_source.to_segment.people import people_of_stored

log = logging.getLogger(__name__)

BATCH_OVERHEAD = 200  # bytes of the {"batch": [...], "sentAt": ..., "writeKey": ...} envelope


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


def preview(stored: str | None, generation: str | None, created_at: float, rules: MappingRules):
    """The messages a stored event becomes now (the operator's event view), as delivery makes them."""
    return messages_of(stored, generation, created_at, rules)


def build_loop(settings: Settings, outbox: Store) -> Loop:
    """The loop the worker runs while Refiner -> Segment is on."""
    return segment_loop(outbox, settings.segment_write_key, settings.segment_host, rules=settings.rules)


def messages_of(event: str | None, generation: str | None, created_at: float, rules: MappingRules) -> list[dict[str, Any]]:
    """The Segment messages of a stored event, mapped now with `rules`; [] when its content is
    forgotten (past retention)."""
    if event is None:
        return []
    return map_event(event_from_json(event), rules, datetime.fromtimestamp(created_at, UTC), generation)


class ToSegment:
    """The Segment destination: what the delivery loop needs of it."""

    name = SEGMENT
    title = "Segment"
    key_hint = "check SEGMENT_WRITE_KEY and SEGMENT_HOST"
    id_name = "response_id"  # what an event's id is, in the log
    contact_order = False  # Segment orders by timestamp itself
    concurrency = 1

    def __init__(self, api: SegmentApi, rules: MappingRules) -> None:
        self.api = api
        self.rules = rules

    def describe(self) -> dict[str, Any]:
        return {"segment_host": self.api.host}

    def people(self, claim: Claimed) -> frozenset[tuple[str, str]]:
        return people_of_stored(claim.event)

    def plan(self, claimed: Sequence[Claimed]) -> tuple[list[list[Call]], list[DeadLetter]]:
        """One lane of batches, mapped now with the current mapping file. An event that cannot be mapped
        is dead at once."""
        items: list[Item] = []
        dead: list[DeadLetter] = []
        for claim in claimed:
            try:
                messages = messages_of(claim.event, claim.generation, claim.created_at, self.rules)
            except MessageTooLarge as exc:
                dead.append(DeadLetter(claim.id, None, None, f"too large for Segment: {exc}"))
                log.error(
                    "an event too large for Segment; kept as a dead letter", extra={"response_id": claim.source_id, "outcome": "dead"}
                )
                continue
            except Exception as exc:  # a bug, or an event stored by another version: keep it, say so
                dead.append(DeadLetter(claim.id, None, None, f"cannot be mapped: {type(exc).__name__}: {exc}"))
                log.exception(
                    "an event could not be mapped; kept as a dead letter", extra={"response_id": claim.source_id, "outcome": "dead"}
                )
                continue
            # Default separators, as segment-analytics-python's post() writes the batch: the length is
            # then the message's exact size in the request.
            items.extend(Item(claim.id, claim.source_id, m, len(json.dumps(m))) for m in messages)
        claims = {claim.id: claim for claim in claimed}
        return [[_call(chunk, claims) for chunk in pack(items)]], dead

    def send(self, call: Call) -> None:
        self.api.send_batch([item.message for item in call.body])

    def split(self, call: Call) -> list[Call]:
        """A refused batch in halves, until the one message at fault is found."""
        items: list[Item] = call.body
        if len(items) < 2:
            return []
        claims = {claim.id: claim for claim in call.events}
        middle = len(items) // 2
        return [_call(items[:middle], claims), _call(items[middle:], claims)]


def _call(items: list[Item], claims: dict[int, Claimed]) -> Call:
    events = tuple(claims[event_id] for event_id in dict.fromkeys(item.event_id for item in items))
    if len(items) == 1:
        message = items[0].message
        return Call(items, events, message_id=message.get("messageId"), kind=message.get("type"))
    return Call(items, events)


def segment_loop(
    outbox: Store,
    write_key: str,
    host: str,
    *,
    rules: MappingRules = MappingRules(),  # noqa: B008 - frozen, shared safely
    batch_size: int = 100,
    lease_seconds: float = 60.0,
    idle_poll: float = 0.2,
    backoff: Backoff = DEFAULT_BACKOFF,
    timeout: float = 15.0,
) -> Loop:
    """The delivery loop to Segment."""
    destination = ToSegment(SegmentApi(write_key, host, timeout), rules)
    return Loop(outbox, destination, batch_size=batch_size, lease_seconds=lease_seconds, idle_poll=idle_poll, backoff=backoff)
