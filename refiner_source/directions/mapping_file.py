"""The mapping file (REFINER_MAPPING_FILE, or its text in REFINER_MAPPING): what each direction's
mapping may be told, `MappingRules`, and the one parser of the file, with one clear line per
mistake. docs/mapping.md says what its keys mean."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from refiner_source.errors import ConfigError

DEFAULT_EVENTS = {
    "Completed Survey": "Survey Completed",
    "Saw Survey": "Survey Viewed",
    "Dismissed Survey": "Survey Dismissed",
}
# Track properties the mapping always sets; a mapping file may not name a trait after one.
RESERVED_PROPERTIES = frozenset({"survey_id", "survey_name", "response_id", "completed_at", "tags"})
@dataclass(frozen=True)
class ToRefinerRules:
    """The mapping file's [to_refiner] section: which Segment track events go to Refiner (None:
    every one), and the event name a page call becomes (None: page calls are dropped)."""

    track_events: frozenset[str] | None = None
    page_event: str | None = "pageview"


ANSWER_TYPES = ("number", "boolean", "string", "list")
PER_ANSWER = "per_answer"  # the [events] key of the event sent once per answer


@dataclass(frozen=True)
class MappingRules:
    """What the mappings need to know: trait prefix and the mapping file's overrides."""

    prefix: str = "refiner_"
    traits: Mapping[str, str] = field(default_factory=dict)
    account_questions: frozenset[str] = frozenset()
    events: Mapping[str, str | None] = field(default_factory=lambda: dict(DEFAULT_EVENTS))
    to_refiner: ToRefinerRules = field(default_factory=ToRefinerRules)
    types: Mapping[str, str] = field(default_factory=dict)  # question identifier -> one of ANSWER_TYPES
    nps_question: str | None = None  # its answer's category (promoter, passive, detractor) is added
    per_answer_event: str | None = None  # set: one track of this name per answer, besides the usual calls


def load_mapping_file(path: str, prefix: str = "refiner_") -> MappingRules:
    """Parse the TOML mapping file (its keys: docs/mapping.md) into MappingRules."""
    name = "REFINER_MAPPING_FILE"
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{name}: no file at {path}") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: {path} is not valid TOML: {exc}") from None
    return mapping_rules(data, prefix, name)


def load_mapping_text(text: str, prefix: str = "refiner_") -> MappingRules:
    """REFINER_MAPPING: the mapping file's TOML as the text of a variable (Heroku's button, no fork),
    checked exactly as the file is."""
    name = "REFINER_MAPPING"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name} is not valid TOML: {exc}") from None
    return mapping_rules(data, prefix, name)


def mapping_rules(data: dict[str, Any], prefix: str, name: str) -> MappingRules:
    """The rules of a parsed mapping file; `name` is the variable it came from, for the errors."""

    unknown = set(data) - {"account_questions", "traits", "events", "types", "nps", "to_refiner"}
    if unknown:
        raise ConfigError(
            f"{name}: unknown key(s) {', '.join(sorted(unknown))}; "
            "expected account_questions, [traits], [events], [types], [nps], [to_refiner]"
        )

    questions = data.get("account_questions", [])
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise ConfigError(f"{name}: account_questions must be a list of question identifiers (strings)")

    traits = data.get("traits", {})
    if not isinstance(traits, dict):
        raise ConfigError(f'{name}: [traits] must be a table of question identifier = "trait name"')
    for key, value in traits.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name}: [traits] {key!r} must be a non-empty trait name (string)")
        if value in RESERVED_PROPERTIES:
            raise ConfigError(f"{name}: [traits] {key!r} = {value!r} clashes with a property the track call always sets")

    events: dict[str, str | None] = dict(DEFAULT_EVENTS)
    overrides = data.get("events", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f'{name}: [events] must be a table of triggered_event = "Event Name" or false')
    per_answer = overrides.get(PER_ANSWER, False)
    if per_answer is not False and not (isinstance(per_answer, str) and per_answer.strip()):
        raise ConfigError(f'{name}: [events] per_answer must be an event name, such as "Survey Question Answered", or false')
    for key, value in overrides.items():
        if key == PER_ANSWER:
            continue
        if key not in DEFAULT_EVENTS:
            raise ConfigError(
                f"{name}: [events] {key!r} is not a Refiner event; expected one of {', '.join(DEFAULT_EVENTS)}, or per_answer"
            )
        if value is False:
            events[key] = None
        elif isinstance(value, str) and value.strip():
            events[key] = value
        else:
            raise ConfigError(f"{name}: [events] {key!r} must be an event name (string) or false")

    return MappingRules(
        prefix=prefix,
        traits=dict(traits),
        account_questions=frozenset(questions),
        events=events,
        to_refiner=_to_refiner_rules(data.get("to_refiner", {}), name),
        types=_answer_types(data.get("types", {}), name),
        nps_question=_nps_question(data.get("nps", {}), name),
        per_answer_event=per_answer or None,
    )


def _answer_types(section: Any, name: str) -> dict[str, str]:
    """[types]: question identifier = "number", "boolean", "string" or "list"."""
    if not isinstance(section, dict):
        raise ConfigError(f'{name}: [types] must be a table of question identifier = "number", "boolean", "string" or "list"')
    for key, value in section.items():
        if value not in ANSWER_TYPES:
            raise ConfigError(
                f"{name}: [types] {key!r} = {value!r} is not a type this service converts to; expected one of {', '.join(ANSWER_TYPES)}"
            )
    return dict(section)


def _nps_question(section: Any, name: str) -> str | None:
    """[nps]: question = "<identifier>" (the question whose 0-10 answer gets a category)."""
    if not isinstance(section, dict) or set(section) - {"question"}:
        raise ConfigError(f'{name}: [nps] must be a table with one key, question = "<question identifier>"')
    question = section.get("question")
    if question is not None and not (isinstance(question, str) and question.strip()):
        raise ConfigError(f"{name}: [nps] question must be a question identifier (a non-empty string)")
    return question


def _to_refiner_rules(section: Any, name: str) -> ToRefinerRules:
    """[to_refiner]: track_events = [...] (an allowlist; absent means every track), page_event = "..." or false."""
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: [to_refiner] must be a table with track_events and page_event")
    unknown = set(section) - {"track_events", "page_event"}
    if unknown:
        raise ConfigError(f"{name}: [to_refiner] unknown key(s) {', '.join(sorted(unknown))}; expected track_events, page_event")
    track_events = section.get("track_events")
    if track_events is not None and (not isinstance(track_events, list) or not all(isinstance(e, str) and e.strip() for e in track_events)):
        raise ConfigError(f'{name}: [to_refiner] track_events must be a list of event names, such as ["Signed Up"]')
    page_event = section.get("page_event", "pageview")
    if page_event is False:
        page_event = None
    elif not isinstance(page_event, str) or not page_event.strip():
        raise ConfigError(f"{name}: [to_refiner] page_event must be an event name (string) or false")
    return ToRefinerRules(None if track_events is None else frozenset(track_events), page_event)
