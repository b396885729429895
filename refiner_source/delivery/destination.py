"""What a destination supplies to the delivery loop (`Destination`), and the calls it plans (`Call`).
`send` answers in the words of refiner_source.delivery.answers (RetryLater, Rejected)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from refiner_source.store import Claimed, DeadLetter


@dataclass(frozen=True)
class Call:
    """One request to a destination: what it sends, and the events it delivers."""

    body: Any
    events: tuple[Claimed, ...]
    message_id: str | None = None  # of a call that is one message: what its dead letter names
    kind: str | None = None  # what sort of call (a Segment message type, a Refiner API path)
    parts: tuple[Call, ...] = ()  # of a call made of several (merged calls): what split() may send instead


class Destination(Protocol):
    """What a destination supplies to the loop."""

    name: str  # the destination its events are stored under
    title: str  # who answers, in the log ("Segment", "Refiner")
    id_name: str  # what the id its source gave an event is called in the log ("response_id", "message_id")
    key_hint: str  # what to check when it refuses a setting (the credentials, the address)
    contact_order: bool  # claim one contact's events in order, never past an earlier one waiting
    concurrency: int  # the most lanes sent at once (the window's ceiling, delivery/window.py)

    def plan(self, claimed: Sequence[Claimed]) -> tuple[list[list[Call]], list[DeadLetter]]:
        """The calls of the claimed events, in lanes (each lane in order; lanes independent), and
        the events that cannot be mapped (dead at once). An event in neither is delivered."""

    def send(self, call: Call) -> None:
        """Returns when the destination took the call; raises RetryLater or Rejected."""

    def split(self, call: Call) -> list[Call]:
        """The smaller calls to send instead of a refused one ([]: it is one, and at fault)."""

    def describe(self) -> dict[str, Any]:
        """What the start-up log line says of it (host, concurrency)."""

    def people(self, claim: Claimed) -> frozenset[tuple[str, str]]:
        """Whom a claimed event concerns: (kind, normalised identifier) pairs (refiner_source.privacy)."""
