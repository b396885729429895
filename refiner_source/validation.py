"""What both directions' validation shares, with no web framework (a backfill's mapping processes
use it too): a marshmallow error as flat field paths, and whether a text can be kept as it is."""

from __future__ import annotations

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
                walk(value, f"{path}.{i}")
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
