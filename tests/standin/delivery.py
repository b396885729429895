"""The stand-in's delivery: each stored event is one call, kept in SENT instead of sent anywhere."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from refiner_source.delivery.destination import Call
from refiner_source.delivery.loop import Loop
from refiner_source.store import Claimed, DeadLetter

NAME = "standin"
SENT: list[Any] = []


class StandIn:
    name = NAME
    title = "Stand-in"
    id_name = "id"
    key_hint = "check STANDIN_KEY"
    contact_order = False
    concurrency = 1

    def plan(self, claimed: Sequence[Claimed]) -> tuple[list[list[Call]], list[DeadLetter]]:
        return [[Call(json.loads(c.event), (c,), message_id=c.source_id, kind="call")] for c in claimed], []

    def send(self, call: Call) -> None:
        SENT.append(call.body)

    def split(self, call: Call) -> list[Call]:
        return []

    def describe(self) -> dict[str, Any]:
        return {"host": "nowhere"}

    def people(self, claim: Claimed) -> frozenset[tuple[str, str]]:
        from tests.standin.people import people_of_stored

        return people_of_stored(claim.event)


def build_loop(settings, outbox) -> Loop:
    return Loop(outbox, StandIn(), batch_size=10, idle_poll=0.01)


def preview(stored: str | None, _generation: str | None, _created_at: float, _rules) -> list[dict[str, Any]]:
    return [] if stored is None else [{"call": json.loads(stored)}]
