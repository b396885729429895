"""Forgetting a person: who an identifier names, the keyed hashes the suppression list keeps of them,
and the per-process view of that list that every webhook, backfill and delivery round consults.

Pure but for `Suppressed`, which reads the store. An identifier is one of three kinds (a user id,
an email, an anonymous id), matched exactly; an email trimmed and in lower case.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from refiner_source.store import Store


class Concerning(Protocol):
    """What names the people it concerns (an Entry of either direction)."""

    people: frozenset[tuple[str, str]]


E = TypeVar("E", bound=Concerning)

log = logging.getLogger(__name__)

USER, EMAIL, ANONYMOUS = "user", "email", "anonymous"
FORGOTTEN = "forgotten"  # the reason a suppressed person's event is ignored
REFRESH_SECONDS = 2.0  # a process reads the list again this often: a forget holds for new webhooks within this bound


def normal(kind: str, value: object) -> str | None:
    """The identifier as it is compared: a string (a number as its text), trimmed; an email in lower case. None: no identifier."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text:
        return None
    return text.lower() if kind == EMAIL else text


def person_of(given: Iterable[tuple[str, object]]) -> set[tuple[str, str]]:
    """The (kind, normalised value) pairs of (kind, value) pairs, leaving out what names nobody."""
    return {(kind, text) for kind, value in given if (text := normal(kind, value)) is not None}


def pairs(user: object = None, email: object = None, anonymous: object = None) -> set[tuple[str, str]]:
    """The (kind, normalised value) pairs of whichever identifiers are given."""
    return person_of(((USER, user), (EMAIL, email), (ANONYMOUS, anonymous)))


def fingerprint(key: bytes) -> str:
    """A short name of a key, kept with each hash: which key made it (it reveals nothing of the key)."""
    return hmac.new(key, b"fingerprint", hashlib.sha256).hexdigest()[:16]


def digest(key: bytes, kind: str, value: str) -> str:
    """The keyed hash of one normalised identifier: what the list keeps instead of the identifier."""
    return hmac.new(key, f"{kind}\n{value}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def digests(key: bytes, person: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(kind, digest(key, kind, value)) for kind, value in person}


STALE_KEY_WARNING = (
    "{n} suppressed people were hashed with a key no longer set: they are no longer suppressed; "
    "set the old secret as REFINER_SUPPRESSION_KEY or forget them again"
)


class Suppressed:
    """This process's copy of the suppression list (the hashes made with the current key). Every
    `refresh` seconds when asked, one aggregate query says whether the list changed, and only then is
    it read again: a `forget` holds for new webhooks within that bound. The delivery loops ask with
    refresh 0, before each claim is sent, so that an event stored in that bound is still not sent.
    Asking costs an HMAC per identifier while anyone is on the list, and the query every `refresh`."""

    def __init__(self, outbox: Store, key: bytes | None, refresh: float = REFRESH_SECONDS) -> None:
        self.outbox = outbox
        self.key = key
        self.key_id = fingerprint(key) if key else None
        self.refresh = refresh
        self._lock = threading.Lock()
        self._hashes: frozenset[tuple[str, str]] = frozenset()
        self._version: tuple[int, float] | None = None
        self._checked_at = float("-inf")
        self._warned = False

    def _current(self) -> frozenset[tuple[str, str]]:
        if time.monotonic() - self._checked_at >= self.refresh:
            with self._lock:
                if time.monotonic() - self._checked_at >= self.refresh:
                    version = self.outbox.suppression_version()
                    if version != self._version:
                        hashes, stale = self.outbox.suppressed_hashes(self.key_id)
                        self._hashes, self._version = frozenset(hashes), version
                        if stale and not self._warned:
                            log.warning(STALE_KEY_WARNING.format(n=stale), extra={"stale_suppressions": stale})
                            self._warned = True
                    self._checked_at = time.monotonic()
        return self._hashes

    def active(self) -> bool:
        """Whether anyone is on the list (with the current key): else there is nothing to check."""
        return self.key is not None and bool(self._current())

    def forgotten(self, person: Iterable[tuple[str, str]]) -> bool:
        """Whether any of these (kind, normalised value) identifiers is on the list."""
        if self.key is None:
            return False
        hashes = self._current()
        if not hashes:
            return False
        return any((kind, digest(self.key, kind, value)) in hashes for kind, value in person)

    def set_aside(self, entries: Sequence[E]) -> tuple[list[E], list[E]]:
        """(the entries to store, the entries of people on the list), each in the order given: the
        one check of the suppression list that every intake makes (both webhooks, the backfill)
        before it stores anything. Raises StoreUnavailable when the list cannot be read."""
        if not self.active():
            return list(entries), []
        kept: list[E] = []
        gone: list[E] = []
        for entry in entries:
            (gone if entry.people and self.forgotten(entry.people) else kept).append(entry)
        return kept, gone
