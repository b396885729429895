"""The store's schema: made and upgraded by Alembic's migrations (store/migrations), and asked after.

Alembic is imported only here, when the schema is made or asked after, not by every process that
imports the store (it and Mako cost each process about 11 MB)."""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import TYPE_CHECKING

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection

from refiner_source.store.database import Database
from refiner_source.store.errors import StoreMisconfigured
from refiner_source.store.tables import events, schema_info

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

BASELINE = "0001"  # the revision of schema version 5, the last one that init-db wrote by hand
SCHEMA_VERSION = 5  # the refiner_schema row a store made before Alembic holds
# Prefixed as every table of the store, so that it can share a database with an app of its own Alembic.
VERSION_TABLE = "refiner_alembic_version"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, from the installed package (no alembic.ini needed at run time)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(files("refiner_source.store") / "migrations"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


class Schema(Database):
    """Creating and upgrading the tables, and whether the database answers."""

    def init_schema(self) -> None:
        """Create or upgrade the tables to Alembic's head, in one transaction; safe to run any number of
        times, also concurrently: on PostgreSQL under an advisory lock (serve, worker and Heroku's release
        phase may all start at once), on SQLite under the writer lock and BEGIN IMMEDIATE.

        A store at a revision this release does not know is newer (a rollback: Heroku restarts the
        dynos of the release before, without a release phase): it is left as it is, with a warning,
        since a migration adds to the schema before a later one takes away what older code reads."""
        from alembic import command
        from alembic.script import ScriptDirectory
        from alembic.util import CommandError

        with self._write() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(8127349)"))
            current = current_revision(conn)
            if current is None and conn.dialect.has_table(conn, schema_info.name):
                self._refuse_what_alembic_cannot_take_in(conn)
                command.stamp(alembic_config(conn), BASELINE)  # made by hand as version 5: the baseline's tables
            elif current is not None:
                try:
                    ScriptDirectory.from_config(alembic_config()).get_revision(current)
                except CommandError:
                    log.warning(
                        "the store's schema is at a revision this release does not know, newer than its own: left as it is",
                        extra={"revision": current, "head": head_revision()},
                    )
                    return
            command.upgrade(alembic_config(conn), "head")

    @staticmethod
    def _refuse_what_alembic_cannot_take_in(conn: Connection) -> None:
        """A store made by hand before Alembic is taken in only at version 5 and without messages kept
        from before version 3 (init-db no longer reads them); otherwise nothing is changed."""
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
                f"which this release no longer sends: with the release that made the store, let them be delivered, "
                f"or replay or purge them (refiner-source purge-dead), then run init-db again"
            )

    def schema_version(self) -> str | None:
        """The store's Alembic revision, None before init-db."""
        with self._guard(), self.engine.connect() as conn:
            return current_revision(conn)

    def ping(self) -> None:
        with self._guard(), self.engine.connect() as conn:
            conn.execute(select(1))
