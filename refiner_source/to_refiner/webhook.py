"""POST /webhooks/segment: the target of Segment's Webhooks destination (statuses: docs/http.md).

The size, then the signature (or token), verified on the raw body; then each event of the body
(one, or an array when Segment's batching is on) is validated on its own, so that a malformed one
never costs the others.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, g, jsonify, request

from refiner_source.store import StoreUnavailable
from refiner_source.to_refiner.admission import admit
from refiner_source.validation import Refused, strict_json
from refiner_source.web.auth import presented_token, signature_ok, token_ok
from refiner_source.web.body import BODY_LIMITS, LARGEST_BODY_BYTES, read_body, refusal, too_large
from refiner_source.web.counts import SOURCES
from refiner_source.web.state import error, forgotten, state

log = logging.getLogger(__name__)

PATH = "/webhooks/segment"
MAX_SEGMENT_BODY_BYTES = LARGEST_BODY_BYTES
BODY_LIMITS[PATH] = MAX_SEGMENT_BODY_BYTES
SOURCES[PATH] = "segment"
bp = Blueprint("segment_to_refiner", __name__)


def _authenticate(raw: bytes, secret: str):
    """None when the request carries a valid signature or token, else the 401 to answer."""
    signature = request.headers.get("X-Signature")
    token = presented_token(request.args.get("token"), request.headers.get("Authorization"))
    if signature is None and token is None:
        return error(
            401,
            "missing_signature",
            "Expected X-Signature (set the Webhooks destination's shared secret to SEGMENT_SHARED_SECRET), "
            "or the secret as Authorization: Bearer or ?token=.",
        )
    if (signature is not None and signature_ok(raw, signature, secret)) or (token is not None and token_ok(token, (secret,))):
        return None
    return error(401, "invalid_signature", "The signature or token does not match SEGMENT_SHARED_SECRET.")


@bp.post(PATH)
def receive_segment():
    app_state = state()
    settings = app_state.settings
    if not settings.to_refiner_on:
        return error(
            404,
            "not_enabled",
            "Segment to Refiner is off: set SEGMENT_SHARED_SECRET (the Webhooks destination's shared secret) and REFINER_API_KEY.",
        )
    raw = read_body(MAX_SEGMENT_BODY_BYTES)
    if raw is None:
        return too_large(MAX_SEGMENT_BODY_BYTES)
    refused = _authenticate(raw, settings.segment_shared_secret)
    if refused is not None:
        return refused
    try:
        body = strict_json(raw, "a Segment event (a JSON object) or an array of them")
        admitted = admit(body, settings.rules, forgotten=forgotten)
    except Refused as exc:
        return refusal(exc, **({"source": "segment"} if exc.code == "invalid_event" else {}))
    except StoreUnavailable as exc:  # the suppression list could not be read: nothing is stored unchecked
        log.error("store unavailable", extra={"error": str(exc), "outcome": "unavailable", "source": "segment"})
        return error(503, "store_unavailable", "The store is not answering; please retry.")
    single, entries, ignored, invalid = admitted.single, admitted.entries, admitted.ignored, admitted.invalid

    try:
        if single and entries:
            new = int(app_state.outbox.store_grouped(entries[0]))
        else:
            new = app_state.outbox.store_many(entries) if entries else 0
    except StoreUnavailable as exc:
        log.error("store unavailable", extra={"error": str(exc), "outcome": "unavailable", "source": "segment"})
        return error(503, "store_unavailable", "The store is not answering; please retry.")
    duplicate = len(entries) - new
    log.info(
        "segment events",
        extra={
            "source": "segment",
            "outcome": "accepted" if new else ("duplicate" if duplicate else "ignored" if ignored else "rejected"),
            "accepted": new,
            "duplicate": duplicate,
            "ignored": len(ignored),
            "rejected": len(invalid),
            "message_ids": [e.receipt_key for e in entries][:20],
        },
    )
    g.webhook_counts = {"accepted": new, "duplicate": duplicate, "ignored": len(ignored), "rejected": len(invalid)}
    answer: dict[str, Any] = {"status": "accepted", "accepted": new, "duplicate": duplicate, "ignored": len(ignored), "invalid": invalid}
    if ignored:
        answer["ignored_reasons"] = ignored
    return jsonify(answer), 200
