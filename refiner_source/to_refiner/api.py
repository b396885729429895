"""Refiner's REST API as the destination of Segment's events: one identify-user or track-event
call POSTed, its answer turned into the delivery loop's words (taken, RetryLater, Rejected)."""

from __future__ import annotations

import requests

from refiner_source.delivery.answers import Rejected, RetryLater, raise_for
from refiner_source.refiner_rest import Sessions
from refiner_source.to_refiner.mapping import RefinerCall


class RefinerApi:
    """Refiner's REST API for writing: the identify-user and track-event calls of this direction."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.sessions = Sessions(api_key)

    def send(self, call: RefinerCall) -> None:
        """POST one call. Returns when Refiner took it (2xx); raises RetryLater (the network failing)
        or RetryLater or Rejected as the answer's status says (refiner_source.delivery.answers.verdict)."""
        try:
            answer = self.sessions.session().post(self.base_url + call.path, json=call.body, timeout=self.timeout, allow_redirects=False)
        except requests.exceptions.InvalidJSONError as exc:  # not writable as JSON (NaN): no retry can help
            raise Rejected(0, f"the call cannot be written as JSON: {exc}") from exc
        except requests.RequestException as exc:
            raise RetryLater(f"network: {type(exc).__name__}", None) from exc
        if not 200 <= answer.status_code < 300:
            raise_for(answer.status_code, f"HTTP {answer.status_code}: {answer.text[:500]}", answer)
