"""The delivery worker to Refiner: claim stored Segment events, map them, call Refiner's REST API
with a few requests in flight, one contact's calls in order, retry, dead-letter (SPEC section 7)."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from refiner_source.config import MappingRules
from refiner_source.delivery.backoff import Backoff
from refiner_source.delivery.loop import DEFAULT_BACKOFF, Loop, Round, received_times
from refiner_source.directions import REFINER
from refiner_source.refiner_rest import RefinerApi, Rejected, RetryLater
from refiner_source.store import Claimed, DeadLetter, Outbox
from refiner_source.to_refiner.mapping import RefinerCall, merge, mergeable, to_refiner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One request: a call, and the events it delivers (several when identifies were merged)."""

    call: RefinerCall
    events: tuple[Claimed, ...]
    parts: tuple[RefinerCall, ...] = ()  # of a merged call: each event's own call, in order


@dataclass
class ContactResult:
    """What became of one contact's steps in a round (filled in by the thread that sent them)."""

    dead: list[DeadLetter] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # events to give back, in order
    retry: RetryLater | None = None  # why they are given back (None: out of time)
    attempts: int = 0  # tries so far of the first event given back: its backoff exponent
    progress: bool = False  # a call of this contact was answered (delivered or refused)


def plan(claimed: Sequence[Claimed], rules: MappingRules) -> tuple[list[list[Step]], list[DeadLetter], list[int]]:
    """(steps per contact, in order; events that cannot be mapped; events with nothing to send).

    Identify calls of one contact that wait together, one after the other, become one call
    (an Engage first sync sends one identify per audience and user)."""
    contacts: dict[str | None, list[Step]] = {}
    dead: list[DeadLetter] = []
    empty: list[int] = []
    for claim in claimed:
        try:
            calls = to_refiner(json.loads(claim.event or "null"), rules)
        except Exception as exc:  # a bug, or an event stored by another version: keep it, say so
            dead.append(DeadLetter(claim.id, claim.response_id, None, f"cannot be mapped: {type(exc).__name__}: {exc}"))
            log.exception("an event could not be mapped; kept as a dead letter", extra={"message_id": claim.response_id, "outcome": "dead"})
            continue
        if not calls:  # the mapping file changed since it was accepted (an allowlist, page_event)
            empty.append(claim.id)
            continue
        steps = contacts.setdefault(claim.contact, [])
        for call in calls:
            last = steps[-1] if steps else None
            if last is not None and mergeable(last.call, call):
                parts = (*(last.parts or (last.call,)), call)
                steps[-1] = Step(merge(list(parts)), (*last.events, claim), parts)
            else:
                steps.append(Step(call, (claim,)))
    return list(contacts.values()), dead, empty


class RefinerWorker(Loop):
    """Sends what the outbox holds for Refiner, `concurrency` requests at a time."""

    destination = REFINER

    def __init__(
        self,
        outbox: Outbox,
        api: RefinerApi,
        *,
        rules: MappingRules = MappingRules(),  # noqa: B008 - frozen, shared safely
        concurrency: int = 4,
        batch_size: int = 200,
        lease_seconds: float = 60.0,
        idle_poll: float = 0.2,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        super().__init__(outbox, batch_size=batch_size, lease_seconds=lease_seconds, idle_poll=idle_poll, backoff=backoff)
        self.api = api
        self.rules = rules
        self.concurrency = concurrency
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="refiner-api")

    def describe(self) -> dict[str, object]:
        return {"refiner_api_url": self.api.base_url, "concurrency": self.concurrency}

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.pool.shutdown(wait=True)

    def idle_wait(self) -> float:
        # A due event may be waiting behind an earlier one of its contact: no faster than idle_poll.
        return max(super().idle_wait(), self.idle_poll)

    def run_once(self) -> float:
        claimed = self.outbox.claim(REFINER, self.batch_size, self.lease_seconds, self.name, contact_order=True)
        if not claimed:
            return self.idle_wait()
        outcome = Round(
            {c.id: c.response_id for c in claimed},
            time.monotonic() + self.lease_seconds / 2,
            destination=REFINER,
            id_name="message_id",
            tally=self.tally,
            received=received_times(claimed),
        )
        try:
            contacts, outcome.dead, _nothing_to_send = plan(claimed, self.rules)
            results = list(self.pool.map(lambda steps: self._send_contact(steps, outcome), contacts))
            return self._conclude(results, outcome, full=len(claimed) >= self.batch_size)
        except BaseException as exc:  # whatever it is, what was learnt is kept and the rest handed back
            dead = {d.event_id for d in outcome.dead}
            outcome.release_events((i for i in outcome.claimed if i not in dead), 0.0, f"handed back: {type(exc).__name__}")
            raise
        finally:
            outcome.settle(self.outbox, self.name)

    def _conclude(self, results: list[ContactResult], outcome: Round, full: bool) -> float:
        """Settle what each contact's thread learnt. A contact told "not now" waits by Retry-After
        or by its own backoff (its events' attempts so far); the other contacts go on. The loop
        itself waits only when no contact got anywhere (Refiner down, rate-limited, key refused)."""
        self._failures = 0  # the store answered: the loop's own backoff starts again
        delays: list[float] = []
        for result in results:
            outcome.dead.extend(result.dead)
            if result.retry is None:  # out of time: handed back, to be claimed again at once
                outcome.release_events(result.unsent, 0.0, "handed back unsent")
                continue
            delay = result.retry.delay if result.retry.delay is not None else self.backoff.delay(result.attempts)
            outcome.release_events(result.unsent, delay, result.retry.reason)
            delays.append(delay)
        retries = [r.retry for r in results if r.retry is not None]
        if not retries:
            return 0.0 if full or any(r.unsent for r in results) else self.idle_poll
        stuck = all(r.retry is not None and not r.progress for r in results)
        delay = min(delays)
        first = next((r for r in retries if r.key_problem), retries[0])
        unsent = sum(len(r.unsent) for r in results)
        if first.key_problem:
            log.error(
                f"Refiner refused REFINER_API_KEY (HTTP {first.status}): check that it is your project's API key; will retry",
                extra={"status": first.status, "events": unsent, "retry_in": round(delay, 2), "outcome": "retry"},
            )
        else:
            what = "Refiner not reachable now" if first.status is None else f"Refiner answered HTTP {first.status}"
            log.warning(
                f"{what}; will retry",
                extra={"reason": first.reason, "status": first.status, "events": unsent, "retry_in": round(delay, 2), "outcome": "retry"},
            )
        return delay if stuck else (0.0 if full else self.idle_poll)

    def _send_contact(self, steps: list[Step], outcome: Round) -> ContactResult:
        """One contact's steps in order (in a pool thread). On "not now" the rest of this contact
        waits too, so that its calls never overtake one another; a merged call Refiner refuses
        is sent again call by call, so that only the event at fault is a dead letter."""
        result = ContactResult()
        queue = deque(steps)
        while queue:
            if self._out_of_time(outcome):
                break
            step = queue[0]
            try:
                self.api.send(step.call)
            except RetryLater as exc:
                result.retry = exc
                result.attempts = min(claim.attempts for claim in step.events)
                break
            except Rejected as exc:
                result.progress = True
                queue.popleft()
                if len(step.events) > 1:
                    queue.extendleft(reversed([Step(part, (claim,)) for part, claim in zip(step.parts, step.events, strict=True)]))
                    continue
                claim = step.events[0]
                result.dead.append(DeadLetter(claim.id, claim.response_id, step.call.path, exc.detail))
                log.error(
                    "Refiner refused a call; kept as a dead letter",
                    extra={"message_id": claim.response_id, "status": exc.status, "outcome": "dead"},
                )
                continue
            result.progress = True
            queue.popleft()
        result.unsent = [claim.id for step in queue for claim in step.events]
        return result
