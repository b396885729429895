"""Who may post a webhook: a shared token, or Segment's HMAC-SHA1 signature of the body. Functions
of the presented values and the secrets only, so that each route passes in what it read."""

from __future__ import annotations

import hashlib
import hmac
import json


def presented_token(query_token: str | None, authorization: str | None) -> str | None:
    """The token of `?token=`, else of `Authorization: Bearer`, else None."""
    if query_token:
        return query_token
    scheme, _, value = (authorization or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def token_ok(presented: str, secrets: tuple[str, ...]) -> bool:
    # Compare against every secret, without stopping at the first match, in constant time each.
    given = presented.encode("utf-8", "surrogateescape")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(given, secret.encode("utf-8"))
    return matched


def first_element(raw: bytes) -> bytes | None:
    """The exact text of a JSON array's first element, which is what Segment signs for a batch."""
    try:
        text = raw.decode("utf-8")
        start = len(text) - len(text.lstrip())
        if not text.startswith("[", start):
            return None
        start += 1
        start += len(text[start:]) - len(text[start:].lstrip())
        _, end = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    return text[start:end].encode("utf-8")


def signature_ok(raw: bytes, signature: str, secret: str) -> bool:
    """Whether `signature` is the hex HMAC-SHA1 of the body, or of a batch's first event, keyed with the secret."""
    given = signature.strip().lower().encode("ascii", "replace")
    key = secret.encode("utf-8")
    if hmac.compare_digest(hmac.new(key, raw, hashlib.sha1).hexdigest().encode(), given):
        return True
    first = first_element(raw)
    return first is not None and hmac.compare_digest(hmac.new(key, first, hashlib.sha1).hexdigest().encode(), given)
