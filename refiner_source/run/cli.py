"""The refiner-source command: serve, worker, status, replay, init-db."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from refiner_source.config import DIRECTION_VARIABLES, ConfigError, Settings, load_settings
from refiner_source.directions import DIRECTIONS
from refiner_source.logs import configure_logging

if TYPE_CHECKING:
    from refiner_source.store import Outbox

# Imports of the web app, the database and Segment stay inside the commands: a backfill's mapping
# processes (spawned) import this module again, and should carry only what mapping needs.


def _settings(*require: str, directions: bool = False) -> Settings:
    try:
        return load_settings(require=require, directions=directions)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _outbox(settings: Settings) -> Outbox:
    from refiner_source.store import Outbox

    return Outbox(settings.database_url)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class _StoreErrors(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            from refiner_source.store import StoreMisconfigured, StoreUnavailable

            if isinstance(exc, StoreMisconfigured):
                raise click.ClickException(str(exc)) from None
            if not isinstance(exc, StoreUnavailable):
                raise
            raise click.ClickException(f"the store at DATABASE_URL is not answering: {exc}") from None


@click.group(cls=_StoreErrors)
@click.version_option(package_name="refiner-source")
def main() -> None:
    """Refiner survey responses into Segment: a webhook receiver and a delivery worker."""


@main.command()
def serve() -> None:
    """Run the web app under gunicorn on $PORT, with the delivery worker beside it."""
    from refiner_source.run.supervisor import PortInUse, Supervisor, bind

    settings = _settings(directions=True)
    configure_logging(settings.log_level)
    try:
        listener = bind(settings.port)  # first: a port in use is said at once, and creates nothing
    except PortInUse as exc:
        raise click.ClickException(str(exc)) from None
    outbox = _outbox(settings)
    outbox.init_schema()
    outbox.dispose()  # the children open their own connections
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
    settings = _settings(directions=True)
    configure_logging(settings.log_level)
    outbox = _outbox(settings)
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


TO = click.option(
    "--to",
    "to",
    type=click.Choice(list(DIRECTIONS)),
    help="Only this direction: segment (Refiner's responses) or refiner (Segment's events). Default: both.",
)


def _directions(to: str | None) -> list[str]:
    return [to] if to else list(DIRECTIONS)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds, in place, until Ctrl-C (with --json: a line each time).")
@TO
def status(as_json: bool, watch: bool, to: str | None) -> None:
    """Print pending, delivered and dead counts, the age of the oldest pending event, the newest dead
    letters and the last delivery error, per direction."""
    import time

    settings = _settings()
    outbox = _outbox(settings)
    tty = sys.stdout.isatty()
    try:
        while True:
            if watch and tty and not as_json:
                click.echo("\x1b[H\x1b[2J", nl=False)  # home and clear: the figures are redrawn in place
            _print_status(outbox, settings, to, as_json)
            if not watch:
                return
            time.sleep(2.0)
    except KeyboardInterrupt:  # Ctrl-C ends --watch
        return


def _print_status(outbox: Outbox, settings: Settings, to: str | None, as_json: bool) -> None:
    report = {d: outbox.stats(d) for d in _directions(to)}
    if as_json:
        directions = {}
        for d, stats in report.items():
            error, at = outbox.last_error(d)
            directions[d] = {
                "on": settings.direction_on(d),
                **stats.__dict__,
                "stalled": stalled_for(stats) is not None,
                "dead_letters": [{"id": i, "message_id": m, "error": e} for i, m, e in outbox.dead_letters(limit=10, destination=d)],
                "last_error": None if error is None else {"error": error, "at": datetime.fromtimestamp(at, UTC).isoformat()},
            }
        first = next(iter(directions.values()))  # at the top level too, as before there were two directions
        click.echo(json.dumps({**first, "directions": directions}))
        return
    for i, (destination, stats) in enumerate(report.items()):
        title = DIRECTIONS[destination].title
        if not settings.direction_on(destination):
            click.echo(f"{chr(10) if i else ''}{title}: off ({' and '.join(DIRECTION_VARIABLES[destination])} turn it on)")
            if not (stats.pending or stats.delivered or stats.dead):
                continue
            title = f"{title} (stored before it was turned off)"
            i = 0
        _print_direction(outbox, destination, stats, title, gap=bool(i))


def _print_direction(outbox: Outbox, destination: str, stats, title: str, gap: bool) -> None:
    age = "-" if stats.oldest_pending_age is None else f"{stats.oldest_pending_age:.0f}s"
    click.echo(f"{chr(10) if gap else ''}{title}")
    click.echo(f"pending    {stats.pending}\ndelivered  {stats.delivered}\ndead       {stats.dead}\noldest pending age  {age}")
    stalled = stalled_for(stats)
    if stalled is not None:
        target = "Segment" if destination == "segment" else "Refiner's API"
        click.echo(
            f"nothing delivered for {stalled:.0f}s while {stats.pending} event(s) wait: is a delivery worker running "
            f"(`refiner-source serve` runs one; `refiner-source worker` runs one alone), and can it reach {target} (see its log)?"
        )
    error, at = outbox.last_error(destination)
    if error is not None:
        click.echo(f"last delivery error ({datetime.fromtimestamp(at, UTC):%Y-%m-%d %H:%M:%S} UTC): {error}")
    if stats.dead:
        ids = "response id" if destination == "segment" else "Segment messageId"
        click.echo(f"newest dead letters ({ids}, message id, error); `refiner-source replay --to {destination}` resends them:")
        for response_id, message_id, error in outbox.dead_letters(destination=destination):
            click.echo(f"  {response_id}  {message_id}  {error}")


STALLED_AFTER = 60.0  # seconds; a healthy worker's longest backoff between tries is 60 s


def stalled_for(stats) -> float | None:
    """Seconds without a delivery while the oldest message has waited longer than STALLED_AFTER; else None."""
    waited = stats.oldest_pending_age
    if not stats.pending or waited is None or waited < STALLED_AFTER:
        return None
    if stats.last_delivered_age is not None and stats.last_delivered_age < STALLED_AFTER:
        return None
    return waited if stats.last_delivered_age is None else min(waited, stats.last_delivered_age)


DATE = click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])


@main.command()
@click.option("--response", "response_id", metavar="UUID", help="Resend this response.")
@click.option("--form", "form_uuid", metavar="UUID", help="Resend every response of this survey.")
@click.option("--since", type=DATE, help="Resend responses completed at or after this date (UTC).")
@click.option("--until", type=DATE, help="... and before this date (UTC).")
@click.option("--new-ids", is_flag=True, help="New messageIds, so that Segment does not drop what it already has.")
@click.option("--message", "message_id", metavar="ID", help="Send this Segment event (its messageId) to Refiner again.")
@TO
def replay(response_id: str | None, form_uuid: str | None, since, until, new_ids: bool, message_id: str | None, to: str | None) -> None:
    """Put dead letters back in line (both directions, or --to one); or resend responses (to Segment) or a
    Segment event (--message, to Refiner), mapped again with the current mapping file."""
    _check_range(since, until)
    settings = _settings()
    outbox = _outbox(settings)
    if message_id is not None:
        if any((response_id, form_uuid, since, until, new_ids)) or to == "segment":
            raise click.UsageError("--message selects one Segment event for Refiner; it goes with no other selection")
        result = outbox.requeue(response_id=message_id, destination="refiner")
        if not result.matched:
            raise click.ClickException(f"nothing matched --message {message_id}: no Segment event with that messageId was accepted")
        click.echo(f"{result.queued} event(s) queued again for Refiner" + (f", {result.pending} not sent yet" if result.pending else ""))
        return
    if not any((response_id, form_uuid, since, until)):
        if new_ids:
            raise click.UsageError("--new-ids goes with --response, --form, --since or --until")
        for destination in _directions(to):
            click.echo(f"{outbox.replay_dead(destination)} dead letter(s) queued again ({DIRECTIONS[destination].title})")
        return
    if to == "refiner":
        raise click.UsageError("--response, --form, --since and --until select Refiner's responses (to Segment); use --message ID")
    now = datetime.now(UTC)
    generation = f"r{int(now.timestamp() * 1000)}" if new_ids else None  # ms: two replays never share ids
    result = outbox.requeue(response_id, form_uuid, _epoch(since), _epoch(until), generation)
    if not result.matched:
        chosen = {"--response": response_id, "--form": form_uuid, "--since": since, "--until": until}
        selection = " ".join(f"{name} {value}" for name, value in chosen.items() if value is not None)
        raise click.ClickException(f"nothing matched {selection}: no response received (by webhook or backfill) fits it")
    how = "with new messageIds" if new_ids else "with their original messageIds (Segment drops repeats it has; add --new-ids)"
    click.echo(f"{result.queued} response(s) queued again, to be mapped with the current mapping file, {how}")
    if result.pending:
        click.echo(f"{result.pending} response(s) not sent yet: left in line as they are (they are mapped when sent)")
    if result.forgotten:
        click.echo(
            f"{result.forgotten} response(s) are older than REFINER_RETENTION_DAYS: their answers are no longer kept, "
            "so they cannot be re-mapped"
        )


def _check_range(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        raise click.UsageError(f"--since ({since:%Y-%m-%d %H:%M:%S}) must be before --until ({until:%Y-%m-%d %H:%M:%S})")


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.replace(tzinfo=value.tzinfo or UTC).timestamp()


@main.command()
@click.option("--since", type=DATE, help="Responses completed at or after this date (UTC).")
@click.option("--until", type=DATE, help="... and before this date (UTC).")
@click.option("--form", "form_uuid", metavar="UUID", help="Only this survey.")
@click.option("--dry-run", is_flag=True, help="Print what would be sent; store nothing.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=os.cpu_count() or 1,
    show_default="the number of CPUs",
    help="Processes that map pages while this one fetches and stores; 0 maps in this process.",
)
def backfill(since, until, form_uuid: str | None, dry_run: bool, workers: int) -> None:
    """Read past responses from Refiner's REST API and send them as a webhook would have.

    Safe to stop (Ctrl-C) and to run again: it resumes, and never sends a response twice.
    """
    from refiner_source.to_segment.backfill import BackfillError, RefinerApi, filters, run_backfill

    _check_range(since, until)
    settings = _settings("REFINER_API_KEY")
    configure_logging("WARNING" if settings.log_level == "INFO" else settings.log_level)
    outbox = _outbox(settings)
    outbox.init_schema()
    stop = threading.Event()
    display = _BackfillDisplay(sys.stderr.isatty())

    def on_retry(problem: str, wait: float, attempt: int, of: int) -> None:
        display.note(f"Refiner's API: {problem}; retry {attempt} of {of} in {wait:.1f} s")

    api = RefinerApi(settings.refiner_api_url, settings.refiner_api_key, stop=stop, on_retry=on_retry)

    def on_interrupt(_signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        saved = "" if dry_run else "; progress is saved either way"
        display.note(f"stopping after this page (Ctrl-C again to stop at once{saved})")

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)
    query = filters(since, until, form_uuid)
    try:
        progress = run_backfill(
            api, outbox, settings.rules, query, dry_run=dry_run, report=display, should_stop=stop.is_set, workers=workers
        )
    except BackfillError as exc:
        display.close()
        raise click.ClickException(f"{exc}" + ("" if dry_run else " (progress is saved: run the same command again to resume)")) from None
    display.close()
    verb = "would be new" if dry_run else "stored for delivery"
    click.echo(
        f"{progress.seen} response(s) read in {progress.pages} page(s): {progress.stored} {verb}, "
        f"{progress.duplicates} already sent, {progress.not_completed} not completed, {progress.invalid} not valid (see the log)"
    )
    if dry_run:
        click.echo(f"first {len(progress.sample)} message(s) that would be sent:")
        for message in progress.sample:
            click.echo(json.dumps(message, indent=2, ensure_ascii=False))
    if stop.is_set():
        click.echo("stopped before the end" + ("" if dry_run else ": run the same command again to resume"), err=True)
        sys.exit(130)


class _BackfillDisplay:
    """A progress bar on a terminal; a plain line per page otherwise (logs, CI, Heroku one-off dynos)."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.width = 0

    def __call__(self, p) -> None:
        of = f"/{p.last_page}" if p.last_page else ""
        line = (
            f"page {p.pages}{of}  read {p.seen:,}  new {p.stored:,}  already sent {p.duplicates:,}  "
            f"skipped {p.not_completed + p.invalid:,}  {p.rate:,.0f}/s"
        )
        if self.tty:
            bar = ""
            if p.last_page:
                done = min(p.pages / p.last_page, 1.0)
                bar = "[" + "#" * int(done * 24) + "-" * (24 - int(done * 24)) + "] "
            text = bar + line
            click.echo("\r" + text.ljust(self.width), nl=False, err=True)
            self.width = len(text)
        else:
            click.echo(line, err=True)

    def note(self, text: str) -> None:
        """A line of its own (a retry, a stop), below the bar on a terminal."""
        if self.tty and self.width:
            click.echo("\r" + " " * self.width + "\r", nl=False, err=True)
            self.width = 0
        click.echo(text, err=True)

    def close(self) -> None:
        if self.tty and self.width:
            click.echo("", err=True)


@main.command("purge-dead")
@click.option("--older-than", type=click.FloatRange(min=0), default=0, show_default=True, help="Only those older than this many days.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@TO
def purge_dead(older_than: float, yes: bool, to: str | None) -> None:
    """Delete dead letters for good (they are otherwise kept until replayed)."""
    import time

    outbox = _outbox(_settings())
    directions = _directions(to)
    if not yes:
        count = sum(outbox.stats(d).dead for d in directions)
        click.confirm(f"Delete {count} dead letter(s) older than {older_than:g} day(s) for good?", abort=True)
    for destination in directions:
        count = outbox.purge_dead(time.time() - older_than * 86400, destination)
        click.echo(f"{count} dead letter(s) deleted ({DIRECTIONS[destination].title})")


@main.command("init-db")
def init_db() -> None:
    """Create or upgrade the schema (Heroku release phase); safe to run twice."""
    settings = _settings()
    _outbox(settings).init_schema()
    click.echo(f"schema ready at {_safe_url(settings.database_url)}")
