"""How long to wait before trying again: capped exponential backoff with jitter, or Retry-After."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import requests
from segment.analytics.request import parse_retry_after


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: a wait between half the ceiling and the ceiling."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(attempt, 30)))
        return ceiling / 2 + rng() * ceiling / 2


def retry_after(response: requests.Response | None) -> float | None:
    """The Retry-After of an answer, in seconds (HTTP-date or seconds; capped at 300 by the Segment
    library's parser, which is the one reused here for Refiner's answers too)."""
    return parse_retry_after(response) if response is not None else None
