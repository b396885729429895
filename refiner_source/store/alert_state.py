"""Alert state: when each alert was last sent and what it said, changed only by compare-and-set, so
that of all worker processes and dynos exactly one sends each alert."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select, update

from refiner_source.store.database import Database, insert_ignoring_conflict
from refiner_source.store.tables import alerts


class AlertState(Database):
    """Reads and swaps rows of the alerts table; the rules of when to alert live in ops.alerts."""

    def alert_states(self, kinds: Sequence[str]) -> dict[str, tuple[int, float, int]]:
        """kind -> (value, sent_at, version) of these alert kinds; a kind never changed is (0, 0.0, 0)."""
        with self._guard(), self.engine.connect() as conn:
            stmt = select(alerts.c.kind, alerts.c.value, alerts.c.sent_at, alerts.c.version).where(alerts.c.kind.in_(list(kinds)))
            found = {r.kind: (r.value, r.sent_at, r.version) for r in conn.execute(stmt)}
        return {kind: found.get(kind, (0, 0.0, 0)) for kind in kinds}

    def swap_alerts(self, changes: dict[str, tuple[int, int, float]]) -> bool:
        """Compare and set, all or nothing: each kind -> (version read, new value, new sent_at). Done,
        and True, only if no kind changed since it was read (another worker got there first: False).

        How a worker takes the right to send an alert: the rows are locked (FOR UPDATE on PostgreSQL,
        BEGIN IMMEDIATE on SQLite) while their versions are compared, so of two workers that read the
        same state, exactly one moves it."""
        kinds = sorted(changes)  # one order for every worker: no deadlock between two swaps
        with self._write() as conn:
            for kind in kinds:  # a row to lock, for the kinds never changed before (version 0)
                conn.execute(insert_ignoring_conflict(conn.dialect.name, alerts).values(kind=kind, value=0, sent_at=0.0, version=0))
            rows = conn.execute(
                select(alerts.c.kind, alerts.c.version).where(alerts.c.kind.in_(kinds)).order_by(alerts.c.kind).with_for_update()
            ).all()
            if {r.kind: r.version for r in rows} != {kind: changes[kind][0] for kind in kinds}:
                return False
            for kind in kinds:
                version, value, sent_at = changes[kind]
                conn.execute(update(alerts).where(alerts.c.kind == kind).values(value=value, sent_at=sent_at, version=version + 1))
        return True
