"""refiner-source forget: erase a person from this service, both directions, and keep them out."""

from __future__ import annotations

import json

import click

from refiner_source.directions import DIRECTIONS
from refiner_source.run.options import open_outbox, settings_or_exit


@click.command()
@click.option("--user", "users", multiple=True, metavar="ID", help="A user id: Segment's userId, Refiner's contact remote_id.")
@click.option("--email", "emails", multiple=True, metavar="ADDRESS", help="An email address (any case).")
@click.option("--anonymous-id", "anonymous_ids", multiple=True, metavar="ID", help="Segment's anonymousId, or a Refiner contact's uuid.")
@click.option("--dry-run", is_flag=True, help="Count what would be erased; erase nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--no-suppress", is_flag=True, help="Erase only: do not add the person to the suppression list.")
@click.option("--unsuppress", is_flag=True, help="Take the identifiers off the suppression list; erase nothing.")
def forget(
    users: tuple[str, ...],
    emails: tuple[str, ...],
    anonymous_ids: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
    no_suppress: bool,
    unsuppress: bool,
) -> None:
    """Erase everything stored about a person, in both directions and in one transaction: kept
    events, dead letters and events still waiting to be sent; then ignore their webhooks, Segment
    events and backfilled responses (reason "forgotten"). Prints counts, never the values.

    The identifiers given (any number of each option) are taken as one person."""
    from refiner_source.erasure import erase
    from refiner_source.erasure import unsuppress as take_off
    from refiner_source.privacy import EMAIL, USER, normal, person_of

    given = [(USER, v) for v in users] + [(EMAIL, v) for v in emails] + [("anonymous", v) for v in anonymous_ids]
    if not given:
        raise click.UsageError("name the person: --user ID, --email ADDRESS or --anonymous-id ID (each may be repeated)")
    if any(normal(kind, value) is None for kind, value in given):
        raise click.UsageError("an identifier given is blank")
    person = frozenset(person_of(given))
    if unsuppress and (dry_run or no_suppress):
        raise click.UsageError("--unsuppress erases nothing: it goes with neither --dry-run nor --no-suppress")
    settings = settings_or_exit()
    outbox = open_outbox(settings, existing=True)
    if unsuppress:
        removed = take_off(outbox, settings, person)
        _say(as_json, {"unsuppressed": removed}, f"{removed} identifier(s) taken off the suppression list")
        return
    erased = erase(outbox, settings, person, suppress=not no_suppress, dry_run=dry_run)
    counts = {d: {"events": e.events, "dead_letters": e.dead_letters, "waiting": e.waiting} for d, e in erased.items()}
    suppressed = not dry_run and not no_suppress
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "suppressed": suppressed, "identifiers": len(person), "directions": counts}))
        return
    verb = "would be erased" if dry_run else "erased"
    for destination, c in counts.items():
        click.echo(
            f"{DIRECTIONS[destination].title}: {c['events']} event(s) {verb}, "
            f"of which {c['dead_letters']} dead letter(s) and {c['waiting']} waiting to be sent"
        )
    if suppressed:
        click.echo(
            f"{len(person)} identifier(s) suppressed (kept as keyed hashes): their webhooks, Segment events and backfilled "
            "responses are ignored from now on (within 2 seconds in every running process)"
        )
    elif dry_run:
        click.echo("dry run: nothing erased")


def _say(as_json: bool, data: dict, text: str) -> None:
    click.echo(json.dumps(data) if as_json else text)
