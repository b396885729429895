"""The status page's chart of received against delivered, drawn as SVG here (no script): its ranges,
its bins, and its UTC time labels, from per-minute counts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class Range:
    key: str  # as in ?range=
    title: str  # "last hour"
    minutes: int  # how far back
    bin: int  # minutes per point
    label_every: int  # minutes between time labels, on the clock (UTC)


RANGES = {
    "1h": Range("1h", "last hour", 60, 1, 10),
    "24h": Range("24h", "last 24 hours", 24 * 60, 10, 3 * 60),
}
DEFAULT_RANGE = "1h"

# The plot's box inside the SVG: room on the left for the count, below for the times.
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 760, 150, 44, 24, 8


@dataclass(frozen=True)
class Chart:
    range: Range
    width: int
    height: int
    peak: int  # the largest count of one point, the top of the plot
    per: str  # what one point counts: "per minute", "per 10 minutes"
    received: str  # SVG polyline points
    delivered: str
    labels: tuple[tuple[float, str], ...]  # (x, "12:30") along the time axis
    plot: tuple[int, int, int, int]  # left, top, right, bottom of the plot
    empty: bool  # nothing received or delivered in the range


def chosen_range(key: str | None) -> Range:
    return RANGES.get(key or DEFAULT_RANGE, RANGES[DEFAULT_RANGE])


def binned(series: dict[int, int], first: int, count: int, size: int) -> list[int]:
    """Counts per `size` minutes, `count` bins from the bin of minute `first` on."""
    totals = [0] * count
    for minute, n in series.items():
        i = minute // size - first // size
        if 0 <= i < count:
            totals[i] += n
    return totals


def time_labels(first_minute: int, last_minute: int, every: int, x_of) -> tuple[tuple[float, str], ...]:
    """The minutes in [first, last] that are a multiple of `every` on the UTC clock, as (x, text):
    "HH:MM", or the date where a day begins in a range of days."""
    labels = []
    start = -(-first_minute // every) * every  # the first multiple at or after `first_minute`
    for minute in range(start, last_minute + 1, every):
        at = datetime.fromtimestamp(minute * 60, UTC)
        text = f"{at:%b} {at.day}" if every >= 60 and at.hour == 0 and at.minute == 0 else at.strftime("%H:%M")
        labels.append((x_of(minute), text))
    return tuple(labels)


def chart(received: dict[int, int], delivered: dict[int, int], minute: int, chosen: Range) -> Chart:
    """The chart of the `chosen` range ending with the current `minute` (unix time // 60), from
    minute -> count series: one point per bin, the newest bin still filling."""
    count = chosen.minutes // chosen.bin
    last_bin = minute // chosen.bin
    first_minute = (last_bin - count + 1) * chosen.bin
    ins = binned(received, first_minute, count, chosen.bin)
    outs = binned(delivered, first_minute, count, chosen.bin)
    peak = max([1, *ins, *outs])
    left, top, right, bottom = LEFT, TOP, WIDTH - 8, HEIGHT - BOTTOM
    span = (count - 1) * chosen.bin or 1

    def x_of(m: float) -> float:
        return left + (m - first_minute) * (right - left) / span

    def points(values: list[int]) -> str:
        return " ".join(f"{x_of(first_minute + i * chosen.bin):.1f},{bottom - v * (bottom - top) / peak:.1f}" for i, v in enumerate(values))

    last_point = first_minute + span
    return Chart(
        range=chosen,
        width=WIDTH,
        height=HEIGHT,
        peak=peak,
        per="per minute" if chosen.bin == 1 else f"per {chosen.bin} minutes",
        received=points(ins),
        delivered=points(outs),
        labels=time_labels(first_minute, last_point, chosen.label_every, x_of),
        plot=(left, top, right, bottom),
        empty=not any(ins) and not any(outs),
    )
