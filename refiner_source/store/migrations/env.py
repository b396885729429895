"""Alembic's environment for the store: online only, on one connection, SQLite's ALTERs in batches.

`refiner-source init-db` (refiner_source.store.schema) hands Alembic the connection of its write
transaction, already holding the store's lock, so that the upgrade commits with it or not at all.
Run from the command line (`alembic upgrade head`, `alembic revision --autogenerate -m ...`, from
the checkout, which has alembic.ini), it connects to `DATABASE_URL`, as the service does.
"""

from __future__ import annotations

from alembic import context

from refiner_source.store.schema import VERSION_TABLE
from refiner_source.store.tables import metadata

config = context.config


def run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most of a table: Alembic copies it to a new one instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():  # joins the caller's transaction where there is one
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    import os

    from refiner_source.config import DEFAULT_DATABASE_URL, normalize_database_url
    from refiner_source.store.database import make_engine

    engine = make_engine(normalize_database_url(os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL))
    with engine.connect() as conn:
        run(conn)
    engine.dispose()
