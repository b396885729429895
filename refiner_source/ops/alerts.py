"""Alerts to a Slack-compatible incoming webhook (ALERT_WEBHOOK_URL): dead letters, a stuck direction, its recovery.

The delivery worker calls `Alerts.check_if_due()` before its rounds. What was last sent lives in
the store (`refiner_alerts`), so the rule "at most one message of a kind per 15 minutes" holds
across every worker process and dyno, and of two workers that see the same change only the one
that wins the store's compare-and-set sends. A message holds counts, ages, the direction and the
command to run; never an answer, an email or an error text (a destination's error may quote the data).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from refiner_source.directions import DIRECTIONS, REFINER, SEGMENT
from refiner_source.store import Stats, Store

log = logging.getLogger(__name__)

QUIET_SECONDS = 900.0  # at most one message of a kind (per direction) in this long
CHECK_EVERY = 30.0  # seconds between checks at most; less when ALERT_PENDING_SECONDS is short
POST_TIMEOUT = 5.0
DEAD, STUCK, RECOVERED = "dead", "stuck", "recovered"


def post_json(url: str, payload: dict[str, Any]) -> None:
    """POST the message as an incoming webhook takes it; any answer but 2xx is a failure."""
    answer = requests.post(url, json=payload, timeout=POST_TIMEOUT)
    answer.raise_for_status()


@dataclass(frozen=True)
class _State:
    value: int
    sent_at: float
    version: int


class Alerts:
    """Looks at both directions' counts and sends what an operator must know, once."""

    def __init__(
        self,
        outbox: Store,
        url: str,
        pending_seconds: float = 900,
        *,
        clock: Callable[[], float] = time.time,
        post: Callable[[str, dict[str, Any]], None] = post_json,
        every: float | None = None,
        destinations: tuple[str, ...] = (SEGMENT, REFINER),
    ) -> None:
        self.outbox = outbox
        self.url = url
        self.pending_seconds = pending_seconds
        self.clock = clock
        self.post = post
        # A third of the threshold, so a short one is still noticed about on time; 30 s at most.
        self.every = min(CHECK_EVERY, pending_seconds / 3) if every is None else every
        self.destinations = destinations
        self._next_check = float("-inf")  # the first round checks at once

    def check_if_due(self) -> list[str]:
        """check(), if `every` seconds have passed since the last one. Never raises: an alert that
        cannot be checked or sent must not stop delivery (it is logged, and tried again later)."""
        now = self.clock()
        if now < self._next_check:
            return []
        self._next_check = now + self.every
        try:
            return self.check()
        except Exception as exc:
            log.warning("could not check for alerts; will try again", extra={"error": f"{type(exc).__name__}: {exc}"})
            return []

    def check(self) -> list[str]:
        """Look at each direction now and send what is due; the texts sent."""
        sent: list[str] = []
        for destination in self.destinations:
            stats = self.outbox.stats(destination)
            kinds = {kind: f"{kind}:{destination}" for kind in (DEAD, STUCK, RECOVERED)}
            rows = self.outbox.alert_states(list(kinds.values()))
            states = {kind: _State(*rows[key]) for kind, key in kinds.items()}
            now = self.clock()
            for text in (self._dead(destination, stats, states, kinds, now), self._pending(destination, stats, states, kinds, now)):
                if text is not None:
                    sent.append(text)
        return sent

    def _dead(self, destination: str, stats: Stats, states: dict[str, _State], kinds: dict[str, str], now: float) -> str | None:
        """Dead letters more than when last alerted: one message, then none for 15 minutes (the
        next one counts everything that died meanwhile)."""
        state, key = states[DEAD], kinds[DEAD]
        if stats.dead < state.value:  # replayed or purged: count new dead letters from here
            self.outbox.swap_alerts({key: (state.version, stats.dead, state.sent_at)})
            return None
        if stats.dead == state.value or now - state.sent_at < QUIET_SECONDS:
            return None
        name, target = DIRECTIONS[destination].title, DIRECTIONS[destination].target
        new = stats.dead - state.value
        text = (
            f":x: refiner-source, {name}: {_count(new, 'new dead letter')} ({stats.dead} in all), "
            f"not delivered to {target} and not retried on their own. "
            f"See why with `refiner-source status --to {destination}`; once the cause is fixed, "
            f"`refiner-source replay --to {destination}` sends them again."
        )
        claim = {key: (state.version, stats.dead, now)}
        undo = {key: (state.version + 1, state.value, state.sent_at)}
        return self._send(DEAD, destination, claim, undo, text)

    def _pending(self, destination: str, stats: Stats, states: dict[str, _State], kinds: dict[str, str], now: float) -> str | None:
        """The oldest pending event older than ALERT_PENDING_SECONDS: "stuck", once; back under it
        (or nothing pending) after a stuck message: "recovered", once."""
        stuck, recovered = states[STUCK], states[RECOVERED]
        age = stats.oldest_pending_age
        over = bool(stats.pending) and age is not None and age > self.pending_seconds
        name, target = DIRECTIONS[destination].title, DIRECTIONS[destination].target
        if over and not stuck.value and now - stuck.sent_at >= QUIET_SECONDS:
            text = (
                f":warning: refiner-source, {name}: delivery to {target} is stuck: the oldest of "
                f"{_count(stats.pending, 'pending event')} has waited {_duration(age)} "
                f"(ALERT_PENDING_SECONDS: {_duration(self.pending_seconds)}). "
                f"See `refiner-source status --to {destination}` and the delivery worker's log."
            )
            claim = {kinds[STUCK]: (stuck.version, 1, now)}
            undo = {kinds[STUCK]: (stuck.version + 1, stuck.value, stuck.sent_at)}
            return self._send(STUCK, destination, claim, undo, text)
        if not over and stuck.value and now - recovered.sent_at >= QUIET_SECONDS:
            waiting = (
                f"{_count(stats.pending, 'event')} pending, the oldest {_duration(age)} old"
                if stats.pending and age is not None
                else "nothing pending"
            )
            text = f":white_check_mark: refiner-source, {name}: delivery to {target} has recovered: {waiting}."
            claim = {kinds[STUCK]: (stuck.version, 0, stuck.sent_at), kinds[RECOVERED]: (recovered.version, 0, now)}
            undo = {
                kinds[STUCK]: (stuck.version + 1, stuck.value, stuck.sent_at),
                kinds[RECOVERED]: (recovered.version + 1, recovered.value, recovered.sent_at),
            }
            return self._send(RECOVERED, destination, claim, undo, text)
        return None

    def _send(self, kind: str, destination: str, claim: dict, undo: dict, text: str) -> str | None:
        """Take the right to send (another worker may have it), send; if sending fails, give the
        right back, so the next check tries again."""
        if not self.outbox.swap_alerts(claim):
            return None
        try:
            self.post(self.url, {"text": text})
        except Exception as exc:
            # Never the URL, which is the webhook's secret (requests' errors quote it).
            log.warning("could not send an alert; will retry", extra={"alert": kind, "destination": destination, "error": _reason(exc)})
            self.outbox.swap_alerts(undo)
            return None
        log.info("alert sent", extra={"alert": kind, "destination": destination})
        return text


def _reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code}"
    return type(exc).__name__


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"
