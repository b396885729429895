"""What both directions' validation shares, with no web framework (a backfill's mapping processes and
`refiner-source preview` use it too): strict JSON, the refusal a webhook answers, a marshmallow error
as flat field paths, and whether a text can be kept as it is."""

from __future__ import annotations

import json
import math
from typing import Any

from marshmallow import ValidationError


def error_fields(error: ValidationError) -> dict[str, list[str]]:
    """Flatten marshmallow's nested messages into {"response.uuid": ["..."]} for a 422 body."""
    out: dict[str, list[str]] = {}

    def walk(messages: Any, path: str) -> None:
        if isinstance(messages, dict):
            for key, value in messages.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(messages, list) and all(isinstance(m, str) for m in messages):
            out.setdefault(path or "_schema", []).extend(messages)
        elif isinstance(messages, list):
            for i, value in enumerate(messages):
                walk(value, f"{path}.{i}" if path else str(i))
        else:
            out.setdefault(path or "_schema", []).append(str(messages))

    walk(error.messages, "")
    return out


def storable(text: str) -> bool:
    """Whether a text can be stored and logged as it is: UTF-8 encodable (no lone surrogates), no NUL."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Refused(Exception):
    """A body the webhook refuses: the HTTP status, the error code and message it answers, and the
    failing field paths (422)."""

    def __init__(self, status: int, code: str, message: str, fields: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields

    def answer(self) -> dict[str, Any]:
        """The JSON the webhook answers."""
        return {"error": self.code, "message": self.message, **({"fields": self.fields} if self.fields is not None else {})}


def too_large(limit: int) -> Refused:
    """The refusal of a body over its route's limit."""
    return Refused(413, "body_too_large", f"The body is larger than {limit} bytes.")


def strict_json(raw: bytes, expected: str) -> Any:
    """The body parsed as JSON as RFC 8259 has it (no NaN, no Infinity, no number too large to
    write back); raises Refused when it is empty, not UTF-8, not JSON or nested too deeply."""
    if not raw.strip():
        raise Refused(400, "empty_body", f"The body is empty; expected {expected}.")
    try:
        return strict_decoder.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refused(400, "invalid_encoding", "The body is not UTF-8.") from None
    except RecursionError:
        message = "The JSON is nested too deeply."
        raise Refused(422, "too_deep", message, {"_schema": [message]}) from None
    except ValueError as exc:
        raise Refused(400, "invalid_json", f"The body is not valid JSON: {exc}") from None


def _finite(text: str) -> float:
    # 1e999 is valid JSON that Python reads as infinity, which no JSON encoder writes back.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is too large for a JSON number")
    return value


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259); Python accepts them, Segment would not.
    raise ValueError(f"{name} is not a JSON value")


# JSON as strict_json reads it; also each element of a batch read as it arrives (web.stream).
strict_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)
