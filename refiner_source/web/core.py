"""The shared HTTP face: the app's state, body reading and limits, tokens, errors, counts, /healthz, /readyz, /openapi.json."""

from __future__ import annotations

import hmac
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from refiner_source.config import Settings
from refiner_source.ops.tally import WEBHOOK, Tally
from refiner_source.run.supervisor import worker_running
from refiner_source.store import Outbox, StoreUnavailable

log = logging.getLogger(__name__)

LARGEST_BODY_BYTES = 8 << 20  # POST /webhooks/segment (a batch of Segment events); the app's limit
bp = Blueprint("web", __name__)
# Each webhook route registers its path here: its body limit (the 413 names it) and the source it counts under.
BODY_LIMITS: dict[str, int] = {}
SOURCES: dict[str, str] = {}


@dataclass(frozen=True)
class AppState:
    settings: Settings
    outbox: Outbox
    delivery_pidfile: str | None = None  # under `refiner-source serve`: where the embedded worker's pid is
    tally: Tally | None = None  # this process's counts of webhooks, for /status and /metrics


def state() -> AppState:
    return current_app.extensions["refiner_source"]


def error(status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), status


def presented_token() -> str | None:
    token = request.args.get("token")
    if token:
        return token
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def token_ok(presented: str, secrets: tuple[str, ...]) -> bool:
    # Compare against every secret, without stopping at the first match, in constant time each.
    given = presented.encode("utf-8", "surrogateescape")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(given, secret.encode("utf-8"))
    return matched


def read_body(limit: int) -> bytes | None:
    """The body, or None when it is over `limit` bytes (also when it comes chunked, without a length).

    The app's MAX_CONTENT_LENGTH is one byte more than the largest route limit, and this reads at
    most `limit` + 1 bytes, so a stream over the limit shows itself by that byte instead of being
    cut off silently at the limit.
    """
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            chunk = request.stream.read(min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except RequestEntityTooLarge:
        return None
    return None if size > limit else b"".join(chunks)


def parse_json(raw: bytes, expected: str) -> tuple[Any, tuple[Response, int] | None]:
    """(the parsed body, None), or (None, the error answer) when it is empty, not UTF-8 or not JSON."""
    if not raw.strip():
        return None, error(400, "empty_body", f"The body is empty; expected {expected}.")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite), None
    except UnicodeDecodeError:
        return None, error(400, "invalid_encoding", "The body is not UTF-8.")
    except RecursionError:
        return None, over_limit("too_deep", "_schema", "The JSON is nested too deeply.")
    except ValueError as exc:
        return None, error(400, "invalid_json", f"The body is not valid JSON: {exc}")


def _finite(text: str) -> float:
    # 1e999 is valid JSON that Python reads as infinity, which no JSON encoder writes back.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is too large for a JSON number")
    return value


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259); Python accepts them, Segment would not.
    raise ValueError(f"{name} is not a JSON value")


def over_limit(code: str, path: str, message: str):
    log.info("rejected", extra={"outcome": code, "fields": [path]})
    return error(422, code, message, fields={path: [message]})


def too_large(limit: int):
    return error(413, "body_too_large", f"The body is larger than {limit} bytes.")


@bp.after_app_request
def count_webhook(response: Response) -> Response:
    """Count each webhook by source and outcome (accepted, duplicate, ignored, rejected, unavailable):
    what the route put in `g.webhook_counts` (for a batch of Segment events, each event), else what
    its error status says. A route that is off (404) is not counted."""
    source = SOURCES.get(request.path)
    app_state = current_app.extensions.get("refiner_source")
    if source is None or app_state is None or app_state.tally is None or request.method != "POST" or response.status_code == 404:
        return response
    status = response.status_code
    counts = g.get("webhook_counts") if status < 400 else {"unavailable" if status == 503 else "rejected": 1}
    for outcome, n in (counts or {}).items():
        app_state.tally.add(WEBHOOK, source, outcome, n)
    return response


@bp.get("/openapi.json")
def openapi():
    document = current_app.extensions.get("refiner_source_openapi")
    if document is None:
        from refiner_source import __version__
        from refiner_source.web.openapi import build_openapi

        document = current_app.extensions["refiner_source_openapi"] = build_openapi(__version__)
    return jsonify(document)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    app_state = state()
    try:
        app_state.outbox.ping()
    except StoreUnavailable:
        return error(503, "store_unavailable", "The store is not answering.")
    if app_state.delivery_pidfile and not worker_running(app_state.delivery_pidfile):
        return error(
            503, "delivery_worker_down", "The embedded delivery worker is not running (refiner-source serve restarts it; see the log)."
        )
    return jsonify({"status": "ready"})


@bp.app_errorhandler(HTTPException)
def http_error(exc: HTTPException):
    if isinstance(exc, RequestEntityTooLarge):
        return too_large(BODY_LIMITS.get(request.path, LARGEST_BODY_BYTES))
    response, status = error(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"), exc.description or exc.name)
    for name, value in exc.get_headers():  # e.g. Allow on a 405, as RFC 9110 requires
        if name.lower() != "content-type":
            response.headers[name] = value
    return response, status


@bp.app_errorhandler(Exception)
def unexpected_error(exc: Exception):
    log.exception("unexpected error", extra={"path": request.path, "response_id": g.get("response_id")})
    return error(500, "internal_error", "Unexpected error; it has been logged.")
