"""How long to wait before trying again when the answer does not say (its Retry-After, in
refiner_source.delivery.answers, wins): capped exponential backoff with jitter."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: a wait between half the ceiling and the ceiling."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(attempt, 30)))
        return ceiling / 2 + rng() * ceiling / 2

