"""Mapping a Segment event to Refiner REST API calls (the rules: docs/mapping.md). Pure: no I/O, no clock.

It reads an event in Segment's own shape (as posted, or as stored by to_refiner.events.normalise),
so that what was stored is mapped again, with the current mapping file, when it is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from refiner_source.directions.mapping_file import MappingRules

IDENTIFY_USER = "/identify-user"
TRACK_EVENT = "/track-event"
FORWARDED_TYPES = ("identify", "group", "track", "page")
AUDIENCE_EVENTS = {"Audience Entered": True, "Audience Exited": False}
CALLS_PER_EVENT = 1  # what to_refiner makes of an event it does not ignore: one call, whatever its type


@dataclass(frozen=True)
class RefinerCall:
    """One request to Refiner's REST API: POST `path` with the JSON `body`."""

    path: str
    body: dict[str, Any]

    @property
    def is_identify(self) -> bool:
        return self.path == IDENTIFY_USER


def email_of(event: Mapping[str, Any]) -> str | None:
    """The contact's email: `traits.email`, else `context.traits.email`; None when neither is a
    non-empty string. A group's `traits` describe the account (its `email` is the account's), so
    a group's contact email comes from `context.traits.email` only."""
    own = () if event.get("type") == "group" else (event.get("traits"),)
    for traits in (*own, _dig(event, "context", "traits")):
        if isinstance(traits, Mapping) and isinstance(traits.get("email"), str) and traits["email"].strip():
            return traits["email"]
    return None


def user_id_of(event: Mapping[str, Any]) -> str | None:
    user_id = event.get("userId")
    return user_id if isinstance(user_id, str) and user_id.strip() else None


def contact_key(event: Mapping[str, Any]) -> str | None:
    """Who the event is about, as Refiner identifies contacts: the user id, else the email."""
    user_id = user_id_of(event)
    if user_id is not None:
        return f"id:{user_id}"
    email = email_of(event)
    return None if email is None else f"email:{email.lower()}"


def audience_key(event: Mapping[str, Any]) -> str | None:
    """The Engage audience of an `Audience Entered` / `Audience Exited` track, else None."""
    if event.get("type") != "track" or event.get("event") not in AUDIENCE_EVENTS:
        return None
    key = _dig(event, "context", "personas", "computation_key")
    return key if isinstance(key, str) and key.strip() else None


def ignored_reason(event: Mapping[str, Any], rules: MappingRules) -> str | None:
    """Why `event` is not sent to Refiner, or None when it is."""
    kind = event.get("type")
    if kind not in FORWARDED_TYPES:
        return f"type {kind!r} is not sent to Refiner (only {', '.join(FORWARDED_TYPES)})"
    integrations = event.get("integrations")
    if isinstance(integrations, Mapping):
        if integrations.get("Refiner") is False:
            return "integrations.Refiner is false (refiner-source's own messages carry it: no loop)"
        if integrations.get("All") is False and integrations.get("Refiner") is not True:
            return "integrations.All is false and integrations.Refiner is not true"
    if contact_key(event) is None:
        return "no userId and no email: Refiner cannot tell whose it is"
    settings = rules.to_refiner
    if kind == "track" and audience_key(event) is None:
        if settings.track_events is not None and event.get("event") not in settings.track_events:
            return f"track event {event.get('event')!r} is not in the mapping file's [to_refiner] track_events"
    if kind == "page" and settings.page_event is None:
        return "page calls are turned off in the mapping file ([to_refiner] page_event = false)"
    return None


def to_refiner(event: Mapping[str, Any], rules: MappingRules) -> list[RefinerCall]:
    """The calls one Segment event becomes, in order; [] when it is not sent (see ignored_reason)."""
    if ignored_reason(event, rules) is not None:
        return []
    contact = _contact(event)
    kind = event["type"]
    if kind == "identify":
        body = dict(contact)
        for name, value in flatten(event.get("traits")).items():
            if name not in ("id", "email"):  # the contact's own keys are the userId and email
                body[name] = value
        return [RefinerCall(IDENTIFY_USER, body)]
    if kind == "group":
        account = {"id": event["groupId"]}
        account.update((name, value) for name, value in flatten(event.get("traits")).items() if name != "id")
        return [RefinerCall(IDENTIFY_USER, {**contact, "account": account})]
    audience = audience_key(event)
    if audience is not None:
        return [RefinerCall(IDENTIFY_USER, {**contact, audience: AUDIENCE_EVENTS[event["event"]]})]
    name = event["event"] if kind == "track" else rules.to_refiner.page_event
    return [RefinerCall(TRACK_EVENT, {**contact, "event": name})]


def flatten(traits: Any, prefix: str = "") -> dict[str, Any]:
    """Nested objects flattened with `_` (`address.city` -> `address_city`); nulls left out."""
    flat: dict[str, Any] = {}
    if not isinstance(traits, Mapping):
        return flat
    for key, value in traits.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}_"))
        elif value is not None:
            flat[name] = value
    return flat


def mergeable(first: RefinerCall, then: RefinerCall) -> bool:
    """Whether two calls of one contact, one right after the other, can go as one: both identify
    the user, and they do not name two different accounts (each account's traits must arrive)."""
    if not (first.is_identify and then.is_identify):
        return False
    accounts = [call.body.get("account") for call in (first, then)]
    return not all(isinstance(a, Mapping) for a in accounts) or accounts[0].get("id") == accounts[1].get("id")


def merge(calls: list[RefinerCall]) -> RefinerCall:
    """Identify calls of one contact as one: later values win; the same account's traits are merged
    (another account replaces it: which is why `mergeable` keeps two accounts' calls apart)."""
    body: dict[str, Any] = {}
    for call in calls:
        for key, value in call.body.items():
            previous = body.get(key)
            if key == "account" and isinstance(previous, Mapping) and isinstance(value, Mapping) and previous.get("id") == value.get("id"):
                body[key] = {**previous, **value}
            else:
                body[key] = value
    return RefinerCall(IDENTIFY_USER, body)


def _contact(event: Mapping[str, Any]) -> dict[str, Any]:
    """{"id": userId, "email": email}, each left out when absent (a contact without userId goes by email)."""
    contact: dict[str, Any] = {}
    user_id = user_id_of(event)
    if user_id is not None:
        contact["id"] = user_id
    email = email_of(event)
    if email is not None:
        contact["email"] = email
    return contact


def _dig(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data
