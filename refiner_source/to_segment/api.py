"""Segment's HTTP API: one batch of messages POSTed with segment-analytics-python's request.post,
its answer turned into the delivery loop's words (taken, RetryLater, Rejected)."""

from __future__ import annotations

import logging
from typing import Any

import requests
from segment.analytics.request import APIError, post

from refiner_source.delivery.answers import RetryLater, raise_for


class SegmentApi:
    """POST /v1/batch on SEGMENT_HOST with the write key, gzipped."""

    def __init__(self, write_key: str, host: str, timeout: float = 15.0) -> None:
        self.write_key = write_key
        self.host = host
        self.timeout = timeout
        quiet_library_duplicates()

    def send_batch(self, messages: list[dict[str, Any]]) -> None:
        """Returns when Segment took the batch; raises RetryLater or Rejected as the answer's status
        says (refiner_source.delivery.answers.verdict): a batch Segment refuses for a setting (the
        write key, SEGMENT_HOST) is never split, which would dead-letter every message in it."""
        try:
            post(self.write_key, self.host, gzip=True, timeout=self.timeout, batch=messages)
        except APIError as exc:
            # The library raises for any answer but 200; a 3xx reaching us is one requests did not follow.
            raise_for(exc.status, f"HTTP {exc.status} {exc.code}: {exc.message}", exc.response)
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
