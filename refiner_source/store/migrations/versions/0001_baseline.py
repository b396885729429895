"""Baseline: the store's schema as it was when Alembic took over its upgrades (schema version 5).

Its tables, written out rather than read from tables.py, so that what this revision makes never
changes; a store made before Alembic by `init-db` (its refiner_schema row says 5) is stamped with
this revision instead of running it. It also writes that row, which a release from before Alembic
reads: rolled back to one, the service finds the schema it knows.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA_VERSION = 5  # what refiner_schema says: the hand-written upgrades' last version


def upgrade() -> None:
    op.create_table(
        "refiner_alerts",
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("kind"),
    )
    op.create_table(
        "refiner_backfills",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_key", sa.String(length=600), nullable=False),
        sa.Column("next_cursor", sa.Text(), nullable=True),
        sa.Column("next_page", sa.Integer(), nullable=True),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("pages", sa.Integer(), nullable=False),
        sa.Column("seen", sa.Integer(), nullable=False),
        sa.Column("stored", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_key"),
    )
    op.create_table(
        "refiner_dead_letters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.String(length=100), nullable=True),
        sa.Column("call", sa.String(length=32), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("refiner_dead_letters", schema=None) as batch_op:
        batch_op.create_index("ix_refiner_dead_letters_event", ["event_id"], unique=False)

    op.create_table(
        "refiner_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=32), nullable=False),
        sa.Column("receipt_key", sa.String(length=600), nullable=False),
        sa.Column("response_id", sa.String(length=255), nullable=False),
        sa.Column("triggered_event", sa.String(length=255), nullable=False),
        sa.Column("form_uuid", sa.String(length=255), nullable=True),
        sa.Column("occurred_at", sa.Float(), nullable=True),
        sa.Column("message_count", sa.Integer(), nullable=False),
        sa.Column("generation", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("available_at", sa.Float(), nullable=False),
        sa.Column("claimed_by", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("queued_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.Column("contact", sa.String(length=255), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("event", sa.Text(), nullable=True),
        sa.Column("messages", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("destination", "receipt_key", name="uq_refiner_events_receipt"),
    )
    with op.batch_alter_table("refiner_events", schema=None) as batch_op:
        batch_op.create_index("ix_refiner_events_contact", ["destination", "contact", "status", "id"], unique=False)
        batch_op.create_index("ix_refiner_events_due", ["destination", "status", "available_at"], unique=False)
        batch_op.create_index("ix_refiner_events_response", ["response_id"], unique=False)
        batch_op.create_index("ix_refiner_events_settled", ["status", "delivered_at"], unique=False)

    op.create_table(
        "refiner_last_errors",
        sa.Column("destination", sa.String(length=32), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("destination"),
    )
    op.create_table(
        "refiner_schema",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "refiner_suppressed",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_id", "kind", "hash", name="uq_refiner_suppressed"),
    )
    op.create_table(
        "refiner_traffic",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("minute", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("minute", "kind", "name", "outcome", name="uq_refiner_traffic"),
    )
    op.execute(sa.text(f"INSERT INTO refiner_schema (id, version) VALUES (1, {SCHEMA_VERSION})"))


def downgrade() -> None:
    for table in (
        "refiner_traffic",
        "refiner_suppressed",
        "refiner_schema",
        "refiner_last_errors",
        "refiner_events",
        "refiner_dead_letters",
        "refiner_backfills",
        "refiner_alerts",
    ):
        op.drop_table(table)
