"""Logging as one JSON object per line on stdout, which is what Heroku and log shippers read."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else came in through `extra=` and is emitted as a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # ASCII escapes: a lone surrogate from a hostile body must not break the log stream.
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send every logger to stdout as JSON lines; idempotent."""
    root = logging.getLogger()
    if not any(getattr(h, "_refiner_source", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        handler._refiner_source = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # The Segment library logs every request body at DEBUG; keep answers out even then.
    logging.getLogger("segment").setLevel(max(logging.INFO, logging.getLevelName(level)))
    # Alembic says at INFO how it sets itself up at every start; its warnings and errors still show.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLevelName(level)))
