"""marshmallow schemas of what Refiner sends, loaded into plain `SurveyEvent` data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from dataclasses import fields as fields_of
from datetime import UTC, datetime
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from refiner_source.directions.validation import storable

MAX_ID_LENGTH = 255
MAX_DEPTH = 32  # JSON nesting; Refiner's bodies are 4 deep, answers rarely more than 2
MAX_ANSWERS = 500  # keys of response.data
MAX_ATTRIBUTES = 500  # keys of the contact's or the account's attributes


@dataclass(frozen=True)
class Account:
    uuid: str | None = None
    remote_id: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SurveyEvent:
    """One Refiner response event, whichever way it arrived (webhook or REST API)."""

    triggered_event: str
    response_uuid: str
    contact_uuid: str | None
    remote_id: str | None
    email: str | None
    contact_attributes: dict[str, Any]
    account: Account | None
    form_uuid: str | None
    form_name: str | None
    completed_at: datetime | None
    dismissed_at: datetime | None
    received_at: datetime | None
    data: dict[str, Any]
    tags: list[Any]


class RefinerDateTime(fields.Field):
    """Refiner writes ISO 8601 with a Z in webhooks and `YYYY-MM-DD HH:MM:SS` (UTC) in its API."""

    default_error_messages = {"invalid": "Not a valid date and time."}

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise self.make_error("invalid")
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise self.make_error("invalid") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _storable_text(value: str) -> None:
    if not storable(value):
        raise ValidationError("Contains a NUL character or invalid Unicode.")


class Identifier(fields.Field):
    """An id that may arrive as a string or a number; numbers become strings, "" means unset.

    With required=True, a blank id is an error too: the id is what the messages are keyed on.
    """

    default_error_messages = {
        "invalid": "Not a valid identifier (string or number).",
        "blank": "May not be blank.",
        "unstorable": "Contains a NUL character or invalid Unicode.",
    }

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.make_error("invalid")
        if isinstance(value, float):
            value = int(value) if value.is_integer() else value
        text = str(value).strip()
        if not storable(text):
            raise self.make_error("unstorable")
        if not text and self.required:
            raise self.make_error("blank")
        return text or None


def _optional(field_cls, **kwargs):
    return field_cls(load_default=None, allow_none=True, **kwargs)


class _Lenient(Schema):
    class Meta:
        unknown = EXCLUDE


class AccountSchema(_Lenient):
    uuid = _optional(Identifier)
    remote_id = _optional(Identifier)
    attributes = _optional(fields.Dict, metadata={"maxProperties": MAX_ATTRIBUTES})

    @post_load
    def make(self, data, **kwargs):
        return Account(uuid=data["uuid"], remote_id=data["remote_id"], attributes=data["attributes"] or {})


class FormSchema(_Lenient):
    uuid = _optional(Identifier)
    name = _optional(fields.String)


class ResponseSchema(_Lenient):
    uuid = Identifier(required=True, allow_none=False)
    completed_at = _optional(RefinerDateTime)
    dismissed_at = _optional(RefinerDateTime)
    received_at = _optional(RefinerDateTime)
    data = _optional(fields.Dict, metadata={"maxProperties": MAX_ANSWERS})
    tags = _optional(fields.List, cls_or_instance=fields.Raw())


class EnvelopeSchema(_Lenient):
    """Just enough to decide whether a body is an event we forward at all."""

    triggered_event = fields.String(required=True, validate=[validate.Length(min=1, max=MAX_ID_LENGTH), _storable_text])


_TRIGGERED_EVENT = EnvelopeSchema().fields["triggered_event"]


def well_formed_event_name(value: Any) -> bool:
    """Whether `value` passes EnvelopeSchema's own triggered_event field, without a schema pass (the
    webhook answers an event it does not forward before validating the rest)."""
    try:
        _TRIGGERED_EVENT.deserialize(value)
    except ValidationError:
        return False
    return True


class ContactSchema(_Lenient):
    """The contact: at the top level of a webhook, under `contact` in the REST API."""

    uuid = _optional(Identifier)
    remote_id = _optional(Identifier)
    email = _optional(fields.String)
    attributes = _optional(fields.Dict, metadata={"maxProperties": MAX_ATTRIBUTES})
    account = _optional(fields.Nested, nested=AccountSchema)


def _require_identity(contact: dict[str, Any], field_name: str) -> None:
    if not contact["uuid"] and not contact["remote_id"]:
        raise ValidationError("The contact needs a uuid or a remote_id.", field_name=field_name)


class WebhookSchema(EnvelopeSchema, ContactSchema):
    """The body Refiner's webhook POSTs: the contact at the top level, then account, form, response."""

    form = _optional(fields.Nested, nested=FormSchema)
    response = fields.Nested(ResponseSchema, required=True)

    @post_load
    def make(self, data, **kwargs):
        _require_identity(data, "uuid")
        return _survey_event(data, contact=data)


class ApiResponseSchema(_Lenient):
    """One item of Refiner's REST API `GET /responses`: form and data on top, the contact nested under
    `contact` (with `attributes` when asked for with `with_attributes=1`) and its account under
    `contact.account`. The contact's fields load into the same SurveyEvent fields as a webhook's, so
    whatever the API gives is mapped as the webhook's is; docs/backfill.md lists what it leaves out."""

    uuid = Identifier(required=True)
    completed_at = _optional(RefinerDateTime)
    dismissed_at = _optional(RefinerDateTime)
    received_at = _optional(RefinerDateTime)
    form = _optional(fields.Nested, nested=FormSchema)
    data = _optional(fields.Dict, metadata={"maxProperties": MAX_ANSWERS})
    tags = _optional(fields.List, cls_or_instance=fields.Raw())
    contact = fields.Nested(ContactSchema, required=True)

    @post_load
    def make(self, data, **kwargs):
        contact = data["contact"]
        _require_identity(contact, "contact.uuid")
        response = {k: data[k] for k in ("uuid", "completed_at", "dismissed_at", "received_at", "data", "tags")}
        return _survey_event({"triggered_event": COMPLETED, "response": response, "form": data["form"]}, contact=contact)


COMPLETED = "Completed Survey"


def _survey_event(data: dict[str, Any], contact: dict[str, Any]) -> SurveyEvent:
    response, form = data["response"], data.get("form") or {}
    return SurveyEvent(
        triggered_event=data["triggered_event"],
        response_uuid=response["uuid"],
        contact_uuid=contact["uuid"],
        remote_id=contact["remote_id"],
        email=contact["email"] or None,
        contact_attributes=contact.get("attributes") or {},
        account=contact.get("account"),
        form_uuid=form.get("uuid"),
        form_name=form.get("name"),
        completed_at=response["completed_at"],
        dismissed_at=response["dismissed_at"],
        received_at=response["received_at"],
        data=response["data"] or {},
        tags=response["tags"] or [],
    )


@dataclass(frozen=True)
class LimitExceeded:
    """A body over one of the limits: `code` is the stable error code, `path` the field."""

    code: str
    path: str
    message: str


_ID_PATHS = (
    ("uuid",),
    ("remote_id",),
    ("triggered_event",),
    ("account", "uuid"),
    ("account", "remote_id"),
    ("form", "uuid"),
    ("response", "uuid"),
)


def check_limits(body: dict[str, Any]) -> LimitExceeded | None:
    """The first limit `body` is over, or None; cheap, and run before any validation or mapping."""
    if _depth_over(body, MAX_DEPTH):
        return LimitExceeded("too_deep", "_schema", f"The JSON is nested more than {MAX_DEPTH} levels deep.")
    response = body.get("response") if isinstance(body.get("response"), dict) else {}
    account = body.get("account") if isinstance(body.get("account"), dict) else {}
    counted = (
        ("too_many_answers", "response.data", response.get("data"), MAX_ANSWERS, "answers"),
        ("too_many_attributes", "attributes", body.get("attributes"), MAX_ATTRIBUTES, "attributes"),
        ("too_many_attributes", "account.attributes", account.get("attributes"), MAX_ATTRIBUTES, "attributes"),
    )
    for code, path, value, limit, what in counted:
        if isinstance(value, dict) and len(value) > limit:
            return LimitExceeded(code, path, f"At most {limit} {what}; got {len(value)}.")
    for path in _ID_PATHS:
        value: Any = body
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        if isinstance(value, (str, int, float)) and len(str(value)) > MAX_ID_LENGTH:
            return LimitExceeded("too_long", ".".join(path), f"Longer than {MAX_ID_LENGTH} characters.")
    return None


def _depth_over(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def shape_of(value: Any, depth: int = 0) -> Any:
    """Keys and types of a body, never its values: what is safe to log about a rejected body."""
    if isinstance(value, dict):
        if depth >= 3:
            return f"object({len(value)})"
        return {str(k)[:80]: shape_of(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, list):
        return f"array({len(value)})"
    return type(value).__name__ if value is not None else "null"


_TIMES = ("completed_at", "dismissed_at", "received_at")


def event_to_json(event: SurveyEvent) -> str:
    """The event as stored for replay."""
    # Shallow on purpose: dataclasses.asdict deep-copies every answer, a third of a backfill's time.
    data = {f.name: getattr(event, f.name) for f in fields_of(SurveyEvent)}
    for key in _TIMES:
        data[key] = data[key].isoformat() if data[key] else None
    if event.account is not None:
        data["account"] = {f.name: getattr(event.account, f.name) for f in fields_of(Account)}
    return json.dumps(data, separators=(",", ":"))


def event_from_json(text: str) -> SurveyEvent:
    data = json.loads(text)
    for key in _TIMES:
        data[key] = datetime.fromisoformat(data[key]) if data[key] else None
    data["account"] = Account(**data["account"]) if data["account"] else None
    return SurveyEvent(**data)
