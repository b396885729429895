"""Who may post a webhook: a shared token, or Segment's HMAC-SHA1 signature of the body. Functions
of the presented values and the secrets only, so that each route passes in what it read."""

from __future__ import annotations

import hashlib
import hmac


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


def signature_ok(raw: bytes, signature: str, secret: str) -> bool:
    """Whether `signature` is the hex HMAC-SHA1 of `raw` (a body, or a batch's first event), keyed with the secret."""
    return digest_ok(hmac.new(secret.encode("utf-8"), raw, hashlib.sha1), signature)


def digest_ok(mac: hmac.HMAC, signature: str) -> bool:
    """Whether `signature` is the hex digest of `mac` (any case, spaces around it), compared in constant time."""
    given = signature.strip().lower().encode("ascii", "replace")
    return hmac.compare_digest(mac.hexdigest().encode(), given)
