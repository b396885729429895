"""POST /webhooks/segment: the target of Segment's Webhooks destination (statuses: docs/http.md).

The size, then the signature (or token); then each event of the body (one, or an array when
Segment's batching is on) is validated on its own, so that a malformed one never costs the others.
A batch is read as it arrives and stored in groups: the largest one Segment sends (4,000 events of
up to 32 KB) is taken in bounded memory. Its first event, which Segment signs, is checked before
anything is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from flask import Blueprint, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from refiner_source.config import Settings
from refiner_source.directions import DIRECTIONS, REFINER
from refiner_source.directions.validation import Refused, strict_json
from refiner_source.store import StoreUnavailable
from refiner_source.to_refiner.admission import Admitted, admit, admit_batch, not_a_body
from refiner_source.to_refiner.events import MAX_EVENT_BYTES
from refiner_source.web.auth import digest_ok, presented_token, signature_ok, token_ok
from refiner_source.web.body import refusal, too_large
from refiner_source.web.state import error
from refiner_source.web.stream import Body, Element
from refiner_source.web.webhook import take, webhook

log = logging.getLogger(__name__)

MAX_SEGMENT_BODY_BYTES = DIRECTIONS[REFINER].body_limit
# A batch is validated and stored this many events (or characters of their text) at a time.
GROUP_EVENTS = 500
GROUP_CHARS = 4 << 20
bp = Blueprint("segment_to_refiner", __name__)


def _invalid_signature():
    return error(401, "invalid_signature", "The signature or token does not match SEGMENT_SHARED_SECRET.")


def _read_request(size: int) -> bytes:
    try:
        return request.stream.read(size)
    except RequestEntityTooLarge:  # the app's own limit, just above this route's
        raise too_large(MAX_SEGMENT_BODY_BYTES) from None


@webhook(bp, REFINER)
def receive_segment(settings: Settings):
    if request.content_length is not None and request.content_length > MAX_SEGMENT_BODY_BYTES:
        return too_large(MAX_SEGMENT_BODY_BYTES)
    secret = settings.segment_shared_secret
    signature = request.headers.get("X-Signature")
    token = presented_token(request.args.get("token"), request.headers.get("Authorization"))
    if signature is None and token is None:
        return error(
            401,
            "missing_signature",
            "Expected X-Signature (set the Webhooks destination's shared secret to SEGMENT_SHARED_SECRET), "
            "or the secret as Authorization: Bearer or ?token=.",
        )
    by_token = token is not None and token_ok(token, (secret,))
    if not by_token and signature is None:
        return _invalid_signature()
    # The HMAC of the whole body, kept as it arrives, for a batch signed as a whole rather than by its first event.
    whole = None if by_token else hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha1)
    body = Body(_read_request, MAX_SEGMENT_BODY_BYTES, tap=whole.update if whole is not None else None)
    try:
        if body.first_byte() == ord("["):
            check = None if by_token else lambda first: _signed(body, first, whole, signature, secret)
            return _receive_batch(body, check, settings)
        raw = body.whole(MAX_EVENT_BYTES)
        if not by_token and not signature_ok(raw, signature, secret):
            return _invalid_signature()
        admitted = admit(strict_json(raw, "a Segment event (a JSON object) or an array of them"), settings.rules)
    except Refused as exc:
        return refusal(exc, **({"source": "segment"} if exc.code == "invalid_event" else {}))
    new = _store(admitted)
    taken = _Taken()
    taken.add(admitted, new)
    return _answer(taken)


def _store(admitted: Admitted) -> int:
    """Stores `admitted`'s entries, but for those of people on the suppression list, which become
    ignored ("forgotten"); how many were new."""
    new, forgotten = take(admitted.entries)
    admitted.set_aside(forgotten)
    return new


def _signed(body: Body, first: Element | None, whole: hmac.HMAC, signature: str, secret: str) -> bool:
    """Whether a batch is Segment's: its first event signed (as Segment signs a batch), else the
    whole body (read to its end first, into a spool, so that nothing is stored unchecked)."""
    if first is not None and signature_ok(first.text.encode("utf-8"), signature, secret):
        return True
    body.spool_rest()
    return digest_ok(whole, signature)


def _receive_batch(body: Body, check: Callable[[Element | None], bool] | None, settings: Settings):
    """Read, validate and store a batch a group at a time. `check`: None when a token authenticated
    the request, else the signature's check, given the first element (None for an empty array or
    one that is not JSON), made before anything is stored."""
    elements = body.elements(MAX_EVENT_BYTES)
    try:
        first = next(elements, None)
    except Refused as exc:
        if check is None or exc.status == 413 or check(None):
            return refusal(exc)
        return _invalid_signature()  # what is not JSON cannot be Segment's signed event
    if check is not None and not check(first):
        body.drain()
        return _invalid_signature()
    if first is None:
        return refusal(not_a_body([]))
    taken = _Taken()
    try:
        for group in _groups(chain([first], elements)):
            part = admit_batch(((e.index, e.value) for e in group), settings.rules)
            new = _store(part)
            taken.add(part, new)
    except Refused as exc:  # the body stops being JSON (or grows too large) part-way: say what was taken before
        body.drain()
        counts = {k: _log(taken)[k] for k in ("accepted", "duplicate")}
        before = f" The events before it were taken: {counts['accepted']} accepted, {counts['duplicate']} duplicate."
        return jsonify({**exc.answer(), "message": exc.message + (before if taken.entries else ""), **counts}), exc.status
    except StoreUnavailable:  # Segment retries the 503: what was stored of this batch is then a duplicate
        body.drain()
        _log(taken)
        raise
    return _answer(taken)


@dataclass
class _Taken:
    """What a body's events came to: counted as each group is stored, so that a batch's entries are
    not kept once stored."""

    entries: int = 0
    new: int = 0
    ignored: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)  # the first few, for the log

    def add(self, admitted: Admitted, new: int) -> None:
        self.entries += len(admitted.entries)
        self.new += new
        self.ignored += admitted.ignored
        self.invalid += admitted.invalid
        self.message_ids += [e.receipt_key for e in admitted.entries[: max(0, 20 - len(self.message_ids))]]


def _groups(elements: Iterable[Element]) -> Iterator[list[Element]]:
    """The elements in groups of at most GROUP_EVENTS events or about GROUP_CHARS characters. When the
    body stops being readable, the group read so far comes first, then the error."""
    group: list[Element] = []
    size = 0
    try:
        for element in elements:
            group.append(element)
            size += len(element.text)
            if len(group) >= GROUP_EVENTS or size >= GROUP_CHARS:
                yield group
                group, size = [], 0
    except Refused:
        if group:
            yield group
        raise
    if group:
        yield group


def _log(taken: _Taken) -> dict[str, int]:
    duplicate = taken.entries - taken.new
    ignored, rejected = len(taken.ignored), len(taken.invalid)
    log.info(
        "segment events",
        extra={
            "source": "segment",
            "outcome": "accepted" if taken.new else ("duplicate" if duplicate else "ignored" if ignored else "rejected"),
            "accepted": taken.new,
            "duplicate": duplicate,
            "ignored": ignored,
            "rejected": rejected,
            "message_ids": taken.message_ids,
        },
    )
    g.webhook_counts = {"accepted": taken.new, "duplicate": duplicate, "ignored": ignored, "rejected": rejected}
    return g.webhook_counts


def _answer(taken: _Taken):
    counts = _log(taken)
    answer: dict[str, Any] = {"status": "accepted", **{k: counts[k] for k in ("accepted", "duplicate", "ignored")}}
    answer["invalid"] = taken.invalid
    if taken.ignored:
        answer["ignored_reasons"] = taken.ignored
    return jsonify(answer), 200
