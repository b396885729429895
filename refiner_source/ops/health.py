"""Whether a direction's delivery has stalled, and the hint that says so: one text for `refiner-source
status` and the /status page (pure: no Flask, no click, no store)."""

from __future__ import annotations

from refiner_source.directions import DIRECTIONS

STALLED_AFTER = 60.0  # seconds; a healthy worker's longest backoff between tries is 60 s


def stalled_for(stats) -> float | None:
    """Seconds without a delivery while the oldest message has waited longer than STALLED_AFTER; else None."""
    waited = stats.oldest_pending_age
    if not stats.pending or waited is None or waited < STALLED_AFTER:
        return None
    if stats.last_delivered_age is not None and stats.last_delivered_age < STALLED_AFTER:
        return None
    return waited if stats.last_delivered_age is None else min(waited, stats.last_delivered_age)


def stalled_hint(stats, destination: str) -> str | None:
    """What to check when a direction has stalled (commands in backquotes); None while it has not."""
    stalled = stalled_for(stats)
    if stalled is None:
        return None
    target = DIRECTIONS[destination].target
    return (
        f"nothing delivered for {stalled:.0f}s while {stats.pending} event(s) wait: is a delivery worker running "
        f"(`refiner-source serve` runs one; `refiner-source worker` runs one alone), and can it reach {target} (see its log)?"
    )
