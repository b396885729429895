"""POST /webhooks/refiner: the target of Refiner's webhook. The token, then the size, then the body,
validated in one pass and stored as one event before the answer (web.webhook builds the route).
(The token comes first, before the body is read: unlike Segment's signature, it does not need the body.)"""

from __future__ import annotations

import logging

from flask import Blueprint, g, jsonify, request

from refiner_source.config import Settings
from refiner_source.directions import DIRECTIONS, SEGMENT
from refiner_source.directions.validation import Refused, strict_json
from refiner_source.privacy import FORGOTTEN
from refiner_source.to_segment.admission import Ignored, admit
from refiner_source.to_segment.events import shape_of
from refiner_source.web.auth import presented_token, token_ok
from refiner_source.web.body import read_body, refusal, too_large
from refiner_source.web.state import error
from refiner_source.web.webhook import take, webhook

log = logging.getLogger(__name__)

MAX_BODY_BYTES = DIRECTIONS[SEGMENT].body_limit
bp = Blueprint("refiner_to_segment", __name__)


def _authenticate(secrets: tuple[str, ...]):
    """None when the request carries one of the webhook's tokens, else the 401 to answer."""
    token = presented_token(request.args.get("token"), request.headers.get("Authorization"))
    if token is None:
        return error(401, "missing_token", "Add ?token=<REFINER_WEBHOOK_SECRET> to the webhook URL, or send Authorization: Bearer <token>.")
    if not token_ok(token, secrets):
        return error(401, "invalid_token", "The token does not match REFINER_WEBHOOK_SECRET.")
    return None


@webhook(bp, SEGMENT)
def receive_webhook(settings: Settings):
    refused = _authenticate(settings.webhook_secrets)
    if refused is not None:
        return refused
    raw = read_body(MAX_BODY_BYTES)
    if raw is None:
        return too_large(MAX_BODY_BYTES)
    body = None
    try:
        body = strict_json(raw, "a JSON object")
        if isinstance(body, dict) and isinstance(body.get("response"), dict) and isinstance(body["response"].get("uuid"), str):
            g.response_id = body["response"]["uuid"]
        admitted = admit(body, settings.rules)
    except Refused as exc:
        # A body of the wrong shape is logged with its shape (keys and types), never its values: it still carries answers.
        return refusal(exc, **({"shape": shape_of(body)} if exc.code == "invalid_payload" else {}))
    if isinstance(admitted, Ignored):
        log.info("ignored", extra={"triggered_event": admitted.triggered_event[:100], "outcome": "ignored"})
        return _ignored(admitted.reason)
    entry = admitted
    new, forgotten = take([entry])
    if forgotten:  # erased by `refiner-source forget`: never stored again
        log.info("ignored", extra={"response_id": entry.source_id, "reason": FORGOTTEN, "outcome": "ignored"})
        return _ignored(FORGOTTEN)
    if not new:
        log.info("duplicate", extra={"response_id": entry.source_id, "outcome": "duplicate"})
        g.webhook_counts = {"duplicate": 1}
        return jsonify({"status": "duplicate", "response_id": entry.source_id, "messages": 0}), 200
    log.info("accepted", extra={"response_id": entry.source_id, "messages": entry.message_count, "outcome": "accepted"})
    g.webhook_counts = {"accepted": 1}
    return jsonify({"status": "accepted", "response_id": entry.source_id, "messages": entry.message_count}), 202


def _ignored(reason: str):
    g.webhook_counts = {"ignored": 1}
    return jsonify({"status": "ignored", "reason": reason}), 200
