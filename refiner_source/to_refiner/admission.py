"""What the Segment webhook decides of a parsed body (one event, or a batch), with no web framework:
the entries to store, the events ignored (and why), the events of a batch that are not valid; or
refused (the error the webhook answers). `refiner-source preview --segment` decides with the same code."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError

from refiner_source.entry import Entry
from refiner_source.mapping_file import MappingRules
from refiner_source.privacy import FORGOTTEN
from refiner_source.to_refiner.events import load as load_event
from refiner_source.to_refiner.intake import prepare
from refiner_source.to_refiner.mapping import ignored_reason
from refiner_source.validation import Refused, error_fields

Forgotten = Callable[[frozenset[tuple[str, str]]], bool]
_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


@dataclass
class Admitted:
    """What became of each event of the body: stored (entries), ignored, or not valid (a batch's)."""

    single: bool
    entries: list[Entry] = field(default_factory=list)
    ignored: list[dict[str, Any]] = field(default_factory=list)  # {"index", "message_id", "reason"}
    invalid: list[dict[str, Any]] = field(default_factory=list)  # {"index", "error"}


def admit(body: Any, rules: MappingRules, forgotten: Forgotten | None = None) -> Admitted:
    """Each event of a parsed Segment webhook body (one event, or a batch) validated on its own.
    Raises Refused: 400 for a body that is not an object or a non-empty array, 422 for a single
    event of the wrong shape. `forgotten`: whether identifiers are of a person on the suppression
    list, whose events are ignored (reason "forgotten")."""
    if isinstance(body, dict):
        return _admit([(0, body)], rules, forgotten, single=True)
    if isinstance(body, list) and body:
        return admit_batch(enumerate(body), rules, forgotten)
    raise not_a_body(body)


def admit_batch(events: Iterable[tuple[int, Any]], rules: MappingRules, forgotten: Forgotten | None = None) -> Admitted:
    """The events of a batch (or part of one: the webhook reads a large batch as it arrives), each
    with its index in the batch, validated on their own so that a malformed one never costs the others."""
    return _admit(events, rules, forgotten, single=False)


def not_a_body(body: Any) -> Refused:
    """The 400 of a body that is neither a Segment event nor a non-empty array of them."""
    what = "an empty array" if isinstance(body, list) else f"a JSON {_JSON_TYPES.get(type(body), 'value')}"
    return Refused(400, "invalid_shape", f"Expected a Segment event (a JSON object) or an array of them, got {what}.")


def _admit(events: Iterable[tuple[int, Any]], rules: MappingRules, forgotten: Forgotten | None, single: bool) -> Admitted:
    admitted = Admitted(single)
    for index, raw_event in events:
        try:
            event = load_event(raw_event)
        except ValidationError as exc:
            fields = error_fields(exc)
            if single:
                raise Refused(422, "invalid_event", "The body is not a Segment event.", fields) from None
            problems = "; ".join(f"{path}: {' '.join(map(str, m))}" for path, m in sorted(fields.items()))
            admitted.invalid.append({"index": index, "error": problems})
            continue
        reason = ignored_reason(event, rules)
        if reason is not None:
            admitted.ignored.append({"index": index, "message_id": event["messageId"], "reason": reason})
            continue
        entry = prepare(event, rules)
        if forgotten is not None and forgotten(entry.people):
            admitted.ignored.append({"index": index, "message_id": event["messageId"], "reason": FORGOTTEN})
            continue
        admitted.entries.append(entry)
    return admitted
