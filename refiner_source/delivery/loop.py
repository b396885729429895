"""One delivery loop for every destination: claim stored events, have the destination map them
into calls, send the calls, and settle what became of each event in one transaction.

What is written once, here: claims and their lease, SIGTERM and the lease running out (what is
not sent is handed back), which answers are retried (RetryLater, with Retry-After or backoff by
the event's attempts), dead letters (Rejected, on the one call at fault: a call of several events
or messages is split and sent again), one contact's calls in order (lanes), and the counts.

What a destination supplies (`Destination`): its mapping (claimed events -> lanes of calls), its
API call (`send`), and how a refused call of several parts is split.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from refiner_source.delivery.answers import Rejected, RetryLater
from refiner_source.delivery.backoff import Backoff
from refiner_source.delivery.destination import Call, Destination
from refiner_source.delivery.window import Window
from refiner_source.privacy import Suppressed
from refiner_source.store import Claimed, DeadLetter, Store, StoreUnavailable
from refiner_source.store.tally import DELIVERY, Tally

log = logging.getLogger(__name__)

DEFAULT_BACKOFF = Backoff(base=0.5, cap=60.0)


@dataclass
class LaneResult:
    """What became of one lane in a round (filled in by the thread that sent it)."""

    dead: list[DeadLetter] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # events to give back, in order
    retry: RetryLater | None = None  # why they are given back (None: out of time)
    attempts: int = 0  # tries so far of the first event given back: its backoff exponent
    progress: bool = False  # a call of this lane was answered (taken or refused)
    unsent_calls: int = 0


class Loop:
    """Claims rounds for one destination until `stop()` (or SIGTERM), backing off when the store
    or the destination fails."""

    def __init__(
        self,
        outbox: Store,
        destination: Destination,
        *,
        batch_size: int,
        lease_seconds: float = 60.0,
        idle_poll: float = 0.2,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self.outbox = outbox
        self.to = destination  # what the events are sent to: its mapping and its API
        self.destination = destination.name
        self.batch_size = batch_size  # events per claim
        self.lease_seconds = lease_seconds
        self.idle_poll = idle_poll
        self.backoff = backoff
        self.name = f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xFFFF:x}"
        self._stopping = False
        self._failures = 0  # consecutive failed rounds (the store, a bug, or a one-lane destination): the loop's backoff
        self.tally = Tally(outbox, background=False)  # what it delivered, added to the store after each round
        self.suppressed: Suppressed | None = None  # set: events of people on the suppression list are dropped, not sent
        # The calls in flight at once: as many as the destination takes quickly, up to its concurrency.
        self.window = Window(destination.concurrency)
        self.pool = (
            ThreadPoolExecutor(destination.concurrency, thread_name_prefix=f"to-{self.destination}")
            if destination.concurrency > 1
            else None
        )

    def stop(self, *_args: object) -> None:
        # A plain flag, no lock: stop() is a signal handler, and Python runs handlers in the main
        # thread wherever it is, also inside Event.wait() holding the Event's lock, where Event.set()
        # would wait for itself forever (`worker`, with the Refiner loop's threads, would hang on SIGTERM).
        self._stopping = True

    def run(self) -> None:
        log.info("delivery worker started", extra={"worker": self.name, "destination": self.destination, **self.to.describe()})
        try:
            while not self._stopping:
                try:
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
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
        log.info("delivery worker stopped", extra={"worker": self.name, "destination": self.destination})

    def run_once(self) -> float:
        """Claim events, map them, send their calls; return how long to sleep before the next round."""
        claimed = self.outbox.claim(self.destination, self.batch_size, self.lease_seconds, self.name, contact_order=self.to.contact_order)
        if not claimed:
            return self.idle_wait()
        outcome = Round(
            {c.id: c.source_id for c in claimed},
            time.monotonic() + self.lease_seconds / 2,
            self.destination,
            self.tally,
            received={c.id: c.queued_at or c.created_at for c in claimed},
            id_name=self.to.id_name,
        )
        try:
            if self.suppressed is not None and self.suppressed.active():
                claimed = drop_forgotten(self, claimed)
                kept = {c.id for c in claimed}
                outcome.claimed = {i: source for i, source in outcome.claimed.items() if i in kept}  # the erased are not settled
                if not claimed:  # all erased: claim again at once
                    return 0.0
            lanes, outcome.dead = self.to.plan(claimed)
            if self.pool is not None and len(lanes) > 1:
                results = list(self.pool.map(lambda lane: self._send_lane(lane, outcome), lanes))
            else:
                results = [self._send_lane(lane, outcome) for lane in lanes]
            return self._conclude(results, outcome, full=len(claimed) >= self.batch_size)
        except BaseException as exc:  # whatever it is, what was learnt is kept and the rest handed back
            dead = {d.event_id for d in outcome.dead}
            outcome.release_events((i for i in outcome.claimed if i not in dead), 0.0, f"handed back: {type(exc).__name__}")
            raise
        finally:
            outcome.settle(self.outbox, self.name)

    def idle_wait(self) -> float:
        """Nothing claimed: sleep until the next event is due, checking at least every `idle_poll * 5`;
        no faster than idle_poll where a due event may wait behind an earlier one of its contact."""
        due = self.outbox.next_due_in(self.destination)
        wait = self.idle_poll if due is None else min(max(due, 0.01), self.idle_poll * 5)
        return max(wait, self.idle_poll) if self.to.contact_order else wait

    def _send_lane(self, lane: list[Call], outcome: Round) -> LaneResult:
        """One lane's calls in order. On "not now" the rest of the lane waits too, so that its calls
        never overtake one another; a refused call of several parts is split and its parts sent,
        so that only the event at fault is a dead letter."""
        result = LaneResult()
        queue = deque(lane)
        while queue:
            # SIGTERM, or a slow destination eating into the lease: the call in flight is finished,
            # the rest handed back before another worker could claim it too.
            if self._out_of_time(outcome):
                break
            call = queue[0]
            try:
                self.window.run(self.to.send, call)
            except RetryLater as exc:
                result.retry = exc
                result.attempts = min(claim.attempts for claim in call.events)
                break
            except Rejected as exc:
                result.progress = True
                queue.popleft()
                parts = self.to.split(call)
                if parts:
                    queue.extendleft(reversed(parts))
                    continue
                for claim in call.events:
                    result.dead.append(DeadLetter(claim.id, call.message_id, call.kind, exc.detail))
                    log.error(
                        f"{self.to.title} refused a call; kept as a dead letter",
                        extra={
                            self.to.id_name: claim.source_id,
                            "status": exc.status,
                            "destination": self.destination,
                            "outcome": "dead",
                        },
                    )
                continue
            result.progress = True
            queue.popleft()
        result.unsent = list(dict.fromkeys(claim.id for call in queue for claim in call.events))
        result.unsent_calls = len(queue)
        return result

    def _conclude(self, results: list[LaneResult], outcome: Round, full: bool) -> float:
        """Settle what each lane learnt. A lane of one contact told "not now" waits by Retry-After or
        by its own backoff (its events' attempts so far), and the other lanes go on; the loop itself
        waits only when no lane got anywhere (the destination down, rate-limiting, or refusing the
        key). A destination of one lane (Segment: batches of any events) backs off as a whole, by the
        loop's consecutive failed rounds, and waits whatever the round delivered before it failed."""
        per_contact = self.to.contact_order
        if per_contact or not any(r.retry for r in results):
            self._failures = 0  # the store answered; a one-lane destination took everything
        delays: list[float] = []
        for result in results:
            outcome.dead.extend(result.dead)
            if result.retry is None:  # out of time: handed back, to be claimed again at once
                outcome.release_events(result.unsent, 0.0, "handed back unsent")
                continue
            attempts = result.attempts if per_contact else self._bump()
            delay = result.retry.delay if result.retry.delay is not None else self.backoff.delay(attempts)
            outcome.release_events(result.unsent, delay, result.retry.reason)
            delays.append(delay)
        retries = [r.retry for r in results if r.retry is not None]
        if not retries:
            return 0.0 if full or any(r.unsent for r in results) else self.idle_poll
        stuck = not per_contact or all(r.retry is not None and not r.progress for r in results)
        delay = min(delays)
        first = next((r for r in retries if r.key_problem), retries[0])
        extra = {
            "reason": first.reason,
            "status": first.status,
            "events": sum(len(r.unsent) for r in results),
            "calls": sum(r.unsent_calls for r in results),
            "retry_in": round(delay, 2),
            "destination": self.destination,
            "outcome": "retry",
        }
        title = self.to.title
        if first.key_problem:
            log.error(f"{title} answered HTTP {first.status}; will retry: {self.to.key_hint}", extra=extra)
        else:
            what = f"{title} not reachable now" if first.status is None else f"{title} answered HTTP {first.status}"
            log.warning(f"{what}; will retry", extra=extra)
        return delay if stuck else (0.0 if full else self.idle_poll)

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


def drop_forgotten(loop: Loop, claimed: list[Claimed]) -> list[Claimed]:
    """Belt and braces: a claimed event of a person on the suppression list (stored before the list
    reached this process, or replayed) is erased, not sent; the rest of the claim goes on."""
    assert loop.suppressed is not None
    forgotten = {c.id for c in claimed if _forgotten(loop, c)}
    if not forgotten:
        return claimed
    dropped = loop.outbox.drop_claimed(sorted(forgotten), loop.name)
    log.info("dropped events of forgotten people", extra={"events": dropped, "destination": loop.destination, "outcome": "forgotten"})
    return [c for c in claimed if c.id not in forgotten]


def _forgotten(loop: Loop, claim: Claimed) -> bool:
    try:
        people = loop.to.people(claim)
    except (ValueError, TypeError, AttributeError):  # unreadable: planning makes it a dead letter, as before
        return False
    return loop.suppressed is not None and loop.suppressed.forgotten(people)


@dataclass
class Round:
    """One claim: its events (id -> the id its source gave it), when it must stop sending, and what
    became of its events, written in one transaction at the end."""

    claimed: dict[int, str]
    send_until: float  # time.monotonic()
    destination: str
    tally: Tally | None = None
    received: dict[int, float] = field(default_factory=dict)  # event -> when it was put in line (latency)
    dead: list[DeadLetter] = field(default_factory=list)
    released: dict[int, tuple[float, str]] = field(default_factory=dict)  # event -> (delay, error)
    id_name: str = "event"  # what the claimed ids are called in the log

    def release_events(self, event_ids: Iterable[int], delay: float, error: str) -> None:
        for event_id in event_ids:
            self.released.setdefault(event_id, (delay, error))

    def settle(self, outbox: Store, worker: str) -> None:
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
            log.info("delivered", extra={self.id_name: self.claimed[event_id], "outcome": "delivered", "destination": where})
