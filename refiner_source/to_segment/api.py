"""Segment's HTTP API: one batch of messages POSTed with segment-analytics-python's request.post,
its answer turned into the delivery loop's words (taken, RetryLater, Rejected)."""

from __future__ import annotations

import logging
from typing import Any

import requests
from segment.analytics.request import APIError, post

from refiner_source.delivery.backoff import retry_after
from refiner_source.delivery.loop import Rejected, RetryLater, is_retryable

# Refusals that are about our credentials or host, not about a message: splitting the batch would
# wrongly dead-letter everything, so they wait and retry while the operator fixes the setting.
CONFIGURATION_STATUSES = frozenset({401, 403, 404})


class SegmentApi:
    """POST /v1/batch on SEGMENT_HOST with the write key, gzipped."""

    def __init__(self, write_key: str, host: str, timeout: float = 15.0) -> None:
        self.write_key = write_key
        self.host = host
        self.timeout = timeout
        quiet_library_duplicates()

    def send_batch(self, messages: list[dict[str, Any]]) -> None:
        """Returns when Segment took the batch; raises RetryLater (network, 408, 429, 5xx; the
        credentials or host refused, or a 3xx: `key_problem`) or Rejected (a message is at fault)."""
        try:
            post(self.write_key, self.host, gzip=True, timeout=self.timeout, batch=messages)
        except APIError as exc:
            reason = f"HTTP {exc.status}: {exc.code}"
            # A 3xx reaching us is one requests would not follow: SEGMENT_HOST points at a proxy or redirector.
            if exc.status in CONFIGURATION_STATUSES or 300 <= exc.status < 400:
                raise RetryLater(reason, retry_after(exc.response), exc.status, key_problem=True) from exc
            if is_retryable(exc.status):
                raise RetryLater(reason, retry_after(exc.response), exc.status) from exc
            raise Rejected(exc.status, f"HTTP {exc.status} {exc.code}: {exc.message}") from exc
        except requests.RequestException as exc:
            raise RetryLater(f"network: {type(exc).__name__}", None) from exc


class _DropLibraryErrors(logging.Filter):
    """segment-analytics-python logs an ERROR of its own for an answer that is not Segment's JSON
    ("Unknown error: [503] ..."); the loop logs each answer itself, with what it will do about
    it, so that copy is dropped. The library's other records (its redirect hint, Retry-After) pass."""

    DUPLICATES = ("Unknown error:",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.DUPLICATES))


def quiet_library_duplicates() -> None:
    library = logging.getLogger("segment")
    if not any(isinstance(f, _DropLibraryErrors) for f in library.filters):
        library.addFilter(_DropLibraryErrors())
