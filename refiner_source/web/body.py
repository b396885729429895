"""A webhook's body: read within its route's limit, and the answers a body too large (413) or
refused by its route's admission (400, 422) earns."""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from refiner_source.directions import LARGEST_BODY_BYTES, by_path
from refiner_source.directions.validation import Refused
from refiner_source.directions.validation import too_large as body_too_large

log = logging.getLogger(__name__)



def body_limit(path: str) -> int:
    """The body limit of the route at `path`: its direction's, else the app's (the largest), so that
    a 413 raised before the route runs names the route's own."""
    direction = by_path(path)
    return direction.body_limit if direction is not None else LARGEST_BODY_BYTES


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


def refusal(exc: Refused, **log_extra: Any) -> tuple[Response, int]:
    """The answer to a refused body. A 422 is logged as rejected, with its reason and field paths
    (never values), and what the route adds in `log_extra`."""
    if exc.status == 422:
        log.info("rejected", extra={"outcome": "rejected", "reason": exc.code, "fields": sorted(exc.fields or {}), **log_extra})
    return jsonify(exc.answer()), exc.status


def too_large(limit: int) -> tuple[Response, int]:
    return refusal(body_too_large(limit))
