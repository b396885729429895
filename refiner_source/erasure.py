"""Erasing a person from this service, both directions in one transaction, for `refiner-source forget`
and the operator's page: which stored events concern them (each direction says, from its events),
and their identifiers' keyed hashes added to the suppression list (refiner_source.privacy)."""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING

from refiner_source.config import key_of
from refiner_source.directions import DIRECTIONS
from refiner_source.errors import RefinerSourceError
from refiner_source.privacy import digests, fingerprint

if TYPE_CHECKING:
    from refiner_source.config import Settings
    from refiner_source.store import Erased, Store

PLAIN = {chr(c) for c in range(0x20, 0x7F)} - {'"', "\\"}  # characters JSON (ASCII, escaped) writes as they are


class NoKey(RefinerSourceError):
    """No secret to make the suppression list's key from; str() is the operator's one line."""


def _people(destination: str):
    """Its direction's <package>.people: whom a stored event concerns (people_of_stored), and the
    contact keys the store keeps of a person's events (contact_keys)."""
    return importlib.import_module(DIRECTIONS[destination].package + ".people")


def people_of_stored(destination: str):
    """What says whom a stored event of `destination` concerns."""
    return _people(destination).people_of_stored


def like_patterns(person: frozenset[tuple[str, str]]) -> list[str]:
    """LIKE patterns (case-insensitive) that every stored JSON holding one of these identifiers
    matches: the identifier's characters that JSON writes as they are, whatever stands between."""
    from refiner_source.store.suppression import LIKE_ESCAPE

    patterns = []
    for _kind, value in sorted(person):
        runs, run = [], ""
        for char in value:
            if char in PLAIN:
                run += LIKE_ESCAPE + char if char in ("%", "_", LIKE_ESCAPE) else char
            else:
                runs.append(run)
                run = ""
        runs.append(run)
        patterns.append("%" + "%".join(r for r in runs if r) + "%" if any(runs) else "%")
    return patterns


def erase(
    outbox: Store, settings: Settings, person: frozenset[tuple[str, str]], *, suppress: bool = True, dry_run: bool = False
) -> dict[str, Erased]:
    """Erase every stored event of either direction that concerns one of `person`'s identifiers and,
    unless `suppress` is off, add their hashes to the suppression list, in one transaction.
    destination -> what was erased (every direction present). Raises NoKey when suppressing without a key."""
    from refiner_source.store import Erased

    key = key_of(settings)
    if suppress and key is None and not dry_run:
        raise NoKey(
            "no key for the suppression list: set REFINER_SUPPRESSION_KEY (or the secret the service runs with: "
            "REFINER_WEBHOOK_SECRET, SEGMENT_SHARED_SECRET or REFINER_API_KEY), or add --no-suppress"
        )
    readers = {d: people_of_stored(d) for d in DIRECTIONS}

    def concerns(destination: str, event: str | None) -> bool:
        try:
            return bool(readers[destination](event) & person)
        except (ValueError, TypeError, AttributeError):  # not JSON of this version: its text decides
            return mentions(event or "", quoted=True)

    # Each identifier as JSON writes it (escaped, or not), quoted: what a text that names it holds.
    forms = [json.dumps(value.lower(), ensure_ascii=ascii) for _, value in person for ascii in (True, False)]

    def mentions(text: str, quoted: bool = False) -> bool:
        """Whether a text names one of the identifiers: as a JSON string (quoted) or anywhere in it."""
        text = text.lower()
        return any((form if quoted else form[1:-1]) in text for form in forms)

    erased = outbox.erase_person(
        like_patterns(person),
        {key for d in DIRECTIONS for key in _people(d).contact_keys(person)},
        concerns,
        hashes=digests(key, person) if suppress and key else (),
        key_id=fingerprint(key) if key else None,
        dry_run=dry_run,
        mentions=mentions,
    )
    return {d: erased.get(d, Erased()) for d in DIRECTIONS}


def unsuppress(outbox: Store, settings: Settings, person: frozenset[tuple[str, str]]) -> int:
    """Take these identifiers off the suppression list (their hashes with the current key). How many."""
    key = key_of(settings)
    if key is None:
        raise NoKey("no key for the suppression list: set REFINER_SUPPRESSION_KEY, or the secret the service runs with")
    return outbox.unsuppress(digests(key, person))


def suppression_status(outbox: Store, settings: Settings) -> tuple[int, int]:
    """(people suppressed with the current key, people hashed with a key no longer set)."""
    key = key_of(settings)
    return outbox.suppression_counts(fingerprint(key) if key else None)


def replay_skip(outbox: Store, settings: Settings, destination: str):
    """What `replay` skips: an event (its stored JSON) of a person on the suppression list."""
    from refiner_source.privacy import Suppressed

    suppressed = Suppressed(outbox, key_of(settings))
    if not suppressed.active():
        return None
    people = people_of_stored(destination)
    return lambda event: suppressed.forgotten(people(event))
