"""Pure mapping: one SurveyEvent in, the list of finished Segment messages out (the rules: docs/mapping.md)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import cache, lru_cache
from typing import Any

from segment.analytics.client import Client
from segment.analytics.consumer import MAX_MSG_SIZE
from slugify import slugify

from refiner_source.directions.mapping_file import RESERVED_PROPERTIES, MappingRules
from refiner_source.to_segment.answers import nps_category, typed_answers
from refiner_source.to_segment.events import COMPLETED, SurveyEvent

log = logging.getLogger(__name__)

INTEGRATIONS = {"Refiner": False}
MAX_MESSAGE_ID = 100
MAX_TRAIT_NAME = 100  # warehouses truncate column names (Redshift at 127, PostgreSQL at 63): keep them sane
ELLIPSIS = "…"
OMITTED = "… (omitted: too large for Segment's 32 KB)"
MIN_TEXT_BYTES = 16  # a shortened text keeps at least this much


class MessageTooLarge(ValueError):
    """Even with every text value shortened, a message does not fit Segment's 32 KB."""


def event_name(triggered_event: str, rules: MappingRules) -> str | None:
    """The Segment event a Refiner event becomes, or None when it is not forwarded."""
    return rules.events.get(triggered_event)


def trait_names(keys: Iterable[str], rules: MappingRules, reserved: Iterable[str] = ()) -> dict[str, str]:
    """Name every key: the mapping file's name verbatim, else prefix + slug.

    Names never depend on the order keys arrive in. When several keys want one name, the
    mapping file's choice wins, then a key that already is its own slug ("job_role"), then
    the alphabetically first; each other key gets a suffix from a hash of the key itself,
    so it keeps the same name in every response. A key whose slug is empty is named from
    that hash too.
    """
    taken = set(reserved)
    wanted: dict[str, list[tuple[tuple[int, str], str]]] = {}
    for key in set(keys):
        rank = 0 if key in rules.traits else 1 if _slug(key) == key else 2
        wanted.setdefault(wanted_trait_name(key, rules), []).append(((rank, key), key))

    names: dict[str, str] = {}
    for name in sorted(wanted):
        claimants = [key for _, key in sorted(wanted[name])]
        for i, key in enumerate(claimants):
            final = name if i == 0 and name not in taken else f"{name}_{_short_hash(key)}"
            while final in taken or (final != name and final in wanted):
                final = f"{final}_{_short_hash(final)}"
            names[key] = final
            taken.add(final)
    return names


def reserved_names(rules: MappingRules) -> frozenset[str]:
    """The names no answer takes: the track's own properties, the contact's email, the NPS category."""
    nps = {rules.prefix + "nps_category"} if rules.nps_question is not None else set()
    return RESERVED_PROPERTIES | {rules.prefix + "email"} | nps


def wanted_trait_name(key: str, rules: MappingRules) -> str:
    """The name a key asks for before collisions are settled: the mapping file's, else prefix + slug."""
    if key in rules.traits:
        return rules.traits[key]
    name = rules.prefix + (_slug(key) or "answer_" + _short_hash(key))
    if len(name) > MAX_TRAIT_NAME:
        name = name[: MAX_TRAIT_NAME - 9].rstrip("_") + "_" + _short_hash(key)
    return name


@lru_cache(maxsize=8192)
def _slug(key: str) -> str:
    # Every response of a survey has the same question keys: slugify (regexes, transliteration) once.
    return slugify(key, separator="_")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


@lru_cache(maxsize=64)
def _event_slug(triggered_event: str) -> str:
    # A handful of event names, each slugified three times per event without this (a tenth of the mapping).
    return slugify(triggered_event) or _short_hash(triggered_event)


def message_id(response_uuid: str, triggered_event: str, call: str, generation: str | None = None) -> str:
    """Deterministic: the same response, event and call give the same id on every resend and backfill.

    A `generation` (replay --new-ids) makes new ids that Segment will not drop as repeats.
    """
    event = _event_slug(triggered_event)
    tail = f"{call}-{generation}" if generation else call
    candidate = f"refiner-{response_uuid}-{event}-{tail}"
    if len(candidate) <= MAX_MESSAGE_ID:
        return candidate
    digest = hashlib.sha256(f"{response_uuid}\x00{triggered_event}".encode("utf-8", "surrogatepass")).hexdigest()
    # A per-answer call with a replay generation is the longest tail (23 characters): the digest gives way.
    return f"refiner-{digest[: MAX_MESSAGE_ID - len('refiner--') - len(tail)]}-{tail}"


def split_answers(
    event: SurveyEvent, rules: MappingRules, answers: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(user answers, account answers) of `answers` (default: the event's, as they came); null answers are left out."""
    account_attrs = event.account.attributes if event.account else {}
    user: dict[str, Any] = {}
    account: dict[str, Any] = {}
    for key, value in (event.data if answers is None else answers).items():
        if value is None:
            continue
        on_account = key in rules.account_questions or (account_attrs.get(key) is not None and key not in event.contact_attributes)
        (account if on_account else user)[key] = value
    return user, account


def calls(event: SurveyEvent, rules: MappingRules) -> tuple[str, ...]:
    """The calls map_event() makes of `event`, in order; cheap, so the webhook can count them."""
    if event_name(event.triggered_event, rules) is None:
        return ()
    if event.triggered_event != COMPLETED:
        return ("track",)
    base = ("identify", "group", "track") if event.account and event.account.remote_id else ("identify", "track")
    if rules.per_answer_event is None:
        return base
    return base + ("answer",) * sum(1 for value in event.data.values() if value is not None)


def map_event(event: SurveyEvent, rules: MappingRules, now: datetime, generation: str | None = None) -> list[dict[str, Any]]:
    """The Segment messages for one event, in the order they must be sent; [] when not forwarded."""
    wanted = calls(event, rules)
    if not wanted:
        return []
    name = event_name(event.triggered_event, rules)

    account_attrs = {k: v for k, v in (event.account.attributes if event.account else {}).items() if v is not None}
    nps_trait = rules.prefix + "nps_category"
    names = trait_names([*event.data, *account_attrs], rules, reserved=reserved_names(rules))
    answers = typed_answers(event.data, rules.types, event.response_uuid) if rules.types else event.data
    user_answers, account_answers = split_answers(event, rules, answers)
    category = nps_category(answers.get(rules.nps_question)) if rules.nps_question is not None else None

    def named(values: Mapping[str, Any]) -> dict[str, Any]:
        return {names[k]: v for k, v in values.items()}

    common = {
        "user_id": event.remote_id,
        "anonymous_id": None if event.remote_id else event.contact_uuid,
        "timestamp": event.completed_at or event.dismissed_at or event.received_at or now,
        "integrations": dict(INTEGRATIONS),
    }
    ids = {call: message_id(event.response_uuid, event.triggered_event, call, generation) for call in wanted if call != "answer"}
    survey = {"survey_id": event.form_uuid, "survey_name": event.form_name, "response_id": event.response_uuid}

    if wanted == ("track",):
        return [_build("track", event, common, ids["track"], event=name, properties=survey)]

    nps = {nps_trait: category} if category is not None else {}
    traits = named(user_answers)
    if event.email:
        traits[rules.prefix + "email"] = event.email
    if rules.nps_question in user_answers:
        traits.update(nps)
    messages = [_build("identify", event, common, ids["identify"], traits=traits)]
    if "group" in wanted:
        group_traits = {**named(account_attrs), **named(account_answers)}
        if rules.nps_question in account_answers:
            group_traits.update(nps)
        messages.append(_build("group", event, common, ids["group"], group_id=event.account.remote_id, traits=group_traits))
    properties = {
        **survey,
        "completed_at": event.completed_at.isoformat() if event.completed_at else None,
        "tags": event.tags,
        **named({**user_answers, **account_answers}),
        **nps,
    }
    messages.append(_build("track", event, common, ids["track"], event=name, properties=properties))
    if rules.per_answer_event is not None:
        for key, value in answers.items():
            if value is None:
                continue
            # Stable per response, event and question: a resend or a backfill never counts an answer twice.
            answer_id = message_id(event.response_uuid, event.triggered_event, f"answer-{_short_hash(key)}", generation)
            per_answer = {"question": key, "trait": names[key], "answer": value, **survey}
            messages.append(_build("track", event, common, answer_id, event=rules.per_answer_event, properties=per_answer))
    return messages


@cache
def _builder() -> Client:
    # send=False: the library validates and sizes the message and hands it back unsent.
    return Client(write_key="refiner-source (mapping only)", send=False, max_queue_size=1)


def _build(call: str, source: SurveyEvent, common: dict[str, Any], msg_id: str, **fields: Any) -> dict[str, Any]:
    """Build with segment-analytics-python; make room (see _make_room) until it fits 32 KB."""
    body_key = "traits" if "traits" in fields else "properties"
    method = getattr(_builder(), call)
    shortened: set[str] = set()
    margin = 1024  # what the library adds (context.library, type, ...) on top of our fields
    while True:
        try:
            _, message = method(message_id=msg_id, **common, **fields)
            break
        except RuntimeError as exc:  # the library's "Message exceeds 32kb limit"
            if "exceeds" not in str(exc):
                raise
            excess = _json_size({**common, **fields}) + margin - MAX_MSG_SIZE
            fields[body_key], cut = _make_room(fields[body_key], max(excess, 64))
            if not cut:
                raise MessageTooLarge(f"{call} for response {source.response_uuid} is over 32 KB with nothing left to shorten") from None
            shortened |= cut
            margin *= 2
    if shortened:
        log.warning(
            "shortened values to fit Segment's 32 KB message limit",
            extra={"response_id": source.response_uuid, "call": call, "fields": sorted(shortened)},
        )
    return message


def _json_size(value: Any) -> int:
    return len(json.dumps(value, default=str).encode())


def _make_room(values: dict[str, Any], excess: int) -> tuple[dict[str, Any], set[str]]:
    """Shorten the longest texts; when that cannot save `excess`, replace the largest value by a
    marker; at last remove the answer with the longest name. The message is sent, whatever it takes."""
    if _cuttable_bytes(values) >= excess:
        return _shorten_longest(values, excess)
    replaceable = [k for k, v in values.items() if v != OMITTED and _json_size(v) > _json_size(OMITTED)]
    if replaceable:
        key = max(replaceable, key=lambda k: _json_size(values[k]))
        return {**values, key: OMITTED}, {key}
    removable = [k for k in values if k not in RESERVED_PROPERTIES]
    if removable:
        key = max(removable, key=len)
        return {k: v for k, v in values.items() if k != key}, {key}
    return values, set()


def _texts(values: dict[str, Any]) -> list[tuple[Any, Any, str]]:
    """(container, key, top-level key) of every string at any depth, markers excepted."""
    found: list[tuple[Any, Any, str]] = []
    for top in values:
        stack: list[tuple[Any, Any]] = [(values, top)]
        while stack:
            container, key = stack.pop()
            item = container[key]
            if isinstance(item, str) and item != OMITTED:
                found.append((container, key, top))
            elif isinstance(item, dict):
                stack.extend((item, k) for k in item)
            elif isinstance(item, list):
                stack.extend((item, i) for i in range(len(item)))
    return found


def _cuttable_bytes(values: dict[str, Any]) -> int:
    return sum(max(0, _json_size(c[k]) - MIN_TEXT_BYTES) for c, k, _top in _texts(values))


def _shorten_longest(values: dict[str, Any], excess: int) -> tuple[dict[str, Any], set[str]]:
    """Cut the longest strings (at any depth) down to one common length that saves `excess` JSON bytes.

    Returns the shortened copy and the top-level keys that were cut.
    """
    copy = json.loads(json.dumps(values))
    found = sorted(((_json_size(c[k]), c, k, top) for c, k, top in _texts(copy)), key=lambda item: item[0], reverse=True)
    level, total = MIN_TEXT_BYTES, 0
    for n, (size, *_where) in enumerate(found, start=1):
        total += size
        nxt = found[n][0] if n < len(found) else 0
        candidate = (total - excess) // n
        if candidate >= nxt:
            level = max(candidate, MIN_TEXT_BYTES)
            break
    cut = set()
    for size, container, key, top in found:
        if size > level:
            container[key] = _truncate(container[key], level)
            cut.add(top)
    return copy, cut


def _truncate(text: str, max_json_bytes: int) -> str:
    """The longest prefix of `text` whose JSON form, with an ellipsis, fits `max_json_bytes`."""
    budget = max_json_bytes - (_json_size(ELLIPSIS) - 2)  # inside the text's quotes, the ellipsis has none of its own
    # A prefix's JSON grows with its length, by 1 to 12 bytes a character: search the length.
    fits, too_long = 0, len(text) + 1
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if _json_size(text[:middle]) <= budget:
            fits = middle
        else:
            too_long = middle
    return text[:fits] + ELLIPSIS
