"""What every destination's delivery worker does: claim rounds until stopped, back off when the
store or the destination fails, and settle each round's events in one transaction."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from refiner_source.delivery.backoff import Backoff
from refiner_source.directions import SEGMENT
from refiner_source.ops.tally import DELIVERY, Tally
from refiner_source.store import Claimed, DeadLetter, Outbox, StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_BACKOFF = Backoff(base=0.5, cap=60.0)


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

    def _out_of_time(self, outcome: Round) -> bool:
        return self._stopping or time.monotonic() > outcome.send_until

    def _bump(self) -> int:
        self._failures += 1
        return self._failures - 1


def received_times(claimed: Sequence[Claimed]) -> dict[int, float]:
    """When each event was put in line (received, or replayed): what its delivery latency counts from."""
    return {c.id: c.queued_at or c.created_at for c in claimed}


@dataclass
class Round:
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

    def release(self, chunks: Sequence[Sequence[Any]], delay: float, error: str) -> None:
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
