"""`refiner-source questions`: every question identifier seen, with what the mapping makes of it now,
so that a user can write the mapping file ([traits], [types], [nps], account_questions)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from refiner_source.run.options import open_outbox, settings_or_exit


@click.command()
@click.option("--api", "from_api", is_flag=True, help="Read the responses of Refiner's REST API instead of the stored events.")
@click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True, help="With --api: responses of the last N days.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def questions(from_api: bool, days: int, as_json: bool) -> None:
    """List every question identifier in the stored events that still hold their answers
    (REFINER_RETENTION_DAYS), or with --api in Refiner's responses of the last --days: how many
    answers it had, the trait name it gets now, whether the mapping file names it, its type, and
    the questions whose names collide with it."""
    settings = settings_or_exit("REFINER_API_KEY") if from_api else settings_or_exit()
    answers = _from_api(settings, days) if from_api else _from_store(settings)
    rows = describe(answers, settings.rules)
    if as_json:
        click.echo(json.dumps({"source": "api" if from_api else "store", "questions": rows}, ensure_ascii=False))
        return
    if not rows:
        where = f"Refiner's responses of the last {days} day(s)" if from_api else "the stored events (kept REFINER_RETENTION_DAYS)"
        click.echo(f"no answers in {where}")
        return
    click.echo(f"{'answers':>7}  {'trait name':<44}  {'named':<5}  {'type':<7}  question")
    for row in rows:
        named = "yes" if row["named_in_mapping_file"] else "no"
        click.echo(f"{row['answers']:>7}  {row['trait']:<44}  {named:<5}  {row['type'] or '-':<7}  {row['question']}")
        if row["collides_with"]:
            click.echo(f"{'':>7}  (its name collides with: {', '.join(row['collides_with'])}; each keeps a name of its own)")


def describe(answers: Mapping[str, int], rules) -> list[dict[str, Any]]:
    """One row per question, most answered first: its count, trait name, type, collisions."""
    from refiner_source.to_segment.mapping import reserved_names, trait_names, wanted_trait_name

    names = trait_names(answers, rules, reserved=reserved_names(rules))
    wanted = {q: wanted_trait_name(q, rules) for q in answers}
    by_name: dict[str, list[str]] = {}
    for question, name in wanted.items():
        by_name.setdefault(name, []).append(question)
    return [
        {
            "question": question,
            "answers": count,
            "trait": names[question],
            "named_in_mapping_file": question in rules.traits,
            "type": rules.types.get(question),
            "nps": question == rules.nps_question,
            "account_question": question in rules.account_questions,
            "collides_with": sorted(q for q in by_name[wanted[question]] if q != question),
        }
        for question, count in sorted(answers.items(), key=lambda item: (-item[1], item[0]))
    ]


def _count(datas: Iterable[Any]) -> Counter[str]:
    counted: Counter[str] = Counter()
    for data in datas:
        if isinstance(data, dict):
            counted.update(key for key, value in data.items() if value is not None)
    return counted


def _from_store(settings) -> Counter[str]:
    store = open_outbox(settings, existing=True)
    try:
        return _count(json.loads(text).get("data") for text in store.event_contents("segment"))
    finally:
        store.dispose()


def _from_api(settings, days: int) -> Counter[str]:
    from refiner_source.refiner_rest import RefinerClient
    from refiner_source.to_segment.backfill import filters

    client = RefinerClient(settings.refiner_api_url, settings.refiner_api_key)
    query = filters(datetime.now(UTC) - timedelta(days=days), None, None)
    counted: Counter[str] = Counter()
    cursor, page = None, None
    while True:
        found = client.fetch(query, cursor=cursor, page=page)
        counted += _count(item.get("data") for item in found.items if isinstance(item, dict))
        if not (found.next_cursor or found.next_page):
            return counted
        cursor, page = found.next_cursor, found.next_page
