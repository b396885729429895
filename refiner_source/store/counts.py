"""Traffic counts: what came in and went out, per minute, added up by every process in the store."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from refiner_source.store.database import Database
from refiner_source.store.tables import traffic


class Counts(Database):
    """Adds to a minute's counts with one upsert, and folds old minutes into minute 0."""

    def add_traffic(self, counts: dict[tuple[int, str, str, str], int]) -> None:
        """Add (minute, kind, name, outcome) -> n to the counts, in one transaction."""
        if counts:
            with self._write() as conn:
                self._add_traffic(conn, counts)

    def _add_traffic(self, conn: Connection, counts: dict[tuple[int, str, str, str], int]) -> None:
        rows = [{"minute": m, "kind": k, "name": n, "outcome": o, "count": c} for (m, k, n, o), c in sorted(counts.items())]
        insert_ = postgresql_insert(traffic) if self.engine.dialect.name == "postgresql" else sqlite_insert(traffic)
        stmt = insert_.on_conflict_do_update(
            index_elements=["minute", "kind", "name", "outcome"], set_={"count": traffic.c.count + insert_.excluded.count}
        )
        conn.execute(stmt, rows)

    def traffic_totals(self, since_minute: int | None = None) -> dict[tuple[str, str, str], int]:
        """(kind, name, outcome) -> count, since ever or since a minute."""
        stmt = select(traffic.c.kind, traffic.c.name, traffic.c.outcome, func.sum(traffic.c.count)).group_by(
            traffic.c.kind, traffic.c.name, traffic.c.outcome
        )
        if since_minute is not None:
            stmt = stmt.where(traffic.c.minute >= since_minute)
        with self._guard(), self.engine.connect() as conn:
            return {(k, n, o): int(c) for k, n, o, c in conn.execute(stmt).all()}

    def traffic_per_minute(self, kind: str, name: str, outcomes: Sequence[str], since_minute: int) -> dict[int, int]:
        """minute -> count of these outcomes, for one kind and name, since a minute (a chart's points)."""
        stmt = (
            select(traffic.c.minute, func.sum(traffic.c.count))
            .where(traffic.c.kind == kind, traffic.c.name == name, traffic.c.outcome.in_(list(outcomes)), traffic.c.minute >= since_minute)
            .group_by(traffic.c.minute)
        )
        with self._guard(), self.engine.connect() as conn:
            return {int(m): int(c) for m, c in conn.execute(stmt).all()}

    def fold_traffic(self, before_minute: int) -> int:
        """Fold the minutes before `before_minute` into minute 0 (totals stay, the detail goes); rows folded."""
        with self._write() as conn:
            # What this transaction deleted is what it adds: two workers folding at once never add twice.
            gone = conn.execute(
                delete(traffic)
                .where(traffic.c.minute > 0, traffic.c.minute < before_minute)
                .returning(traffic.c.kind, traffic.c.name, traffic.c.outcome, traffic.c.count)
            ).all()
            totals: dict[tuple[int, str, str, str], int] = {}
            for kind, name, outcome, count in gone:
                totals[(0, kind, name, outcome)] = totals.get((0, kind, name, outcome), 0) + int(count)
            if totals:
                self._add_traffic(conn, totals)
        return len(gone)
