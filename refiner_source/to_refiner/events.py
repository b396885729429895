"""What Segment's Webhooks destination posts: one event, validated, and normalised to what the
mapping to Refiner reads. Pure (no database, no web framework).

The stored event keeps Segment's own shape, without what Refiner never receives (track and
page properties, the context but its traits' email and Engage's personas): so that a replay can
map it again, and so that the store does not hold more of a person than it needs.
"""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from refiner_source.directions.validation import storable

MAX_ID_LENGTH = 255
MAX_TRAITS = 1000
MAX_EVENT_BYTES = 1 << 20  # one event, alone or in a batch: 32 times what Segment lets an event be
MAX_DEPTH = 32  # objects in objects: traits are flattened, and must not run out of stack doing it


class _Text(fields.String):
    """A string of at most MAX_ID_LENGTH characters, without NUL (PostgreSQL's text refuses it) or
    lone surrogates (no database can encode them)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(validate=validate.Length(min=1, max=MAX_ID_LENGTH), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if not storable(text):
            raise ValidationError("Must not contain NUL characters or invalid Unicode.")
        return text


class _UserId(_Text):
    """Segment's userId: a string; a number is taken as its text (some libraries send ints)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        return super()._deserialize(value, attr, data, **kwargs)


def _shallow(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValidationError(f"Nested more than {MAX_DEPTH} levels deep.")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def _object(**kwargs: Any) -> fields.Dict:
    return fields.Dict(
        keys=fields.String(), load_default=None, allow_none=True, validate=[validate.Length(max=MAX_TRAITS), _shallow], **kwargs
    )


class SegmentEventSchema(Schema):
    """The fields of a Segment event that matter here; others are let through unchecked and not kept."""

    class Meta:
        unknown = EXCLUDE

    type = _Text(required=True)
    messageId = _Text(required=True)  # noqa: N815 - Segment's names
    userId = _UserId(load_default=None, allow_none=True)  # noqa: N815
    anonymousId = fields.Raw(load_default=None)  # noqa: N815
    groupId = _UserId(load_default=None, allow_none=True)  # noqa: N815
    event = _Text(load_default=None, allow_none=True)
    name = fields.Raw(load_default=None)
    timestamp = fields.Raw(load_default=None)
    traits = _object()
    context = _object()
    integrations = _object()

    @validates_schema
    def _type_needs(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data["type"] == "group" and data.get("groupId") is None:
            raise ValidationError("A group call needs a groupId.", field_name="groupId")
        if data["type"] == "track" and data.get("event") is None:
            raise ValidationError("A track call needs an event name.", field_name="event")


_schema = SegmentEventSchema()


def load(event: Any) -> dict[str, Any]:
    """The event validated (marshmallow's ValidationError when it is not one Segment would send)."""
    if not isinstance(event, dict):
        raise ValidationError("Expected a JSON object (one Segment event).", field_name="_schema")
    return _schema.load(event)


def normalise(event: dict[str, Any]) -> dict[str, Any]:
    """What is stored of a validated event: Segment's shape, only the parts the mapping reads."""
    kept = {key: value for key, value in event.items() if value is not None and key not in ("context", "anonymousId")}
    if event.get("anonymousId") is not None:
        kept["anonymousId"] = str(event["anonymousId"])
    context = event.get("context") or {}
    slim: dict[str, Any] = {}
    traits = context.get("traits")
    if isinstance(traits, dict) and isinstance(traits.get("email"), str):
        slim["traits"] = {"email": traits["email"]}
    if isinstance(context.get("personas"), dict):
        slim["personas"] = context["personas"]
    if slim:
        kept["context"] = slim
    return kept
