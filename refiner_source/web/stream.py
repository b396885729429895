"""A request body read as it arrives: either whole (a single event), or, when it is a JSON array,
one element at a time with each element's exact text. So a batch of any size Segment can send is
parsed and stored in bounded memory, and its first element (what Segment signs) can be checked
before anything is stored. No web framework: it reads from any `read(size) -> bytes`.

Each element is parsed as `validation.strict_json` parses a whole body (no NaN, no Infinity, no
number too large to write back), so a batch's events are read the same way one event is.
"""

from __future__ import annotations

import codecs
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from refiner_source.directions.validation import Refused, strict_decoder, too_large

# Large reads: gunicorn's body reader copies what it holds ahead at each read, so 64 KiB reads of a
# 125 MiB batch spent a seventh of the request's time in that copy (py-spy; figures in bench/README.md).
CHUNK_BYTES = 1 << 20
_NOT_WHITESPACE = re.compile(r"[^ \t\n\r]")
_NOT_WHITESPACE_BYTE = re.compile(rb"[^ \t\n\r]")
# How close to the end of what has arrived a parse error may be and still mean "the element goes on".
_NEAR_THE_END = 16


@dataclass(frozen=True)
class Element:
    """One element of a JSON array: its place, its exact text (as the sender wrote it) and its value."""

    index: int
    text: str
    value: Any


def not_utf8() -> Refused:
    return Refused(400, "invalid_encoding", "The body is not UTF-8.")


class Body:
    """The body of one request, read in chunks of at most `CHUNK_BYTES`, never more than `limit`
    bytes in all (over it: Refused 413). `tap` sees every chunk as it is read (a running HMAC)."""

    def __init__(self, read: Callable[[int], bytes], limit: int, tap: Callable[[bytes], Any] | None = None) -> None:
        self._read = read
        self._limit = limit
        self._tap = tap
        self.size = 0  # bytes read so far
        self._raw = bytearray()  # bytes read and not yet handed on (see first_byte)
        self._ended = False
        self._from_sender = True  # False once the rest is read from a spool

    def _chunk(self) -> bytes:
        """The next chunk of the body, b"" at its end."""
        if self._ended:
            return b""
        chunk = self._read(CHUNK_BYTES)
        if not chunk:
            self._ended = True
            return b""
        if self._from_sender:
            self.size += len(chunk)
            if self.size > self._limit:
                raise too_large(self._limit)
            if self._tap is not None:
                self._tap(chunk)
        return chunk

    def first_byte(self) -> int | None:
        """The first byte that is not JSON whitespace, or None for a blank body; nothing is lost by looking."""
        while True:
            match = _NOT_WHITESPACE_BYTE.search(self._raw)
            if match is not None:
                return self._raw[match.start()]
            chunk = self._chunk()
            if not chunk:
                return None
            self._raw += chunk

    def whole(self, limit: int) -> bytes:
        """The whole body, when it is at most `limit` bytes (else Refused 413)."""
        while True:
            if len(self._raw) > limit:
                raise too_large(limit)
            chunk = self._chunk()
            if not chunk:
                return bytes(self._raw)
            self._raw += chunk

    def spool_rest(self) -> None:
        """Read the rest of the body now, into a temporary file (in memory up to a few MiB, then on
        disk), and read on from there: so that something about the whole body (its HMAC, by `tap`)
        is known before any of it is used, without holding it in memory."""
        spool = tempfile.SpooledTemporaryFile(max_size=4 << 20)
        while chunk := self._chunk():
            spool.write(chunk)
        spool.seek(0)
        # What the spool gives back was counted, limited and tapped as it arrived.
        self._read, self._ended, self._from_sender = spool.read, False, False

    def drain(self) -> None:
        """Read and drop what is left of the body (up to the limit), so that an answer given before
        the end reaches a sender that is still uploading instead of a closed connection."""
        try:
            while self._chunk():
                pass
        except Refused:
            pass

    def elements(self, element_limit: int) -> Iterator[Element]:
        """The elements of the body, a JSON array, in order, each at most `element_limit` bytes
        (over it: Refused 413). Raises Refused 400 as soon as the text stops being JSON (what came
        before it has been yielded), 422 for an element nested too deeply."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        text = ""
        pos = 0

        def more() -> bool:
            """Append the next chunk to `text`, dropping what has been read; False at the end."""
            nonlocal text, pos
            raw = bytes(self._raw) if self._raw else self._chunk()
            self._raw.clear()
            try:
                added = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError:
                raise not_utf8() from None
            text, pos = text[pos:] + added, 0
            return bool(raw)

        def next_char() -> str | None:
            """The next character that is not whitespace (not consumed), None at the end."""
            nonlocal pos
            while True:
                match = _NOT_WHITESPACE.search(text, pos)
                if match is not None:
                    pos = match.start()
                    return text[pos]
                pos = len(text)
                if not more():
                    return None

        def element(index: int) -> Element:
            nonlocal pos
            while True:
                try:
                    value, end = strict_decoder.raw_decode(text, pos)
                except json.JSONDecodeError as exc:
                    if _may_go_on(exc, len(text)):
                        if len(text) - pos > element_limit:  # it runs on past all that has arrived
                            raise _element_too_large(index, element_limit) from None
                        if more():
                            continue
                    raise Refused(400, "invalid_json", f"The body is not valid JSON: element {index}: {exc}") from None
                except ValueError as exc:  # NaN, Infinity, 1e999
                    raise Refused(400, "invalid_json", f"The body is not valid JSON: element {index}: {exc}") from None
                except RecursionError:
                    message = f"Element {index} is nested too deeply."
                    raise Refused(422, "too_deep", message, {"_schema": [message]}) from None
                if _is_number(value) and (end == len(text) or text[end] in ".eE") and more():
                    continue  # a number cut by a chunk ("-0" of "-0.25e-3") goes on in the next
                found = Element(index, text[pos:end], value)
                # A character is at most 4 bytes of UTF-8: only a long text needs encoding to be measured.
                if 4 * (end - pos) > element_limit and len(found.text.encode("utf-8")) > element_limit:
                    raise _element_too_large(index, element_limit)
                pos = end
                return found

        if next_char() != "[":
            raise Refused(400, "invalid_shape", "Expected a JSON array.")
        pos += 1
        index = 0
        if next_char() == "]":
            pos += 1
        else:
            while True:
                yield element(index)
                index += 1
                after = next_char()
                if after == ",":
                    pos += 1
                    next_char()
                    continue
                if after == "]":
                    pos += 1
                    break
                found = "the end of the body" if after is None else repr(after)
                message = f"The body is not valid JSON: expected ',' or ']' after element {index - 1}, got {found}."
                raise Refused(400, "invalid_json", message)
        if next_char() is not None:
            raise Refused(400, "invalid_json", "The body is not valid JSON: extra data after the array.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _may_go_on(exc: json.JSONDecodeError, arrived: int) -> bool:
    """Whether a parse error may be only the end of what has arrived so far: a string still open, or
    an error close to the end (a literal, a number or an escape cut in two)."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= arrived - _NEAR_THE_END


def _element_too_large(index: int, limit: int) -> Refused:
    return Refused(413, "event_too_large", f"Element {index} of the batch is larger than {limit} bytes.")
