"""POST /webhooks/refiner: the target of Refiner's webhook. The token, then the size, then the body,
validated in one pass and stored as one event before the answer. (The token comes first, before
the body is read: unlike Segment's signature, it does not need the body.)"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, g, jsonify, request
from marshmallow import ValidationError

from refiner_source.store import StoreUnavailable
from refiner_source.to_segment.events import WebhookSchema, check_limits, shape_of, well_formed_event_name
from refiner_source.to_segment.intake import prepare
from refiner_source.to_segment.mapping import event_name
from refiner_source.validation import error_fields
from refiner_source.web.auth import presented_token, token_ok
from refiner_source.web.body import BODY_LIMITS, over_limit, parse_json, read_body, too_large
from refiner_source.web.counts import SOURCES
from refiner_source.web.state import error, state

log = logging.getLogger(__name__)

PATH = "/webhooks/refiner"
MAX_BODY_BYTES = 1 << 20
BODY_LIMITS[PATH] = MAX_BODY_BYTES
SOURCES[PATH] = "refiner"
bp = Blueprint("refiner_to_segment", __name__)
_webhook = WebhookSchema()


def _authenticate(secrets: tuple[str, ...]):
    """None when the request carries one of the webhook's tokens, else the 401 to answer."""
    token = presented_token(request.args.get("token"), request.headers.get("Authorization"))
    if token is None:
        return error(401, "missing_token", "Add ?token=<REFINER_WEBHOOK_SECRET> to the webhook URL, or send Authorization: Bearer <token>.")
    if not token_ok(token, secrets):
        return error(401, "invalid_token", "The token does not match REFINER_WEBHOOK_SECRET.")
    return None


@bp.post(PATH)
def receive_webhook():
    app_state = state()
    settings = app_state.settings
    if not settings.to_segment_on:
        return error(404, "not_enabled", "Refiner to Segment is off: set SEGMENT_WRITE_KEY and REFINER_WEBHOOK_SECRET to turn it on.")
    refused = _authenticate(settings.webhook_secrets)
    if refused is not None:
        return refused
    raw = read_body(MAX_BODY_BYTES)
    if raw is None:
        return too_large(MAX_BODY_BYTES)
    body, failed = parse_json(raw, "a JSON object")
    if failed is not None:
        return failed
    if not isinstance(body, dict):
        return error(422, "invalid_shape", "Expected a JSON object.", fields={"_schema": ["Expected a JSON object."]})
    limit = check_limits(body)
    if limit is not None:
        return over_limit(limit.code, limit.path, limit.message)
    if isinstance(body.get("response"), dict) and isinstance(body["response"].get("uuid"), str):
        g.response_id = body["response"]["uuid"]

    rules = settings.rules
    triggered_event = body.get("triggered_event")
    # Not forwarded: answered 200 ignored, the rest unvalidated. A name that is not a
    # valid one (empty, too long, NUL) goes on to validation, which says so with a 422.
    if well_formed_event_name(triggered_event) and event_name(triggered_event, rules) is None:
        reason = "turned off in the mapping file" if triggered_event in rules.events else "not a forwarded event"
        log.info("ignored", extra={"triggered_event": triggered_event[:100], "outcome": "ignored"})
        g.webhook_counts = {"ignored": 1}
        return jsonify({"status": "ignored", "reason": f"triggered_event {triggered_event!r}: {reason}"}), 200

    try:
        event = _webhook.load(body)  # the one validation pass
    except ValidationError as exc:
        return _unprocessable(exc, body)
    entry = prepare(event, rules)
    try:
        stored = app_state.outbox.store_grouped(entry)
    except StoreUnavailable as exc:
        log.error("store unavailable", extra={"response_id": event.response_uuid, "error": str(exc), "outcome": "unavailable"})
        return error(503, "store_unavailable", "The store is not answering; please retry.")
    if not stored:
        log.info("duplicate", extra={"response_id": event.response_uuid, "outcome": "duplicate"})
        g.webhook_counts = {"duplicate": 1}
        return jsonify({"status": "duplicate", "response_id": event.response_uuid, "messages": 0}), 200
    log.info("accepted", extra={"response_id": event.response_uuid, "messages": entry.message_count, "outcome": "accepted"})
    g.webhook_counts = {"accepted": 1}
    return jsonify({"status": "accepted", "response_id": event.response_uuid, "messages": entry.message_count}), 202


def _unprocessable(exc: ValidationError, body: dict[str, Any]):
    fields = error_fields(exc)
    # The shape (keys and types), never the values: a rejected body still carries answers.
    log.info("rejected", extra={"outcome": "rejected", "reason": "invalid_payload", "fields": sorted(fields), "shape": shape_of(body)})
    return error(422, "invalid_payload", "The body does not have the shape of a Refiner webhook.", fields=fields)
