"""A webhook's body: read within its route's limit, parsed as strict JSON, and the 413 and 422
answers its size, depth and shape earn."""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from refiner_source.validation import Refused, strict_json
from refiner_source.web.state import error

log = logging.getLogger(__name__)

LARGEST_BODY_BYTES = 8 << 20  # POST /webhooks/segment (a batch of Segment events); the app's limit
# Each webhook route registers its path here with its limit, so that a 413 raised before the route runs names it.
BODY_LIMITS: dict[str, int] = {}


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
    try:
        return strict_json(raw, expected), None
    except Refused as exc:
        return None, refusal(exc)


def refusal(exc: Refused) -> tuple[Response, int]:
    """The answer to a refused body; a 422 is logged as rejected, with its reason and field paths (never values)."""
    if exc.status == 422:
        log.info("rejected", extra={"outcome": "rejected", "reason": exc.code, "fields": sorted(exc.fields or {})})
    return error(exc.status, exc.code, exc.message, **({"fields": exc.fields} if exc.fields is not None else {}))


def over_limit(code: str, path: str, message: str):
    log.info("rejected", extra={"outcome": "rejected", "reason": code, "fields": [path]})
    return error(422, code, message, fields={path: [message]})


def too_large(limit: int):
    return error(413, "body_too_large", f"The body is larger than {limit} bytes.")
