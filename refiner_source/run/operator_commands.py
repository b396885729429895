"""The operator's commands: status, replay and purge-dead, on the store of both directions."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from refiner_source.config import Settings
from refiner_source.directions import DIRECTIONS, REFINER, SEGMENT
from refiner_source.ops.health import stalled_for, stalled_hint
from refiner_source.run.options import DATE, TO, check_range, chosen_directions, epoch, open_outbox, settings_or_exit

if TYPE_CHECKING:
    from refiner_source.store import Store


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds, in place, until Ctrl-C (with --json: a line each time).")
@TO
def status(as_json: bool, watch: bool, to: str | None) -> None:
    """Print pending, delivered and dead counts, the age of the oldest pending event, the newest dead
    letters and the last delivery error, per direction."""
    import signal
    import threading

    settings = settings_or_exit()
    outbox = open_outbox(settings, existing=True)
    tty = sys.stdout.isatty()
    stopped = threading.Event()
    if watch:
        # Ctrl-C ends --watch once the figures being read are printed: never in the middle of a query,
        # where it would end the command with the store's error instead.
        signal.signal(signal.SIGINT, lambda *_: stopped.set())
    while True:
        if watch and tty and not as_json:
            click.echo("\x1b[H\x1b[2J", nl=False)  # home and clear: the figures are redrawn in place
        _print_status(outbox, settings, to, as_json)
        if not watch or stopped.wait(2.0):
            return


def _print_status(outbox: Store, settings: Settings, to: str | None, as_json: bool) -> None:
    from refiner_source.erasure import suppression_status
    from refiner_source.privacy import STALE_KEY_WARNING

    report = {d: outbox.stats(d) for d in chosen_directions(to)}
    people, stale = suppression_status(outbox, settings)
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
        suppressed = {"people": people, "other_key": stale}
        click.echo(json.dumps({**first, "directions": directions, "suppressed": suppressed}))
        return
    for i, (destination, stats) in enumerate(report.items()):
        title = DIRECTIONS[destination].title
        if not settings.direction_on(destination):
            click.echo(f"{chr(10) if i else ''}{title}: off ({' and '.join(DIRECTIONS[destination].variables)} turn it on)")
            if not (stats.pending or stats.delivered or stats.dead):
                continue
            title = f"{title} (stored before it was turned off)"
            i = 0
        _print_direction(outbox, destination, stats, title, gap=bool(i))
    if people or stale:  # only once someone was forgotten: `refiner-source forget`
        click.echo(f"\nsuppressed people (refiner-source forget): {people}")
    if stale:
        click.echo("WARNING: " + STALE_KEY_WARNING.format(n=stale))


def _print_direction(outbox: Store, destination: str, stats, title: str, gap: bool) -> None:
    age = "-" if stats.oldest_pending_age is None else f"{stats.oldest_pending_age:.0f}s"
    click.echo(f"{chr(10) if gap else ''}{title}")
    click.echo(f"pending    {stats.pending}\ndelivered  {stats.delivered}\ndead       {stats.dead}\noldest pending age  {age}")
    hint = stalled_hint(stats, destination)
    if hint is not None:
        click.echo(hint)
    error, at = outbox.last_error(destination)
    if error is not None:
        click.echo(f"last delivery error ({datetime.fromtimestamp(at, UTC):%Y-%m-%d %H:%M:%S} UTC): {error}")
    if stats.dead:
        # A Segment event's id is the messageId of its one call to Refiner: show the call instead of the id again.
        columns = "response id, message id" if destination == SEGMENT else "Segment messageId, call"
        click.echo(f"newest dead letters ({columns}, error); `refiner-source replay --to {destination}` resends them:")
        for source_id, message_id, call, error in outbox.dead_letter_calls(destination=destination):
            second = (message_id if destination == SEGMENT else call) or "-"
            click.echo(f"  {source_id}  {second}  {error}")


@click.command()
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
    from refiner_source.erasure import replay_skip

    check_range(since, until)
    settings = settings_or_exit()
    outbox = open_outbox(settings, existing=True)
    if message_id is not None:
        if any((response_id, form_uuid, since, until, new_ids)) or to == SEGMENT:
            raise click.UsageError("--message selects one Segment event for Refiner; it goes with no other selection")
        result = outbox.requeue(source_id=message_id, destination=REFINER, skip=replay_skip(outbox, settings, REFINER))
        if not result.matched:
            raise click.ClickException(f"nothing matched --message {message_id}: no Segment event with that messageId was accepted")
        click.echo(f"{result.queued} event(s) queued again for Refiner" + (f", {result.pending} not sent yet" if result.pending else ""))
        _say_suppressed(result.suppressed)
        return
    if not any((response_id, form_uuid, since, until)):
        if new_ids:
            raise click.UsageError("--new-ids goes with --response, --form, --since or --until")
        for destination in chosen_directions(to):
            click.echo(f"{outbox.replay_dead(destination)} dead letter(s) queued again ({DIRECTIONS[destination].title})")
        return
    if to == "refiner":
        raise click.UsageError("--response, --form, --since and --until select Refiner's responses (to Segment); use --message ID")
    now = datetime.now(UTC)
    generation = f"r{int(now.timestamp() * 1000)}" if new_ids else None  # ms: two replays never share ids
    result = outbox.requeue(
        response_id, form_uuid, epoch(since), epoch(until), generation, skip=replay_skip(outbox, settings, SEGMENT), destination=SEGMENT
    )
    if not result.matched:
        chosen = {"--response": response_id, "--form": form_uuid, "--since": since, "--until": until}
        selection = " ".join(f"{name} {value}" for name, value in chosen.items() if value is not None)
        raise click.ClickException(f"nothing matched {selection}: no response received (by webhook or backfill) fits it")
    how = "with new messageIds" if new_ids else "with their original messageIds (Segment drops repeats it has; add --new-ids)"
    click.echo(f"{result.queued} response(s) queued again, to be mapped with the current mapping file, {how}")
    if result.pending:
        click.echo(f"{result.pending} response(s) not sent yet: left in line as they are (they are mapped when sent)")
    _say_suppressed(result.suppressed)
    if result.forgotten:
        click.echo(
            f"{result.forgotten} response(s) are older than REFINER_RETENTION_DAYS: their answers are no longer kept, "
            "so they cannot be re-mapped"
        )


def _say_suppressed(count: int) -> None:
    if count:
        click.echo(f"{count} event(s) of people erased by `refiner-source forget` skipped (forgotten): not queued")


@click.command("purge-dead")
@click.option("--older-than", type=click.FloatRange(min=0), default=0, show_default=True, help="Only those older than this many days.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@TO
def purge_dead(older_than: float, yes: bool, to: str | None) -> None:
    """Delete dead letters for good (they are otherwise kept until replayed)."""
    import time

    outbox = open_outbox(settings_or_exit(), existing=True)
    directions = chosen_directions(to)
    if not yes:
        count = sum(outbox.stats(d).dead for d in directions)
        click.confirm(f"Delete {count} dead letter(s) older than {older_than:g} day(s) for good?", abort=True)
    for destination in directions:
        count = outbox.purge_dead(time.time() - older_than * 86400, destination=destination)
        click.echo(f"{count} dead letter(s) deleted ({DIRECTIONS[destination].title})")
