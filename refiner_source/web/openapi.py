"""The OpenAPI document of the service, generated from the marshmallow schemas with apispec."""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields, validate

from refiner_source.to_refiner.events import MAX_DEPTH as SEGMENT_MAX_DEPTH
from refiner_source.to_refiner.events import SegmentEventSchema
from refiner_source.to_segment.events import (
    MAX_ANSWERS,
    MAX_ATTRIBUTES,
    MAX_DEPTH,
    MAX_ID_LENGTH,
    Identifier,
    RefinerDateTime,
    WebhookSchema,
)

ERROR_CODES = {
    400: ["empty_body", "invalid_encoding", "invalid_json"],
    401: ["missing_token", "invalid_token"],
    404: ["not_enabled"],
    413: ["body_too_large"],
    422: ["invalid_shape", "invalid_payload", "too_deep", "too_many_answers", "too_many_attributes", "too_long"],
    503: ["store_unavailable"],
}
SEGMENT_ERROR_CODES = {
    400: ["empty_body", "invalid_encoding", "invalid_json", "invalid_shape"],
    401: ["missing_signature", "invalid_signature"],
    404: ["not_enabled"],
    413: ["body_too_large", "event_too_large"],
    422: ["invalid_event", "too_deep"],
    503: ["store_unavailable"],
}


class AcceptedSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["accepted"]))
    response_id = fields.String(required=True)
    messages = fields.Integer(required=True, metadata={"description": "Segment messages stored for delivery"})


class SeenSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["duplicate", "ignored"]))
    response_id = fields.String(metadata={"description": "with duplicate"})
    messages = fields.Integer(metadata={"description": "with duplicate: always 0"})
    reason = fields.String(metadata={"description": "with ignored: why the event is not forwarded"})


class InvalidSchema(Schema):
    index = fields.Integer(required=True)
    error = fields.String(required=True)


class IgnoredSchema(Schema):
    index = fields.Integer(required=True)
    message_id = fields.String(required=True)
    reason = fields.String(required=True)


class SegmentAnswerSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["accepted"]))
    accepted = fields.Integer(required=True, metadata={"description": "events stored for delivery to Refiner"})
    duplicate = fields.Integer(required=True, metadata={"description": "events whose messageId was accepted before"})
    ignored = fields.Integer(required=True, metadata={"description": "events not sent to Refiner (see ignored_reasons)"})
    invalid = fields.List(fields.Nested(InvalidSchema), required=True, metadata={"description": "events of a batch that are not valid"})
    ignored_reasons = fields.List(fields.Nested(IgnoredSchema), metadata={"description": "when something was ignored"})


class ErrorSchema(Schema):
    error = fields.String(required=True, metadata={"description": "stable error code"})
    message = fields.String(required=True, metadata={"description": "for people"})
    fields_ = fields.Dict(
        data_key="fields",
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "with 422: failing field paths (a.b.c) and their messages"},
    )
    accepted = fields.Integer(metadata={"description": "a batch refused part-way: of the events read before it, how many were new"})
    duplicate = fields.Integer(metadata={"description": "a batch refused part-way: how many of the events read before it were seen before"})


class StatusSchema(Schema):
    status = fields.String(required=True)


def _custom_fields(converter_self, field, **kwargs) -> dict[str, Any]:
    if isinstance(field, Identifier):
        return {
            "oneOf": [{"type": "string", "maxLength": MAX_ID_LENGTH}, {"type": "number"}],
            "description": "string or number; numbers become strings",
        }
    if isinstance(field, RefinerDateTime):
        return {"type": "string", "description": "ISO 8601 (2026-11-18T16:42:57Z) or YYYY-MM-DD HH:MM:SS in UTC"}
    return {}


def _error(description: str, status: int, codes_of: dict[int, list[str]] = ERROR_CODES) -> dict[str, Any]:  # noqa: B006 - read only
    codes = ", ".join(codes_of[status])
    return {"description": f"{description} (error: {codes})", "content": {"application/json": {"schema": "Error"}}}


def build_openapi(version: str) -> dict[str, Any]:
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="refiner-source",
        version=version,
        openapi_version="3.0.3",
        plugins=[plugin],
        info={
            "description": (
                "Receives Refiner survey webhooks and delivers them to Segment as identify, group and track calls; and "
                "receives Segment's Webhooks destination and delivers its events to Refiner's REST API. Each direction "
                "is on by its own pair of settings; a direction that is off answers 404 not_enabled on its route."
            )
        },
    )
    plugin.converter.add_attribute_function(_custom_fields)
    spec.components.schema("Webhook", schema=WebhookSchema)
    spec.components.schema("Accepted", schema=AcceptedSchema)
    spec.components.schema("Seen", schema=SeenSchema)
    spec.components.schema("Error", schema=ErrorSchema)
    spec.components.schema("Status", schema=StatusSchema)
    spec.components.schema("SegmentEvent", schema=SegmentEventSchema)
    spec.components.schema("SegmentAnswer", schema=SegmentAnswerSchema)
    spec.components.security_scheme("token", {"type": "apiKey", "in": "query", "name": "token"})
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("signature", {"type": "apiKey", "in": "header", "name": "X-Signature"})

    spec.path(
        path="/webhooks/refiner",
        operations={
            "post": {
                "summary": "Refiner's webhook target (Refiner to Segment); 404 unless SEGMENT_WRITE_KEY and REFINER_WEBHOOK_SECRET are set",
                "description": (
                    f"Limits: body 1 MiB, JSON nesting {MAX_DEPTH} levels, {MAX_ANSWERS} answers, "
                    f"{MAX_ATTRIBUTES} attributes each for contact and account, ids {MAX_ID_LENGTH} characters. "
                    "Unknown fields are accepted and ignored. The schema applies to the events that are forwarded "
                    "(Completed Survey, Saw Survey, Dismissed Survey, unless turned off): a body whose "
                    "triggered_event is any other string is answered 200 ignored whatever else it holds."
                ),
                "security": [{"token": []}, {"bearer": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": "Webhook"}}},
                "responses": {
                    "202": {"description": "stored; will be delivered", "content": {"application/json": {"schema": "Accepted"}}},
                    "200": {"description": "duplicate, or an event not forwarded", "content": {"application/json": {"schema": "Seen"}}},
                    "400": _error("body empty, not UTF-8 or not JSON", 400),
                    "401": _error("token missing or wrong", 401),
                    "404": _error("Refiner to Segment is off (SEGMENT_WRITE_KEY or REFINER_WEBHOOK_SECRET unset)", 404),
                    "413": _error("body over 1 MiB", 413),
                    "422": _error("JSON of the wrong shape, or over a limit", 422),
                    "503": _error("store not answering; retry", 503),
                },
            }
        },
    )
    segment_event = {"$ref": "#/components/schemas/SegmentEvent"}
    spec.path(
        path="/webhooks/segment",
        operations={
            "post": {
                "summary": (
                    "Segment's Webhooks destination target (Segment to Refiner); "
                    "404 unless SEGMENT_SHARED_SECRET and REFINER_API_KEY are set"
                ),
                "description": (
                    f"One Segment event, or an array of them (batching). Body up to 256 MiB, read as it arrives, each event up to "
                    f"1 MiB; traits and context nested "
                    f"{SEGMENT_MAX_DEPTH} levels at most. Authenticated by X-Signature (hex HMAC-SHA1 of the body, or of a "
                    "batch's first element, keyed with SEGMENT_SHARED_SECRET) or the secret as a token. Each event of a "
                    "batch is validated on its own: the invalid ones are listed, the others stored."
                ),
                "security": [{"token": []}, {"bearer": []}, {"signature": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"oneOf": [segment_event, {"type": "array", "items": segment_event}]}}},
                },
                "responses": {
                    "200": {
                        "description": "stored (all, or the valid ones of a batch)",
                        "content": {"application/json": {"schema": "SegmentAnswer"}},
                    },
                    **{
                        str(status): _error(description, status, SEGMENT_ERROR_CODES)
                        for status, description in (
                            (400, "body empty, not UTF-8, not JSON, or not an object or array"),
                            (401, "signature or token missing or wrong"),
                            (404, "Segment to Refiner is off (SEGMENT_SHARED_SECRET or REFINER_API_KEY unset)"),
                            (413, "body over 256 MiB, or an event over 1 MiB"),
                            (422, "a single event of the wrong shape"),
                            (503, "store not answering; Segment retries"),
                        )
                    },
                },
            }
        },
    )
    for path, summary, unavailable in (
        ("/healthz", "200 while the process lives", False),
        ("/readyz", "200 when the store answers", True),
    ):
        responses: dict[str, Any] = {"200": {"description": summary, "content": {"application/json": {"schema": "Status"}}}}
        if unavailable:
            codes = {503: ["store_unavailable", "delivery_worker_down"]}
            responses["503"] = _error("the store is not answering, or the embedded delivery worker is not running", 503, codes)
        spec.path(path=path, operations={"get": {"summary": summary, "responses": responses}})
    spec.path(
        path="/",
        operations={
            "get": {
                "summary": "what this service is: its name, version, which directions are on, links to /status and this document",
                "responses": {"200": {"description": "JSON, nothing secret"}},
            }
        },
    )
    spec.path(
        path="/openapi.json",
        operations={"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI 3.0 document"}}}},
    )
    return spec.to_dict()
