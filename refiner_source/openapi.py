"""The OpenAPI document of the service, generated from the marshmallow schemas with apispec."""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields, validate

from .schemas import (
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
    413: ["body_too_large"],
    422: ["invalid_shape", "invalid_payload", "too_deep", "too_many_answers", "too_many_attributes", "too_long", "too_large_for_segment"],
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


class ErrorSchema(Schema):
    error = fields.String(required=True, metadata={"description": "stable error code"})
    message = fields.String(required=True, metadata={"description": "for people"})
    fields_ = fields.Dict(
        data_key="fields",
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "with 422: failing field paths (a.b.c) and their messages"},
    )


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


def _error(description: str, status: int) -> dict[str, Any]:
    codes = ", ".join(ERROR_CODES[status])
    return {"description": f"{description} (error: {codes})", "content": {"application/json": {"schema": "Error"}}}


def build_openapi(version: str) -> dict[str, Any]:
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="refiner-source",
        version=version,
        openapi_version="3.0.3",
        plugins=[plugin],
        info={"description": "Receives Refiner survey webhooks and delivers them to Segment as identify, group and track calls."},
    )
    plugin.converter.add_attribute_function(_custom_fields)
    spec.components.schema("Webhook", schema=WebhookSchema)
    spec.components.schema("Accepted", schema=AcceptedSchema)
    spec.components.schema("Seen", schema=SeenSchema)
    spec.components.schema("Error", schema=ErrorSchema)
    spec.components.schema("Status", schema=StatusSchema)
    spec.components.security_scheme("token", {"type": "apiKey", "in": "query", "name": "token"})
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})

    spec.path(
        path="/webhooks/refiner",
        operations={
            "post": {
                "summary": "Refiner's webhook target",
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
                    "413": _error("body over 1 MiB", 413),
                    "422": _error("JSON of the wrong shape, or over a limit", 422),
                    "503": _error("store not answering; retry", 503),
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
            responses["503"] = _error("the store is not answering", 503)
        spec.path(path=path, operations={"get": {"summary": summary, "responses": responses}})
    spec.path(
        path="/openapi.json",
        operations={"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI 3.0 document"}}}},
    )
    return spec.to_dict()
