"""The refiner-source command: serve, worker, status, replay, init-db."""

from __future__ import annotations

import json
import os
import sys
import threading

import click

from .config import ConfigError, Settings, load_settings
from .logs import configure_logging
from .outbox import Outbox, StoreUnavailable


def _settings(*require: str) -> Settings:
    try:
        return load_settings(require=require)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _outbox(settings: Settings) -> Outbox:
    return Outbox(settings.database_url)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class _StoreErrors(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StoreUnavailable as exc:
            raise click.ClickException(f"the store at DATABASE_URL is not answering: {exc}") from None


@click.group(cls=_StoreErrors)
@click.version_option(package_name="refiner-source")
def main() -> None:
    """Refiner survey responses into Segment: a webhook receiver and a delivery worker."""


@main.command()
def serve() -> None:
    """Run the web app under gunicorn on $PORT, with the delivery worker beside it."""
    settings = _settings("SEGMENT_WRITE_KEY", "REFINER_WEBHOOK_SECRET")
    outbox = _outbox(settings)
    outbox.init_schema()
    outbox.dispose()  # no connection may cross gunicorn's fork
    from gunicorn.app.wsgiapp import run

    from .gunicorn_conf import EMBEDDED_WORKER_ENV

    os.environ[EMBEDDED_WORKER_ENV] = "1"
    sys.argv = ["refiner-source serve", "-c", "python:refiner_source.gunicorn_conf", "refiner_source:create_app()"]
    run()


@main.command()
@click.option("--exit-with-parent", is_flag=True, hidden=True, help="Stop when the parent (gunicorn's master) goes away.")
def worker(exit_with_parent: bool) -> None:
    """Run only the delivery loop (a Heroku worker dyno)."""
    from .delivery import Worker

    settings = _settings("SEGMENT_WRITE_KEY")
    configure_logging(settings.log_level)
    outbox = _outbox(settings)
    outbox.init_schema()
    delivery = Worker(outbox, settings.segment_write_key, settings.segment_host, retention_days=settings.retention_days)
    delivery.install_signal_handlers()
    if exit_with_parent:
        _stop_when_orphaned(delivery.stop)
    delivery.run()


def _stop_when_orphaned(stop) -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        stop()

    threading.Thread(target=watch, daemon=True).start()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def status(as_json: bool) -> None:
    """Print pending, delivered and dead counts and the age of the oldest pending message."""
    outbox = _outbox(_settings())
    stats = outbox.stats()
    if as_json:
        click.echo(json.dumps(stats.__dict__))
        return
    age = "-" if stats.oldest_pending_age is None else f"{stats.oldest_pending_age:.0f}s"
    click.echo(f"pending    {stats.pending}\ndelivered  {stats.delivered}\ndead       {stats.dead}\noldest pending age  {age}")
    if stats.dead:
        click.echo("\nnewest dead letters (response id, message id, error); `refiner-source replay` resends them:")
        for response_id, message_id, error in outbox.dead_letters():
            click.echo(f"  {response_id}  {message_id}  {error}")


@main.command()
def replay() -> None:
    """Put dead letters back in line for delivery."""
    count = _outbox(_settings()).replay_dead()
    click.echo(f"{count} dead letter(s) queued again")


@main.command("purge-dead")
@click.option("--older-than", type=click.FloatRange(min=0), default=0, show_default=True, help="Only those older than this many days.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge_dead(older_than: float, yes: bool) -> None:
    """Delete dead letters for good (they are otherwise kept until replayed)."""
    import time

    outbox = _outbox(_settings())
    if not yes:
        click.confirm(f"Delete {outbox.stats().dead} dead letter(s) older than {older_than:g} day(s) for good?", abort=True)
    count = outbox.purge_dead(time.time() - older_than * 86400)
    click.echo(f"{count} dead letter(s) deleted")


@main.command("init-db")
def init_db() -> None:
    """Create or upgrade the schema (Heroku release phase); safe to run twice."""
    settings = _settings()
    _outbox(settings).init_schema()
    click.echo(f"schema ready at {_safe_url(settings.database_url)}")
