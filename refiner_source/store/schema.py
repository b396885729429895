"""The store's schema: created, upgraded from any earlier version (1 to 3, 3 to 4, 4 to 5) in place, and asked after."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import insert, inspect, select, text, update
from sqlalchemy.engine import Connection

from refiner_source.directions import SEGMENT
from refiner_source.store.database import Database, insert_ignoring_conflict
from refiner_source.store.tables import DEAD, DELIVERED, LEGACY_EVENT, PENDING, dead_letters, events, metadata, schema_info

SCHEMA_VERSION = 5  # 5: the suppression list (refiner_suppressed), made by create_all

# Tables of versions 1 and 2, read once by the upgrade to version 3 and then dropped.
V2_ALTERATIONS = [
    "ALTER TABLE refiner_receipts ADD COLUMN form_uuid VARCHAR(255)",
    "ALTER TABLE refiner_receipts ADD COLUMN occurred_at FLOAT",
    "ALTER TABLE refiner_receipts ADD COLUMN event TEXT",
]


class Schema(Database):
    """Creating and upgrading the tables, and whether the database answers."""

    def init_schema(self) -> None:
        """Create or upgrade the tables; safe to run any number of times, also concurrently."""
        with self._write() as conn:
            if conn.dialect.name == "postgresql":
                # serve, worker and Heroku's release phase may all start at once.
                conn.execute(text("SELECT pg_advisory_xact_lock(8127349)"))
            existing = conn.dialect.has_table(conn, schema_info.name)
            version = conn.execute(select(schema_info.c.version)).scalar() if existing else None
            metadata.create_all(conn, checkfirst=True)
            # By the tables, not only by the version: an older release started again (a rollback)
            # makes its tables anew and fills them; rolling forward takes in what they hold.
            if conn.dialect.has_table(conn, "refiner_receipts"):
                _upgrade_to_v3(conn, version or 1)
            _upgrade_to_v4(conn)
            if version is None:
                conn.execute(insert(schema_info).values(id=1, version=SCHEMA_VERSION))
            elif version < SCHEMA_VERSION:
                conn.execute(update(schema_info).values(version=SCHEMA_VERSION))

    def schema_version(self) -> int | None:
        with self._guard(), self.engine.connect() as conn:
            return conn.execute(select(schema_info.c.version)).scalar()

    def ping(self) -> None:
        with self._guard(), self.engine.connect() as conn:
            conn.execute(select(1))


def _upgrade_to_v3(conn: Connection, version: int) -> None:
    """Versions 1 and 2 kept a receipt per event and a row per Segment message. Each receipt becomes
    an event row (delivered: it is the receipt, and replay's source); the messages not yet
    delivered become event rows of their own, one per response and state, which send exactly the
    stored messages (pending) or hold them as dead letters with their errors (dead). Then the old
    tables go, in the same transaction. Safe to repeat: what is there already is kept."""
    if version < 2:
        for statement in V2_ALTERATIONS:
            conn.execute(text(statement))
    conn.execute(
        text(
            "INSERT INTO refiner_events (destination, receipt_key, response_id, triggered_event, form_uuid, occurred_at, event,"
            " message_count, status, attempts, available_at, created_at, queued_at, delivered_at)"
            " SELECT :segment, receipt_key, response_id, triggered_event, form_uuid, occurred_at, event,"
            " messages, :delivered, 0, created_at, created_at, created_at, created_at FROM refiner_receipts"
            " WHERE 1 = 1"  # SQLite reads ON CONFLICT after a bare FROM as a join's; the WHERE ends the SELECT
            " ON CONFLICT (destination, receipt_key) DO NOTHING"
        ),
        {"segment": SEGMENT, "delivered": DELIVERED},
    )
    has_messages = conn.dialect.has_table(conn, "refiner_messages")
    legacy = (
        conn.execute(
            text(
                "SELECT id, message_id, response_id, call, payload, status, attempts, last_error, created_at"
                " FROM refiner_messages WHERE status IN (:pending, :dead) ORDER BY id"
            ),
            {"pending": PENDING, "dead": DEAD},
        ).all()
        if has_messages
        else []
    )
    groups: dict[tuple[str, str], list[Any]] = {}
    for row in legacy:
        groups.setdefault((row.response_id, row.status), []).append(row)
    now = time.time()
    for (response_id, status), rows in groups.items():
        event_id = conn.execute(
            insert_ignoring_conflict(conn.dialect.name, events)
            .values(
                destination=SEGMENT,
                receipt_key=f"v2 {status} messages\n{response_id}\n{rows[0].id}",
                source_id=response_id,
                triggered_event=LEGACY_EVENT,
                messages="[" + ",".join(r.payload for r in rows) + "]",
                message_count=len(rows),
                status=status,
                attempts=max(r.attempts for r in rows),
                available_at=now,
                created_at=min(r.created_at for r in rows),
                queued_at=min(r.created_at for r in rows),
                last_error=rows[-1].last_error,
            )
            .returning(events.c.id)
        ).scalar()
        if status == DEAD and event_id is not None:
            conn.execute(
                insert(dead_letters),
                [
                    {"event_id": event_id, "message_id": r.message_id, "call": r.call, "error": r.last_error or "dead", "created_at": now}
                    for r in rows
                ],
            )
    if has_messages:
        conn.execute(text("DROP TABLE refiner_messages"))
    conn.execute(text("DROP TABLE refiner_receipts"))


def _upgrade_to_v4(conn: Connection) -> None:
    """Version 4 adds the contact of an event (Segment to Refiner keeps each contact's order)."""
    columns = {c["name"] for c in inspect(conn).get_columns(events.name)}
    if "contact" not in columns:
        conn.execute(text("ALTER TABLE refiner_events ADD COLUMN contact VARCHAR(255)"))
    for index in events.indexes:
        index.create(conn, checkfirst=True)
