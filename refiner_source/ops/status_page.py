"""The operator's view: GET /status (an HTML page), POST /status/replay, GET /metrics (Prometheus).

Behind HTTP Basic auth with REFINER_ADMIN_PASSWORD (any user name); 404 while it is unset. All
figures are read from the store (events, traffic counts), so every process and dyno shows the
same ones. Answers and emails appear only on an opened event's page.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, abort, redirect, render_template, request, url_for

from refiner_source.config import DIRECTION_VARIABLES, Settings
from refiner_source.destinations import preview
from refiner_source.directions import DIRECTIONS
from refiner_source.ops.tally import DELIVERY, LATENCY, LATENCY_BUCKETS, WEBHOOK
from refiner_source.store import Stats, Store
from refiner_source.web.state import error, state

operator_bp = Blueprint("operator", __name__, template_folder="templates")

WEBHOOK_OUTCOMES = ("accepted", "duplicate", "ignored", "rejected", "unavailable")
DELIVERY_OUTCOMES = ("delivered", "dead", "retry")
CHART_MINUTES = 24 * 60


def _stop(status: int, code: str, message: str, **headers: str):
    response, _ = error(status, code, message)
    response.status_code = status
    response.headers.update(headers)
    abort(response)


def _check_admin() -> None:
    """404 while REFINER_ADMIN_PASSWORD is unset; 401 (with a Basic challenge) without it."""
    password = state().settings.admin_password
    if not password:
        _stop(404, "not_found", "The operator's view is off: set REFINER_ADMIN_PASSWORD to turn it on.")
    auth = request.authorization
    given = (auth.password or "") if auth is not None and auth.type == "basic" else ""
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), password.encode("utf-8")):
        _stop(
            401,
            "unauthorized",
            "Log in with any user name and REFINER_ADMIN_PASSWORD.",
            **{"WWW-Authenticate": 'Basic realm="refiner-source"'},
        )


def csrf_token() -> str:
    """The replay form's token: only a page served behind the password can carry it (a browser
    sends Basic credentials along with a cross-site POST; it cannot read this page)."""
    return hmac.new(state().settings.admin_password.encode(), b"refiner-source replay", hashlib.sha256).hexdigest()


@dataclass
class Direction:
    destination: str
    title: str
    source: str
    on: bool
    turned_on_by: tuple[str, ...]  # the variables that turn it on, named while it is off
    stats: Stats
    hour: dict[str, int]
    day: dict[str, int]
    dead_letters: list[tuple[str, str, str]]
    last_error: str | None
    last_error_at: float | None
    chart: dict[str, Any] = field(default_factory=dict)

    @property
    def holds_events(self) -> bool:
        return bool(self.stats.pending or self.stats.delivered or self.stats.dead)


def directions(outbox: Store, settings: Settings, now: float) -> list[Direction]:
    minute = int(now // 60)
    hour = outbox.traffic_totals(since_minute=minute - 59)
    day = outbox.traffic_totals(since_minute=minute - (CHART_MINUTES - 1))
    found = []
    for destination, names in DIRECTIONS.items():
        title, source = names.title, names.source
        error_text, error_at = outbox.last_error(destination)
        found.append(
            Direction(
                destination=destination,
                title=title,
                source=source,
                on=settings.direction_on(destination),
                turned_on_by=DIRECTION_VARIABLES[destination],
                stats=outbox.stats(destination),
                hour=_figures(hour, source, destination),
                day=_figures(day, source, destination),
                dead_letters=outbox.dead_letters(limit=20, destination=destination),
                last_error=error_text,
                last_error_at=error_at,
                chart=_chart(outbox, source, destination, minute),
            )
        )
    return found


def _figures(totals: dict[tuple[str, str, str], int], source: str, destination: str) -> dict[str, int]:
    figures = {outcome: totals.get((WEBHOOK, source, outcome), 0) for outcome in WEBHOOK_OUTCOMES}
    figures["received"] = sum(figures.values())
    figures.update({outcome: totals.get((DELIVERY, destination, outcome), 0) for outcome in DELIVERY_OUTCOMES})
    return figures


def _chart(outbox: Store, source: str, destination: str, minute: int, width: int = 720, height: int = 120) -> dict[str, Any]:
    """Received against delivered per minute over 24 hours, as SVG polyline points (drawn here, no script)."""
    start = minute - (CHART_MINUTES - 1)
    received = outbox.traffic_per_minute(WEBHOOK, source, WEBHOOK_OUTCOMES, start)
    delivered = outbox.traffic_per_minute(DELIVERY, destination, ("delivered",), start)
    peak = max([1, *received.values(), *delivered.values()])

    def points(series: dict[int, int]) -> str:
        return " ".join(
            f"{(m - start) * width / (CHART_MINUTES - 1):.1f},{height - series.get(m, 0) * height / peak:.1f}"
            for m in range(start, minute + 1)
        )

    return {"width": width, "height": height, "peak": peak, "received": points(received), "delivered": points(delivered)}


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def when(at: float | None) -> str:
    return "-" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def brief(error: str | None) -> str:
    """An error as the main page shows it: its kind and status, never the destination's answer,
    which may quote the data (an email, an answer); the opened event shows it whole."""
    if not error:
        return ""
    return error.split(":", 1)[0][:80]


@operator_bp.after_request
def no_framing(response: Response) -> Response:
    # The replay button must not be clickable from inside another site's frame.
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
    return response


@operator_bp.get("/status")
def status_page():
    _check_admin()
    app_state = state()
    query = (request.args.get("q") or "").strip()[:255]
    found = app_state.outbox.find_events(query) if query else None
    return render_template(
        "status.html",
        directions=directions(app_state.outbox, app_state.settings, time.time()),
        query=query,
        found=found,
        csrf=csrf_token(),
        age=age,
        when=when,
        brief=brief,
        replayed=request.args.get("replayed", type=int),
    )


@operator_bp.get("/status/event/<int:event_id>")
def event_page(event_id: int):
    """One event opened: its calls as they would be sent now, with their content (answers, emails)."""
    _check_admin()
    app_state = state()
    content = app_state.outbox.event_content(event_id)
    if content is None:
        _stop(404, "not_found", f"No event {event_id}.")
    destination, stored, messages, generation, created_at = content
    try:
        calls, problem = preview(destination, stored, messages, generation, created_at, app_state.settings.rules), None
    except Exception as exc:  # an event that cannot be mapped (a dead letter): show it as stored, and why
        calls, problem = [json.loads(stored)] if stored else [], f"{type(exc).__name__}: {exc}"
    found = app_state.outbox.find_event(event_id)
    return render_template(
        "event.html",
        event_id=event_id,
        destination=destination,
        calls=calls,
        problem=problem,
        kept=stored is not None or bool(messages),
        found=found,
        when=when,
    )


@operator_bp.post("/status/replay")
def replay_dead_letters():
    _check_admin()
    given = request.form.get("csrf", "")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), csrf_token().encode()):
        _stop(403, "csrf", "The form's token is missing or wrong: reload /status and press the button again.")
    destination = request.form.get("destination")
    chosen = [destination] if destination in DIRECTIONS else list(DIRECTIONS)
    queued = sum(state().outbox.replay_dead(d) for d in chosen)
    return redirect(url_for("operator.status_page", replayed=queued), code=303)


@operator_bp.get("/metrics")
def metrics():
    _check_admin()
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(state().outbox, state().settings))
    # content_type, not mimetype: a mimetype would replace the header and drop the format's version.
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


class StoreCollector:
    """Prometheus figures read from the store at each scrape (see the README for why not multiprocess mode),
    and which directions this process's settings turn on."""

    def __init__(self, outbox: Store, settings: Settings) -> None:
        self.outbox = outbox
        self.settings = settings

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        totals = self.outbox.traffic_totals()
        webhooks = CounterMetricFamily(
            "refiner_source_webhooks", "Webhooks received, by source (refiner, segment) and outcome", labels=["source", "outcome"]
        )
        deliveries = CounterMetricFamily(
            "refiner_source_deliveries", "Events delivered, dead-lettered or retried, by destination", labels=["destination", "outcome"]
        )
        pending = GaugeMetricFamily("refiner_source_pending_events", "Events waiting to be delivered", labels=["destination"])
        dead = GaugeMetricFamily("refiner_source_dead_events", "Events kept as dead letters", labels=["destination"])
        oldest = GaugeMetricFamily(
            "refiner_source_oldest_pending_age_seconds", "Age of the oldest event waiting (0 when none)", labels=["destination"]
        )
        latency = HistogramMetricFamily(
            "refiner_source_delivery_latency_seconds", "From receipt to delivery, per event", labels=["destination"]
        )
        enabled = GaugeMetricFamily(
            "refiner_source_direction_enabled",
            "1 when the direction to this destination is on (both its variables set), else 0",
            labels=["destination"],
        )
        for destination, names in DIRECTIONS.items():
            source = names.source
            for outcome in WEBHOOK_OUTCOMES:
                webhooks.add_metric([source, outcome], totals.get((WEBHOOK, source, outcome), 0))
            for outcome in DELIVERY_OUTCOMES:
                deliveries.add_metric([destination, outcome], totals.get((DELIVERY, destination, outcome), 0))
            stats = self.outbox.stats(destination)
            pending.add_metric([destination], stats.pending)
            dead.add_metric([destination], stats.dead)
            oldest.add_metric([destination], stats.oldest_pending_age or 0.0)
            cumulative, buckets = 0, []
            for bound in (*LATENCY_BUCKETS, float("inf")):
                cumulative += totals.get((LATENCY, destination, f"le_{bound:g}" if bound != float("inf") else "le_inf"), 0)
                buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
            latency.add_metric([destination], buckets, totals.get((LATENCY, destination, "sum_ms"), 0) / 1000.0)
            enabled.add_metric([destination], int(self.settings.direction_on(destination)))
        yield from (webhooks, deliveries, pending, dead, oldest, latency, enabled)
