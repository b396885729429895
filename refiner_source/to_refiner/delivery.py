"""Delivery to Refiner: the claimed Segment events mapped into Refiner REST calls, one lane per
contact (its calls in order, also across rounds), identify calls of a contact waiting together
merged into one, as many contacts at once as Refiner takes quickly, up to `REFINER_API_CONCURRENCY`
(delivery/window.py). The loop is the shared one."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from refiner_source.config import Settings
from refiner_source.delivery.backoff import Backoff
from refiner_source.delivery.destination import Call
from refiner_source.delivery.loop import DEFAULT_BACKOFF, Loop
from refiner_source.directions import REFINER
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.store import Claimed, DeadLetter, Store
from refiner_source.to_refiner.api import RefinerApi
from refiner_source.to_refiner.mapping import merge, mergeable, to_refiner
from refiner_source.to_refiner.people import people_of_stored

log = logging.getLogger(__name__)


def plan(claimed: Sequence[Claimed], rules: MappingRules) -> tuple[list[list[Call]], list[DeadLetter]]:
    """(calls per contact, in order; events that cannot be mapped). An event whose mapping gives no
    call (the mapping file changed since it was accepted: an allowlist, page_event) is in neither,
    and so counts as delivered.

    Identify calls of one contact that wait together, one after the other, become one call
    (an Engage first sync sends one identify per audience and user); its `parts` are each
    event's own call, sent one by one if Refiner refuses the merged one."""
    contacts: dict[str | None, list[Call]] = {}
    dead: list[DeadLetter] = []
    for claim in claimed:
        try:
            calls = to_refiner(json.loads(claim.event or "null"), rules)
        except Exception as exc:  # a bug, or an event stored by another version: keep it, say so
            dead.append(DeadLetter(claim.id, claim.source_id, None, f"cannot be mapped: {type(exc).__name__}: {exc}"))
            log.exception("an event could not be mapped; kept as a dead letter", extra={"message_id": claim.source_id, "outcome": "dead"})
            continue
        lane = contacts.setdefault(claim.contact, [])
        for refiner_call in calls:
            call = Call(refiner_call, (claim,), message_id=claim.source_id, kind=refiner_call.path)
            last = lane[-1] if lane else None
            if last is not None and mergeable(last.body, refiner_call):
                parts = (*(last.parts or (last,)), call)
                lane[-1] = Call(merge([p.body for p in parts]), (*last.events, claim), kind=refiner_call.path, parts=parts)
            else:
                lane.append(call)
    return list(contacts.values()), dead


def preview(stored: str | None, _generation: str | None, _created_at: float, rules: MappingRules) -> list[dict[str, Any]]:
    """The calls a stored event becomes now (the operator's event view), as delivery makes them."""
    return [] if stored is None else [{"path": c.path, "body": c.body} for c in to_refiner(json.loads(stored), rules)]


def build_loop(settings: Settings, outbox: Store) -> Loop:
    """The loop the worker runs while Segment -> Refiner is on."""
    api = RefinerApi(settings.refiner_api_url, settings.refiner_api_key, timeout=15.0)
    return refiner_loop(outbox, api, rules=settings.rules, concurrency=settings.refiner_api_concurrency)


class ToRefiner:
    """The Refiner destination: what the delivery loop needs of it."""

    name = REFINER
    title = "Refiner"
    key_hint = "check that REFINER_API_KEY is your Refiner project's API key and that REFINER_API_URL is Refiner's API"
    id_name = "message_id"  # an event's id is the Segment messageId it came with
    contact_order = True

    def __init__(self, api: RefinerApi, rules: MappingRules, concurrency: int) -> None:
        self.api = api
        self.rules = rules
        self.concurrency = concurrency

    def describe(self) -> dict[str, Any]:
        return {"refiner_api_url": self.api.base_url, "concurrency": self.concurrency}

    def people(self, claim: Claimed) -> frozenset[tuple[str, str]]:
        return people_of_stored(claim.event)

    def plan(self, claimed: Sequence[Claimed]) -> tuple[list[list[Call]], list[DeadLetter]]:
        return plan(claimed, self.rules)

    def send(self, call: Call) -> None:
        self.api.send(call.body)

    def split(self, call: Call) -> list[Call]:
        """A refused merged call: each event's own call again, so that only the one at fault is dead."""
        return list(call.parts)


def refiner_loop(
    outbox: Store,
    api: RefinerApi,
    *,
    rules: MappingRules = MappingRules(),  # noqa: B008 - frozen, shared safely
    concurrency: int = 4,
    batch_size: int = 200,
    lease_seconds: float = 60.0,
    idle_poll: float = 0.2,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> Loop:
    """The delivery loop to Refiner."""
    destination = ToRefiner(api, rules, concurrency)
    return Loop(outbox, destination, batch_size=batch_size, lease_seconds=lease_seconds, idle_poll=idle_poll, backoff=backoff)
