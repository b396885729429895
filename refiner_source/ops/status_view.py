"""What the /status page shows of each direction, read from the store, and the few ways it words
times, ages, counts and errors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from markupsafe import Markup, escape

from refiner_source.config import Settings
from refiner_source.directions import DIRECTIONS
from refiner_source.ops.chart import Chart, Range, chart
from refiner_source.ops.health import stalled_hint
from refiner_source.store import Stats, Store
from refiner_source.store.dead import DeadEvent
from refiner_source.store.tally import DELIVERY, WEBHOOK

WEBHOOK_OUTCOMES = ("accepted", "duplicate", "ignored", "rejected", "unavailable")
DELIVERY_OUTCOMES = ("delivered", "dead", "retry")
DEAD_LISTED = 20  # dead events listed per direction; "replay all" takes every one


@dataclass
class Direction:
    destination: str
    title: str
    source: str
    on: bool
    turned_on_by: tuple[str, ...]  # the variables that turn it on, named while it is off
    stats: Stats
    hour: dict[str, int]
    day: dict[str, int]
    dead_events: list[DeadEvent]
    dead_messages: int  # dead letters (messages) of all its dead events
    last_error: str | None
    last_error_at: float | None
    recovered_at: float | None  # the newest delivery, when it came after the last error
    stalled: str | None  # what to check, while nothing is delivered and events wait
    chart: Chart
    ever: bool  # anything received or delivered since the store began

    @property
    def holds_events(self) -> bool:
        return bool(self.stats.pending or self.stats.delivered or self.stats.dead)

    @property
    def health(self) -> tuple[str, str]:
        """(a word or two for the page's summary, "ok" or "bad")."""
        if not self.on:
            return "off", "muted"
        if self.stalled:
            return "stalled", "bad"
        if self.stats.dead:
            return plural(self.stats.dead, "dead event"), "bad"
        if self.last_error and self.recovered_at is None and self.stats.pending:
            return "retrying", "bad"
        return "ok", "ok"


def directions(outbox: Store, settings: Settings, now: float, chosen: Range) -> list[Direction]:
    minute = int(now // 60)
    hour = outbox.traffic_totals(since_minute=minute - 59)
    day = outbox.traffic_totals(since_minute=minute - (24 * 60 - 1))
    ever = outbox.traffic_totals()
    found = []
    for destination, names in DIRECTIONS.items():
        source = names.source
        error_text, error_at = outbox.last_error(destination)
        delivered_at = outbox.last_delivered_at(destination)
        stats = outbox.stats(destination)
        start = minute - (chosen.minutes - 1) - chosen.bin  # a bin's worth more: the first bin starts on the clock
        received = outbox.traffic_per_minute(WEBHOOK, source, WEBHOOK_OUTCOMES, start)
        delivered = outbox.traffic_per_minute(DELIVERY, destination, ("delivered",), start)
        found.append(
            Direction(
                destination=destination,
                title=names.title,
                source=source,
                on=settings.direction_on(destination),
                turned_on_by=DIRECTIONS[destination].variables,
                stats=stats,
                hour=_figures(hour, source, destination),
                day=_figures(day, source, destination),
                dead_events=outbox.dead_events(limit=DEAD_LISTED, destination=destination) if stats.dead else [],
                dead_messages=outbox.dead_letter_count(destination) if stats.dead else 0,
                last_error=error_text,
                last_error_at=error_at,
                recovered_at=delivered_at if error_at is not None and delivered_at is not None and delivered_at > error_at else None,
                stalled=stalled_hint(stats, destination),
                chart=chart(received, delivered, minute, chosen),
                ever=any(n for (kind, name, _), n in ever.items() if (kind, name) in ((WEBHOOK, source), (DELIVERY, destination))),
            )
        )
    return found


def _figures(totals: dict[tuple[str, str, str], int], source: str, destination: str) -> dict[str, int]:
    figures = {outcome: totals.get((WEBHOOK, source, outcome), 0) for outcome in WEBHOOK_OUTCOMES}
    figures["received"] = sum(figures.values())
    figures.update({outcome: totals.get((DELIVERY, destination, outcome), 0) for outcome in DELIVERY_OUTCOMES})
    return figures


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def when(at: float | None) -> str:
    return "-" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def clock(at: float, now: float) -> str:
    """A time of today as "12:03 UTC"; of another day with its date."""
    moment, today = datetime.fromtimestamp(at, UTC), datetime.fromtimestamp(now, UTC)
    return f"{moment:%H:%M} UTC" if moment.date() == today.date() else f"{moment:%Y-%m-%d %H:%M} UTC"


def brief(error: str | None) -> str:
    """An error as the main page shows it: its kind and status, never the destination's answer,
    which may quote the data (an email, an answer); the opened event shows it whole."""
    if not error:
        return ""
    return error.split(":", 1)[0][:80]


def with_code(text: str | None) -> Markup:
    """Text whose `backquoted` parts are commands, shown as code (the rest escaped)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text or ""))))
