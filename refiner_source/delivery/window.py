"""How many calls a destination is sent at once: a window that grows while its calls succeed
quickly and halves when it pushes back (additive increase, multiplicative decrease: TCP's
congestion control), between 1 and a ceiling (the destination's `concurrency`).

- A call that succeeds within twice the latency the destination usually answers in adds 1/limit:
  one more call in flight for each window's worth of quick successes.
- A 429 or a 503 (the destination says "slow down"), or a success slower than that, halves it;
  but not the answer to a call that had started before the last halving: the calls in flight then
  come back with the same news.
- Any other failure (a network error, a refusal) says nothing of the rate: the window stays.

The usual latency is the lowest seen lately: it follows a faster answer at once and a slower one
by 1 % a call, so that a destination that has become slower for good is not halved for ever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from refiner_source.delivery.answers import RetryLater

PUSHBACK = frozenset({429, 503})  # the statuses by which a destination says "slow down"
START = 4  # calls in flight at first (the window before anything is known of the destination)
SLOWER = 2.0  # a success this many times slower than usual counts as pushback
SLACK = 0.005  # seconds: latencies this close to the usual one are noise, not pushback
DRIFT = 0.01  # how fast the usual latency follows a slower one


class Window:
    """The calls a loop's lanes may have in flight at once. Thread-safe: every lane asks."""

    def __init__(self, ceiling: int, start: int = START, clock: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = max(1, ceiling)
        self.limit = float(min(max(1, start), self.ceiling))
        self.in_flight = 0
        self.usual: float | None = None  # seconds
        self.halved = 0  # times halved so far
        self._halved_at = float("-inf")
        self._clock = clock
        self._turn = threading.Condition()

    def run(self, send: Callable[[Any], None], call: Any) -> None:
        """send(call) once the window has room for it; how it went widens or narrows the window.
        What it raises (RetryLater, Rejected) passes on."""
        started = self.acquire()
        ok = pushback = False
        try:
            send(call)
            ok = True
        except RetryLater as exc:
            pushback = exc.status in PUSHBACK
            raise
        finally:
            self.release(started, ok=ok, pushback=pushback)

    def acquire(self) -> float:
        """Wait for a place in the window; the time the call starts (hand it to release)."""
        with self._turn:
            while self.in_flight >= int(self.limit):
                self._turn.wait()
            self.in_flight += 1
        return self._clock()

    def release(self, started: float, *, ok: bool, pushback: bool = False) -> None:
        """The call that `acquire` let start has ended: a success (`ok`), the destination pushing
        back (429, 503), or neither."""
        now = self._clock()
        latency = now - started
        with self._turn:
            self.in_flight -= 1
            slow = ok and self.usual is not None and latency > self.usual * SLOWER + SLACK
            if ok:
                self.usual = latency if self.usual is None or latency < self.usual else self.usual + (latency - self.usual) * DRIFT
            if (pushback or slow) and started >= self._halved_at:
                self.limit = max(1.0, self.limit / 2)
                self.halved += 1
                self._halved_at = now
            elif ok and not slow:
                self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)
            self._turn.notify_all()
