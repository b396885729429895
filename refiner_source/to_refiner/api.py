"""Refiner's REST API as the destination of Segment's events: one identify-user or track-event
call POSTed, its answer turned into the delivery loop's words (taken, RetryLater, Rejected)."""

from __future__ import annotations

import requests

from refiner_source.delivery.backoff import retry_after
from refiner_source.delivery.loop import Rejected, RetryLater, is_retryable
from refiner_source.refiner_rest import RefinerClient
from refiner_source.to_refiner.mapping import RefinerCall


class RefinerApi(RefinerClient):
    """The shared Refiner REST client (Bearer key, a session per thread), with the calls of this direction."""

    def send(self, call: RefinerCall) -> None:
        """POST one call. Returns when Refiner took it (2xx); raises RetryLater (network, 408, 429,
        5xx; 401/403 with `key_problem`; a 3xx, which is REFINER_API_URL pointing at a redirect)
        or Rejected (any other answer: the call itself is at fault)."""
        try:
            answer = self.session().post(self.base_url + call.path, json=call.body, timeout=self.timeout, allow_redirects=False)
        except requests.exceptions.InvalidJSONError as exc:  # not writable as JSON (NaN): no retry can help
            raise Rejected(0, f"the call cannot be written as JSON: {exc}") from exc
        except requests.RequestException as exc:
            raise RetryLater(f"network: {type(exc).__name__}", None) from exc
        status = answer.status_code
        if 200 <= status < 300:
            return
        detail = f"HTTP {status}: {answer.text[:500]}"
        if status in (401, 403):
            raise RetryLater(detail, retry_after(answer), status, key_problem=True)
        if is_retryable(status):
            raise RetryLater(detail, retry_after(answer), status)
        raise Rejected(status, detail)
