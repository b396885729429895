"""Upkeep of the store, whichever directions are on: retention, folding the per-minute counts, alerts.

Runs in the worker process (`refiner-source worker`, and the one `serve` embeds) on a schedule of
its own, beside the delivery loops and independent of them.
"""

from __future__ import annotations

import logging
import time

from refiner_source.ops.alerts import Alerts
from refiner_source.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

DAY = 86400.0
# Receipts are what make a resent webhook a duplicate; they are tiny, so they outlive the
# delivered events' content by far (Refiner and Segment give up retrying long before).
RECEIPT_RETENTION_DAYS = 90
PURGE_EVERY = 3600.0
TICK = 1.0  # seconds between looks at the schedule


class Upkeep:
    """Hourly retention and count folding; alerts as often as ALERT_PENDING_SECONDS needs."""

    def __init__(
        self,
        outbox: Store,
        *,
        retention_days: int = 7,
        alert_webhook_url: str | None = None,
        alert_pending_seconds: float = 900,
    ) -> None:
        self.outbox = outbox
        self.retention_days = retention_days
        self.alerts = Alerts(outbox, alert_webhook_url, alert_pending_seconds) if alert_webhook_url else None
        self._next_purge = 0.0
        self._stopping = False

    def stop(self, *_args: object) -> None:
        self._stopping = True  # a plain flag: safe from a signal handler

    def run(self) -> None:
        while not self._stopping:
            self.run_due()
            deadline = time.monotonic() + TICK
            while not self._stopping and time.monotonic() < deadline:
                time.sleep(0.05)

    def run_due(self) -> None:
        """Whatever is due now. Never raises: upkeep that fails is logged and tried again later."""
        try:
            self.purge_if_due()
        except StoreUnavailable as exc:
            log.error("store unavailable for upkeep; will retry", extra={"error": str(exc)})
        except Exception:
            log.exception("upkeep failed; will retry")
        if self.alerts is not None:
            self.alerts.check_if_due()  # never raises

    def purge_if_due(self) -> None:
        """Hourly: forget the answers of events delivered more than REFINER_RETENTION_DAYS ago, and
        delete their rows (the receipts) after RECEIPT_RETENTION_DAYS. Pending and dead stay."""
        now = time.time()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        forgotten, deleted = self.outbox.purge(
            now - self.retention_days * DAY, now - max(RECEIPT_RETENTION_DAYS, self.retention_days) * DAY
        )
        if forgotten or deleted:
            log.info("purged", extra={"forgotten_events": forgotten, "deleted_receipts": deleted, "retention_days": self.retention_days})
        self.outbox.fold_traffic(int(now // 60) - 25 * 60)  # per-minute counts older than a day: into the totals
