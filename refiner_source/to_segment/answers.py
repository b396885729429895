"""Survey answers the way analysts use them: each answer converted to the type the mapping file's
[types] gives its question, and the NPS category of the [nps] question's answer. Pure."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

_WHOLE = re.compile(r"[+-]?\d+")
_TRUE = frozenset({"true", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "no", "n", "0", "off"})


class NotConverted(ValueError):
    """The answer does not read as its question's type: it is sent as it came."""


def convert(value: Any, kind: str) -> Any:
    """`value` as `kind` ("number", "boolean", "string" or "list"); raises NotConverted."""
    if kind == "number":
        return _number(value)
    if kind == "boolean":
        return _boolean(value)
    if kind == "string":
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return str(value)
        raise NotConverted
    if kind == "list":
        if isinstance(value, list):
            return value
        if isinstance(value, str | int | float | bool):
            return [value]  # a single choice is a list of one: a comma may be part of an option's text
        raise NotConverted
    raise ValueError(f"unknown answer type {kind!r}")


def _number(value: Any) -> int | float:
    if isinstance(value, bool):
        raise NotConverted
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip()
        if _WHOLE.fullmatch(text):
            try:
                return int(text)
            except ValueError:  # over Python's 4,300 digits: no such answer is a number anyone means
                raise NotConverted from None
        try:
            number = float(text)
        except ValueError:
            raise NotConverted from None
        if math.isfinite(number):
            return number
    raise NotConverted


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise NotConverted


def typed_answers(answers: Mapping[str, Any], types: Mapping[str, str], response_id: str) -> dict[str, Any]:
    """The answers with each typed question's answer converted. One that does not convert is kept
    as it came, and a warning names the question and the response, never the value."""
    out = dict(answers)
    for key, kind in types.items():
        if key not in out or out[key] is None:
            continue
        try:
            out[key] = convert(out[key], kind)
        except NotConverted:
            log.warning(
                "an answer does not read as its question's type; sent as it came",
                extra={"question": key, "type": kind, "response_id": response_id},
            )
    return out


def nps_category(value: Any) -> str | None:
    """promoter (9-10), passive (7-8) or detractor (0-6) of a whole number from 0 to 10; else None."""
    try:
        score = _number(value)
    except NotConverted:
        return None
    if isinstance(score, float):
        if not score.is_integer():
            return None
        score = int(score)
    if not 0 <= score <= 10:
        return None
    return "promoter" if score >= 9 else "passive" if score >= 7 else "detractor"
