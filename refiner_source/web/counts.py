"""Each webhook counted, by source and outcome, after its route has answered."""

from __future__ import annotations

from flask import Response, current_app, g, request

from refiner_source.directions import by_path
from refiner_source.store.tally import WEBHOOK


def count_webhook(response: Response) -> Response:
    """Count each webhook by source and outcome (accepted, duplicate, ignored, rejected, unavailable):
    what the route put in `g.webhook_counts` (for a batch of Segment events, each event), and what
    its error status says. A route that is off (404) is not counted."""
    direction = by_path(request.path)
    source = direction.source if direction is not None else None
    app_state = current_app.extensions.get("refiner_source")
    if source is None or app_state is None or app_state.tally is None or request.method != "POST" or response.status_code == 404:
        return response
    status = response.status_code
    counts = dict(g.get("webhook_counts") or {})  # a batch refused part-way has counts of what came before too
    if status >= 400:
        outcome = "unavailable" if status == 503 else "rejected"
        counts[outcome] = counts.get(outcome, 0) + 1
    for outcome, n in counts.items():
        app_state.tally.add(WEBHOOK, source, outcome, n)
    return response
