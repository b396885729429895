"""The one way a webhook route is built, in the order a request meets it: the direction is on (else
404 not_enabled); then the route's own token or signature, body, parse and admission (the direction
package's, which knows no Flask); then `take`: the suppression list, the store, the count. The store
not answering, at any of those steps, is the 503 that Refiner and Segment both retry."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

from flask import Blueprint, Response, g

from refiner_source.config import Settings
from refiner_source.directions import DIRECTIONS
from refiner_source.directions.entry import Entry
from refiner_source.store import StoreUnavailable
from refiner_source.web.state import error, state

log = logging.getLogger(__name__)

Receive = Callable[[Settings], tuple[Response, int]]


def webhook(bp: Blueprint, destination: str) -> Callable[[Receive], Callable[[], tuple[Response, int]]]:
    """Registers the decorated function, given the settings, as the webhook of the direction that
    stores under `destination`, at its path in the registry."""
    direction = DIRECTIONS[destination]

    def register(receive: Receive) -> Callable[[], tuple[Response, int]]:
        @functools.wraps(receive)
        def route() -> tuple[Response, int]:
            settings = state().settings
            if not direction.on(settings):
                first, second = direction.variables
                return error(404, "not_enabled", f"{direction.title} is off: set {first} and {second} to turn it on.")
            try:
                return receive(settings)
            except StoreUnavailable as exc:
                extra = {"source": direction.source, "error": str(exc), "outcome": "unavailable"}
                log.error("store unavailable", extra={**extra, **({"response_id": g.response_id} if "response_id" in g else {})})
                return error(503, "store_unavailable", "The store is not answering; please retry.")

        bp.post(direction.path)(route)
        return route

    return register


def take(entries: Sequence[Entry]) -> tuple[int, list[Entry]]:
    """(how many of `entries` were new, those set aside as events of people on the suppression
    list, which are never stored): the one check of the list a webhook makes. One entry joins the
    commit other requests are making at the same moment (Store.store_grouped); more are one
    transaction. Either way each is durable before this returns. Raises StoreUnavailable; nothing
    to store asks nothing of the store."""
    if not entries:
        return 0, []
    app_state = state()
    kept, gone = app_state.suppressed.set_aside(entries) if app_state.suppressed is not None else (list(entries), [])
    if not kept:
        return 0, gone
    if len(kept) == 1:
        return int(app_state.outbox.store_grouped(kept[0])), gone
    return app_state.outbox.store_many(kept), gone
