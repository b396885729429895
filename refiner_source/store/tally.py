"""Counting what comes in and goes out, per process, into the store's per-minute traffic counts.

Each process (a gunicorn worker, the delivery worker) counts in memory and adds its counts to the
store once a second, in one small transaction, off the request path; `/metrics` and `/status`
read the sums, so they agree across processes and dynos. A process killed with SIGKILL loses at
most its last second of counts (never an event: those are in the store before the answer).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import Counter
from typing import TYPE_CHECKING

from refiner_source.store.errors import StoreUnavailable

if TYPE_CHECKING:
    from refiner_source.store import Store

log = logging.getLogger(__name__)

# Webhook to delivery latency, seconds: the histogram's upper bounds (+Inf is implied).
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
WEBHOOK, DELIVERY, LATENCY = "webhook", "delivery", "latency"


def latency_bucket(seconds: float) -> str:
    """The outcome under which one latency is counted: its bucket's upper bound ("le_0.5" ...)."""
    for bound in LATENCY_BUCKETS:
        if seconds <= bound:
            return f"le_{bound:g}"
    return "le_inf"


class Tally:
    """Counts of one process. `background`: a thread adds them to the store every `every` seconds
    (the web app); otherwise the owner calls flush() (the delivery worker, after each round)."""

    def __init__(self, outbox: Store, every: float = 1.0, background: bool = True) -> None:
        self.outbox = outbox
        self.every = every
        self.background = background
        self._counts: Counter[tuple[int, str, str, str]] = Counter()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, kind: str, name: str, outcome: str, n: int = 1) -> None:
        if n <= 0:
            return
        key = (int(time.time() // 60), kind, name, outcome)
        with self._lock:
            self._counts[key] += n
            if self.background and (self._thread is None or self._pid != os.getpid()):  # first count, or forked since
                self._pid = os.getpid()
                # The thread and the exit hook hold the tally weakly: an app that goes away (tests make
                # many) takes its tally, its store and its database connections with it.
                me = weakref.ref(self)
                self._thread = threading.Thread(target=_flush_forever, args=(me, self.every), name="tally", daemon=True)
                self._thread.start()
                atexit.register(_flush_if_alive, me)

    def latency(self, name: str, seconds: float) -> None:
        self.add(LATENCY, name, latency_bucket(seconds))
        self.add(LATENCY, name, "sum_ms", max(0, round(seconds * 1000)))

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if not counts:
            return
        try:
            self.outbox.add_traffic(dict(counts))
        except StoreUnavailable as exc:  # the store is down: keep them for the next try
            with self._lock:
                self._counts.update(counts)
            log.warning("could not save traffic counts; will retry", extra={"error": str(exc)})
        except Exception:  # anything else would fail again: dropped, so that later counts still get saved
            log.exception("traffic counts could not be saved and were dropped")


def _flush_if_alive(ref: weakref.ref[Tally]) -> None:
    tally = ref()
    if tally is not None:
        tally.flush()


def _flush_forever(ref: weakref.ref[Tally], every: float) -> None:
    while True:
        time.sleep(every)
        tally = ref()
        if tally is None:
            return
        tally.flush()
        del tally
