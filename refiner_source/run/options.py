"""What the refiner-source commands share: reading the settings, opening the store, --to and dates.

Light on purpose, as every module of the command is: a backfill's mapping processes (spawned)
import the command again, and should carry only what mapping needs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from refiner_source.config import Settings, load_settings
from refiner_source.directions import DIRECTIONS

if TYPE_CHECKING:
    from refiner_source.store import Store


def settings_or_exit(*require: str, directions: bool = False) -> Settings:
    """The settings, for a command (a ConfigError is the command line's one line: run/cli.py)."""
    return load_settings(require=require, directions=directions)


def open_outbox(settings: Settings, *, existing: bool = False) -> Store:
    """The store at DATABASE_URL. `existing`: for the commands that only read or change what is
    stored (status, replay, purge-dead): a SQLite file that is not there is said, and not created."""
    import os

    from sqlalchemy.engine import make_url

    from refiner_source.store import Store

    url = make_url(settings.database_url)
    if existing and url.drivername.startswith("sqlite") and url.database and not os.path.exists(url.database):
        raise click.ClickException(
            f"no database at {os.path.abspath(url.database)}: nothing has been stored there (check DATABASE_URL, "
            "and the folder this runs in for a relative path; `refiner-source serve` or `init-db` creates it)"
        )
    return Store(settings.database_url)


TO = click.option(
    "--to",
    "to",
    type=click.Choice(list(DIRECTIONS)),
    help="Only this direction: segment (Refiner's responses) or refiner (Segment's events). Default: both.",
)


def chosen_directions(to: str | None) -> list[str]:
    return [to] if to else list(DIRECTIONS)


DATE = click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])


def check_range(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        raise click.UsageError(f"--since ({since:%Y-%m-%d %H:%M:%S}) must be before --until ({until:%Y-%m-%d %H:%M:%S})")


def epoch(value: datetime | None) -> float | None:
    return None if value is None else value.replace(tzinfo=value.tzinfo or UTC).timestamp()
