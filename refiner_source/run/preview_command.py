"""`refiner-source preview`: what a body would become, with the mapping file and settings in force,
stored nowhere and sent nowhere. The webhook's own admission and the delivery's own mapping decide,
so a body the webhook refuses gets the webhook's error, and what is printed is what is sent."""

from __future__ import annotations

import json
import sys
import time

import click

from refiner_source.directions import DIRECTIONS, REFINER, SEGMENT
from refiner_source.run.options import settings_or_exit


@click.command()
@click.argument("file", type=click.File("rb"), default="-", required=False)
@click.option("--segment", "from_segment", is_flag=True, help="FILE is a Segment event or a batch of them (Segment -> Refiner).")
def preview(file, from_segment: bool) -> None:
    """Print, as a JSON array, the calls a Refiner webhook body in FILE (stdin when none) would become:
    Segment messages; with --segment, the Refiner API calls of a Segment event or batch. Nothing is
    stored or sent. A body the webhook would refuse gets the webhook's error, and exit status 1."""
    from refiner_source.directions.validation import Refused, strict_json, too_large

    settings = settings_or_exit()
    rules = settings.rules
    raw = file.read()
    if from_segment:
        from refiner_source.to_refiner.admission import admit
        from refiner_source.to_refiner.events import MAX_EVENT_BYTES

        limit = DIRECTIONS[REFINER].body_limit if raw.lstrip().startswith(b"[") else MAX_EVENT_BYTES  # as the webhook reads it
    else:
        from refiner_source.to_segment.admission import admit

        limit = DIRECTIONS[SEGMENT].body_limit
    expected = "a Segment event (a JSON object) or an array of them" if from_segment else "a JSON object"
    try:
        if len(raw) > limit:
            raise too_large(limit)
        admitted = admit(strict_json(raw, expected), rules)
    except Refused as exc:
        _refused(exc.status, exc.answer())
    now = time.time()
    try:
        calls = _calls(admitted, from_segment, now, rules)
    except Exception as exc:  # what delivery would keep as a dead letter: say so, as delivery would
        click.echo(f"would be a dead letter (it cannot be mapped): {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(calls, indent=2, ensure_ascii=False))


def _calls(admitted, from_segment: bool, now: float, rules) -> list:
    from refiner_source.destinations import preview as preview_of
    from refiner_source.to_segment.admission import Ignored

    if from_segment:
        for note in admitted.ignored:
            click.echo(f"event {note['index']} ({note['message_id']}) is ignored: {note['reason']}", err=True)
        for note in admitted.invalid:
            click.echo(f"event {note['index']} is not valid: {note['error']}", err=True)
        return [call for entry in admitted.entries for call in preview_of("refiner", entry.event, None, now, rules)]
    if isinstance(admitted, Ignored):
        click.echo(f"ignored: {admitted.reason}", err=True)
        return []
    return preview_of("segment", admitted.event, None, now, rules)


def _refused(status: int, answer: dict) -> None:
    click.echo(f"the webhook would answer HTTP {status}: {json.dumps(answer, ensure_ascii=False)}", err=True)
    sys.exit(1)
