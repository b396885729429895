"""The store's schema: made and upgraded by Alembic's migrations (store/migrations), and asked after."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection

from refiner_source.store.database import Database, StoreMisconfigured
from refiner_source.store.tables import events, schema_info

BASELINE = "0001"  # the revision of schema version 5, the last one that init-db wrote by hand
SCHEMA_VERSION = 5  # the refiner_schema row a store made before Alembic holds


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, from the installed package (no alembic.ini needed at run time)."""
    config = Config()
    config.set_main_option("script_location", str(files("refiner_source.store") / "migrations"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


class Schema(Database):
    """Creating and upgrading the tables, and whether the database answers."""

    def init_schema(self) -> None:
        """Create or upgrade the tables to Alembic's head, in one transaction; safe to run any number of
        times, also concurrently: on PostgreSQL under an advisory lock (serve, worker and Heroku's release
        phase may all start at once), on SQLite under the writer lock and BEGIN IMMEDIATE."""
        with self._write() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(8127349)"))
            if MigrationContext.configure(conn).get_current_revision() is None and conn.dialect.has_table(conn, schema_info.name):
                version = conn.execute(select(schema_info.c.version)).scalar()
                if version != SCHEMA_VERSION:
                    raise StoreMisconfigured(
                        f"the store's schema is version {version}, from before the first release, which this release "
                        f"cannot upgrade: deliver or replay what it holds with the release that made it, then start "
                        f"with a new database"
                    )
                kept = conn.execute(select(func.count()).where(events.c.messages.is_not(None))).scalar()
                if kept:
                    raise StoreMisconfigured(
                        f"{kept} event{' still holds' if kept == 1 else 's still hold'} messages kept from before version 3, "
                        f"which this release no longer sends: deliver them with the release that made the store, then run "
                        f"init-db again"
                    )
                command.stamp(alembic_config(conn), BASELINE)  # made by hand as version 5: the baseline's tables
            command.upgrade(alembic_config(conn), "head")

    def schema_version(self) -> str | None:
        """The store's Alembic revision, None before init-db."""
        with self._guard(), self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def ping(self) -> None:
        with self._guard(), self.engine.connect() as conn:
            conn.execute(select(1))
