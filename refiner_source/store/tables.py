"""The store's tables (SQLAlchemy Core) and the states an event row goes through."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, Text, UniqueConstraint

PENDING, DELIVERED, DEAD, PURGED = "pending", "delivered", "dead", "purged"

metadata = MetaData()

# One row per accepted event and destination. The row is the receipt that makes a resent
# webhook a duplicate (kept 90 days), the event as received, normalised (`event`, the answers:
# forgotten REFINER_RETENTION_DAYS after delivery), and the delivery state; `available_at` is both
# the retry time and the claim lease.
events = Table(
    "refiner_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("destination", String(32), nullable=False),
    Column("receipt_key", String(600), nullable=False),
    # The id its source gave the event: a Refiner response's uuid, or a Segment event's messageId.
    # The column keeps the name of version 1 (so that a release rolled back still reads it); the code says source_id.
    Column("response_id", String(255), nullable=False, key="source_id"),
    Column("triggered_event", String(255), nullable=False),
    Column("form_uuid", String(255)),
    Column("occurred_at", Float),
    Column("message_count", Integer, nullable=False, default=0),
    Column("generation", String(32)),  # replay --new-ids: a suffix for the messageIds
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("available_at", Float, nullable=False),
    Column("claimed_by", String(255)),
    Column("created_at", Float, nullable=False),
    Column("queued_at", Float, nullable=False),  # received, or put back in line by replay: what "waiting" counts from
    Column("delivered_at", Float),
    # Whose event it is, where the destination keeps one contact's events in order (Refiner): a
    # later event of a contact waits while an earlier one waits to be retried.
    Column("contact", String(255)),
    # The long texts last: SQLite reads a row's columns in order, and the scans of stats and
    # retention stop before them.
    Column("last_error", Text),
    Column("event", Text),
    # Always NULL: where stores before version 3 kept messages. Kept in the schema so that a release
    # from before Alembic, rolled back to, still reads the table; init-db refuses a store that has any.
    Column("messages", Text),
    UniqueConstraint("destination", "receipt_key", name="uq_refiner_events_receipt"),
    Index("ix_refiner_events_due", "destination", "status", "available_at"),
    Index("ix_refiner_events_settled", "status", "delivered_at"),
    Index("ix_refiner_events_response", "source_id"),
    Index("ix_refiner_events_contact", "destination", "contact", "status", "id"),  # a contact's earlier pending events
)

# The messages a destination refused for a reason of their own, one row each (an event's other
# messages are delivered); kept until replayed or purged.
dead_letters = Table(
    "refiner_dead_letters",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("event_id", Integer, nullable=False),
    Column("message_id", String(100)),
    Column("call", String(32)),
    Column("error", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_refiner_dead_letters_event", "event_id"),
)

# Where each backfill (one per --since/--until/--form) stands: the next page to ask for.
backfills = Table(
    "refiner_backfills",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_key", String(600), nullable=False, unique=True),
    Column("next_cursor", Text),
    Column("next_page", Integer),
    Column("done", Integer, nullable=False, default=0),
    Column("pages", Integer, nullable=False, default=0),
    Column("seen", Integer, nullable=False, default=0),
    Column("stored", Integer, nullable=False, default=0),
    Column("updated_at", Float, nullable=False),
)

# What came in and went out, per minute: webhooks by source and outcome, deliveries by destination
# and outcome, and the webhook-to-delivery latency histogram's buckets. Every process adds its
# counts here, so the figures are the same across gunicorn's workers, the delivery worker and
# dynos. Minutes older than a day are folded into minute 0, which keeps the totals.
traffic = Table(
    "refiner_traffic",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("minute", Integer, nullable=False),  # unix time // 60; 0: everything older than a day
    Column("kind", String(16), nullable=False),  # webhook, delivery, latency
    Column("name", String(32), nullable=False),  # the source (webhook) or the destination
    Column("outcome", String(32), nullable=False),
    Column("count", BigInteger, nullable=False),  # latency sums in ms outgrow 32 bits
    UniqueConstraint("minute", "kind", "name", "outcome", name="uq_refiner_traffic"),
)

# The newest delivery error of each destination and when it happened (kept after it recovers).
last_errors = Table(
    "refiner_last_errors",
    metadata,
    Column("destination", String(32), primary_key=True),
    Column("error", Text, nullable=False),
    Column("at", Float, nullable=False),
)

# Alerts (ALERT_WEBHOOK_URL), one row per kind ("dead:segment", "stuck:refiner", ...): when one was
# last sent and what it said (`value`: the dead count alerted; 1 while a direction is alerted as
# stuck). In the store, so that every worker process and dyno keeps the 15-minute rule together;
# `version` makes each change a compare-and-set, so two workers never both send one alert.
alerts = Table(
    "refiner_alerts",
    metadata,
    Column("kind", String(64), primary_key=True),
    Column("value", Integer, nullable=False, default=0),
    Column("sent_at", Float, nullable=False, default=0.0),
    Column("version", Integer, nullable=False, default=0),
)

# The people `refiner-source forget` erased and suppresses (version 5): never an identifier, only its
# keyed hash (HMAC-SHA256, refiner_source.privacy) and which key made it (`key_id`, a fingerprint),
# so that the list names nobody and a hash made with a key no longer set is found and reported.
suppressed = Table(
    "refiner_suppressed",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),  # user, email, anonymous
    Column("hash", String(64), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("key_id", "kind", "hash", name="uq_refiner_suppressed"),
)

schema_info = Table(
    "refiner_schema",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)
