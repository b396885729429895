"""The refiner-source command: the group, serve, worker and init-db; the operator's commands (status,
replay, purge-dead) and backfill live beside it, in run/operator_commands.py and run/backfill_command.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import click

from refiner_source.errors import RefinerSourceError
from refiner_source.logs import configure_logging
from refiner_source.run.backfill_command import backfill
from refiner_source.run.forget_command import forget
from refiner_source.run.operator_commands import purge_dead, replay, status
from refiner_source.run.options import open_outbox, settings_or_exit
from refiner_source.run.preview_command import preview
from refiner_source.run.questions_command import questions
from refiner_source.version import __version__

# Imports of the web app, the database and Segment stay inside the commands, here and in the modules
# above: a backfill's mapping processes (spawned) import this module again, and should carry only
# what mapping needs.


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class _UserErrors(click.Group):
    """Where every command's errors meant for the user are caught, once: a RefinerSourceError is its
    one line (click prints `Error: ` and it, and exits 1), and the store not answering says so."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RefinerSourceError as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            from refiner_source.store import StoreUnavailable

            if not isinstance(exc, StoreUnavailable):
                raise
            raise click.ClickException(f"the store at DATABASE_URL is not answering: {exc}") from None


@click.group(cls=_UserErrors)
@click.version_option(__version__, prog_name="refiner-source")  # also run uninstalled, from a checkout (Heroku)
def main() -> None:
    """Refiner survey responses into Segment, and Segment's events into Refiner.

    \b
    Refiner -> Segment: on with SEGMENT_WRITE_KEY and REFINER_WEBHOOK_SECRET.
    Segment -> Refiner: on with SEGMENT_SHARED_SECRET and REFINER_API_KEY.
    Either pair, or both; `serve` is a complete installation of what is on.
    """


@main.command()
def serve() -> None:
    """Run the web app under gunicorn on $PORT, with the delivery worker beside it (each direction that is on)."""
    from refiner_source.run.supervisor import Supervisor, bind

    settings = settings_or_exit(directions=True)
    configure_logging(settings.log_level)
    listener = bind(settings.port)  # first: a port in use is said at once, and creates nothing
    # The schema is made by `init-db` in a child process: the supervisor lives as long as the service,
    # and not importing the store keeps it at about 17 MB instead of 45 (bench/README.md).
    made = subprocess.run([sys.executable, "-m", "refiner_source", "init-db"], stdout=subprocess.DEVNULL)
    if made.returncode != 0:  # it said why on stderr, as `init-db` would
        listener.close()
        sys.exit(made.returncode)
    sys.exit(Supervisor(listener).run())


@main.command()
@click.option("--exit-with-parent", is_flag=True, hidden=True, help="Stop when the parent (serve's supervisor) goes away.")
def worker(exit_with_parent: bool) -> None:
    """Run only the delivery loops (a Heroku worker dyno), one per direction that is on, and the store's upkeep."""
    from refiner_source.ops.upkeep import Upkeep

    running: list = []

    def stop_all(*_args: object) -> None:
        for part in running:
            part.stop()

    if exit_with_parent:  # first, before anything slow: a supervisor killed meanwhile must still be noticed
        from refiner_source.run.supervisor import stop_when_orphaned

        stop_when_orphaned(lambda: stop_all() if running else os._exit(0))
    settings = settings_or_exit(directions=True)
    configure_logging(settings.log_level)
    outbox = open_outbox(settings)
    if not exit_with_parent:  # under serve, its init-db child has made the schema, and Alembic stays out of this process
        outbox.init_schema()
    from refiner_source.destinations import delivery_loops

    parts = [
        *delivery_loops(settings, outbox),
        Upkeep(
            outbox,
            retention_days=settings.retention_days,
            alert_webhook_url=settings.alert_webhook_url,
            alert_pending_seconds=settings.alert_pending_seconds,
        ),
    ]
    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    running.extend(parts)
    threads = [threading.Thread(target=_run_then_stop_all, args=(part, stop_all), name=_thread_name(part)) for part in parts]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(0.2)
    finally:
        stop_all()
        for thread in threads:
            thread.join()


def _thread_name(part) -> str:
    destination = getattr(part, "destination", None)
    return f"deliver-to-{destination}" if destination else "upkeep"


def _run_then_stop_all(part, stop_all) -> None:
    """One loop ending (a bug) ends the process, which serve's supervisor (or Heroku) restarts."""
    try:
        part.run()
    finally:
        stop_all()


@main.command("init-db")
def init_db() -> None:
    """Create or upgrade the schema (Heroku release phase); safe to run twice."""
    settings = settings_or_exit()
    open_outbox(settings).init_schema()
    click.echo(f"schema ready at {_safe_url(settings.database_url)}")


for _command in (status, replay, backfill, purge_dead, forget, preview, questions):
    main.add_command(_command)
