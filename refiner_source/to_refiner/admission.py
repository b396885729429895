"""What the Segment webhook decides of a parsed body (one event, or a batch), with no web framework:
the entries to store, the events ignored (and why), the events of a batch that are not valid; or
refused (the error the webhook answers). `refiner-source preview --segment` decides with the same code."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError

from refiner_source.directions.entry import Entry
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.directions.validation import Refused, error_fields
from refiner_source.privacy import FORGOTTEN
from refiner_source.to_refiner.events import load as load_event
from refiner_source.to_refiner.intake import prepare
from refiner_source.to_refiner.mapping import ignored_reason

_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


@dataclass
class Admitted:
    """What became of each event of the body: stored (entries), ignored, or not valid (a batch's)."""

    single: bool
    entries: list[Entry] = field(default_factory=list)
    ignored: list[dict[str, Any]] = field(default_factory=list)  # {"index", "message_id", "reason"}
    invalid: list[dict[str, Any]] = field(default_factory=list)  # {"index", "error"}
    indices: list[int] = field(default_factory=list)  # each entry's index in the body

    def set_aside(self, gone: Sequence[Entry]) -> None:
        """Takes `gone` (entries of people on the suppression list, which the webhook checks) out of
        the entries: each is ignored, reason "forgotten", named by its index and messageId."""
        if not gone:
            return
        ids = {id(entry) for entry in gone}
        placed = list(zip(self.indices, self.entries, strict=True))
        self.ignored += [{"index": i, "message_id": e.source_id, "reason": FORGOTTEN} for i, e in placed if id(e) in ids]
        self.ignored.sort(key=lambda ignored: ignored["index"])
        kept = [(i, e) for i, e in placed if id(e) not in ids]
        self.indices, self.entries = [i for i, _ in kept], [e for _, e in kept]


def admit(body: Any, rules: MappingRules) -> Admitted:
    """Each event of a parsed Segment webhook body (one event, or a batch) validated on its own.
    Raises Refused: 400 for a body that is not an object or a non-empty array, 422 for a single
    event of the wrong shape. The suppression list is the webhook's to check (Admitted.set_aside)."""
    if isinstance(body, dict):
        return _admit([(0, body)], rules, single=True)
    if isinstance(body, list) and body:
        return admit_batch(enumerate(body), rules)
    raise not_a_body(body)


def admit_batch(events: Iterable[tuple[int, Any]], rules: MappingRules) -> Admitted:
    """The events of a batch (or part of one: the webhook reads a large batch as it arrives), each
    with its index in the batch, validated on their own so that a malformed one never costs the others."""
    return _admit(events, rules, single=False)


def not_a_body(body: Any) -> Refused:
    """The 400 of a body that is neither a Segment event nor a non-empty array of them."""
    what = "an empty array" if isinstance(body, list) else f"a JSON {_JSON_TYPES.get(type(body), 'value')}"
    return Refused(400, "invalid_shape", f"Expected a Segment event (a JSON object) or an array of them, got {what}.")


def _admit(events: Iterable[tuple[int, Any]], rules: MappingRules, single: bool) -> Admitted:
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
        admitted.entries.append(prepare(event))
        admitted.indices.append(index)
    return admitted
