"""The operator's view: GET /status (an HTML page), one event's page, the dead letters' replay and
delete buttons, and GET /metrics (Prometheus). Its "Forget a person" form is ops/forget_page.py.

Behind HTTP Basic auth with REFINER_ADMIN_PASSWORD (any user name); 404 while it is unset. All
figures are read from the store (events, traffic counts), so every process and dyno shows the
same ones. Answers and emails appear only on an opened event's page.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time

from flask import Blueprint, Response, abort, g, redirect, render_template, request, url_for

from refiner_source.config import Settings
from refiner_source.destinations import preview
from refiner_source.directions import DIRECTIONS
from refiner_source.erasure import suppression_status
from refiner_source.ops.chart import DEFAULT_RANGE, RANGES, chosen_range
from refiner_source.ops.status_view import (
    DELIVERY_OUTCOMES,
    WEBHOOK_OUTCOMES,
    age,
    brief,
    clock,
    directions,
    plural,
    when,
    with_code,
)
from refiner_source.privacy import STALE_KEY_WARNING
from refiner_source.store import Store
from refiner_source.store.tally import DELIVERY, LATENCY, LATENCY_BUCKETS, WEBHOOK
from refiner_source.web.state import error, state

operator_bp = Blueprint("operator", __name__, template_folder="templates")

REFRESH_SECONDS = 10  # the page reloads itself this often, unless ?refresh=off (or ?refresh=<seconds>)
ONE_EVENT = re.compile(r"[0-9]{1,10}")  # an event's internal id, as a form or a URL gives it


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
    """The forms' token: only a page served behind the password can carry it (a browser sends Basic
    credentials along with a cross-site POST; it cannot read this page)."""
    return hmac.new(state().settings.admin_password.encode(), b"refiner-source replay", hashlib.sha256).hexdigest()


def _check_csrf() -> None:
    given = request.form.get("csrf", "")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), csrf_token().encode()):
        _stop(403, "csrf", "The form's token is missing or wrong: reload /status and press the button again.")


def script_nonce() -> str:
    """This response's nonce: the page's own inline script runs, nothing injected into it would."""
    if "csp_nonce" not in g:
        g.csp_nonce = secrets.token_urlsafe(16)
    return g.csp_nonce


@operator_bp.after_request
def no_framing(response: Response) -> Response:
    # The buttons must not be clickable from inside another site's frame.
    response.headers["X-Frame-Options"] = "DENY"
    scripts = f"'nonce-{g.csp_nonce}'" if "csp_nonce" in g else "'none'"
    response.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src {scripts}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return response


def _view() -> dict[str, str]:
    """What the page's address keeps across refreshes and buttons: the search, the range, the refresh."""
    kept = {"q": (request.values.get("q") or "").strip()[:255], "range": request.values.get("range") or "", "refresh": ""}
    if kept["range"] not in RANGES or kept["range"] == DEFAULT_RANGE:
        kept["range"] = ""
    refresh = request.values.get("refresh") or ""
    if refresh == "off" or (refresh.isdigit() and 1 <= int(refresh) <= 3600 and int(refresh) != REFRESH_SECONDS):
        kept["refresh"] = refresh
    return kept


def _status_url(view: dict[str, str], **changes) -> str:
    """/status with the view's parameters that are set (changed by `changes`) and nothing else."""
    chosen = {**view, **changes}
    if chosen.get("range") == DEFAULT_RANGE:
        chosen["range"] = ""
    return url_for("operator.status_page", **{k: v for k, v in chosen.items() if v not in ("", None)})


def _helpers() -> dict:
    return {"csrf": csrf_token(), "nonce": script_nonce(), "age": age, "when": when, "brief": brief, "plural": plural}


@operator_bp.get("/status")
def status_page():
    _check_admin()
    app_state = state()
    view = _view()
    now = time.time()
    found = app_state.outbox.find_events(view["q"]) if view["q"] else None
    refresh = None if view["refresh"] == "off" else int(view["refresh"] or REFRESH_SECONDS)
    return render_template(
        "status.html",
        directions=directions(app_state.outbox, app_state.settings, now, chosen_range(view["range"])),
        ranges=RANGES,
        range_key=view["range"] or DEFAULT_RANGE,
        view=view,
        status_url=lambda **changes: _status_url(view, **changes),
        now=now,
        refresh=refresh,
        query=view["q"],
        found=found,
        clock=clock,
        with_code=with_code,
        replayed=request.args.get("replayed", type=int),
        deleted=request.args.get("deleted", type=int),
        suppressed=suppression_status(app_state.outbox, app_state.settings),
        stale_warning=STALE_KEY_WARNING,
        **_helpers(),
    )


@operator_bp.get("/status/event/<int:event_id>")
def event_page(event_id: int):
    """One event opened, by its internal id: its calls as they would be sent now, with their content (answers, emails)."""
    _check_admin()
    return _event(event_id)


@operator_bp.get("/status/events/<path:key>")
def event_by_key(key: str):
    """One event opened by the id its source gave it (a Refiner response id, a Segment messageId,
    or a dead letter's messageId) or by its internal id; a list when the key names several."""
    _check_admin()
    outbox = state().outbox
    by_id = outbox.find_event(int(key)) if ONE_EVENT.fullmatch(key) else []
    named = outbox.find_events(key) if len(key) <= 255 else []
    matches = [(e, "internal id") for e in by_id]
    for e in named:
        if all(e["id"] != m["id"] for m, _ in matches):
            how = "response id" if e["destination"] == "segment" else "Segment messageId"
            matches.append((e, how if e["source_id"] == key else "a dead letter's messageId"))
    if not matches:
        _stop(404, "not_found", f"No event is named {key[:255]!r}: not a response id, a Segment messageId or an internal id.")
    if len(matches) == 1:
        return _event(matches[0][0]["id"])
    return render_template("events.html", key=key, matches=matches, **_helpers())


def _event(event_id: int):
    app_state = state()
    content = app_state.outbox.event_content(event_id)
    if content is None:
        _stop(404, "not_found", f"No event {event_id}.")
    destination, stored, generation, created_at = content
    try:
        calls, problem = preview(destination, stored, generation, created_at, app_state.settings.rules), None
    except Exception as exc:  # an event that cannot be mapped (a dead letter): show it as stored, and why
        calls, problem = [json.loads(stored)] if stored else [], f"{type(exc).__name__}: {exc}"
    return render_template(
        "event.html",
        event_id=event_id,
        destination=destination,
        calls=calls,
        problem=problem,
        kept=stored is not None,
        found=app_state.outbox.find_event(event_id),
        **_helpers(),
    )


def _chosen_event() -> int | None:
    """The form's `event` (an internal id), None when absent; 400 when it is not one."""
    given = request.form.get("event")
    if given is None:
        return None
    if not ONE_EVENT.fullmatch(given):
        _stop(400, "invalid_event", "The form's event is not an event's id: reload /status and press the button again.")
    return int(given)


@operator_bp.post("/status/replay")
def replay_dead_letters():
    """Dead events back in line: one (`event`), one direction's (`destination`), or all."""
    _check_admin()
    _check_csrf()
    outbox = state().outbox
    event_id = _chosen_event()
    if event_id is not None:
        queued = outbox.replay_dead_event(event_id)
    else:
        destination = request.form.get("destination")
        queued = sum(outbox.replay_dead(d) for d in ([destination] if destination in DIRECTIONS else list(DIRECTIONS)))
    return redirect(_status_url(_view(), replayed=queued), code=303)


@operator_bp.post("/status/delete")
def delete_dead_event():
    """Give up on one dead event, as `refiner-source purge-dead` does on all: its letters and answers
    are deleted, its receipt kept (a resend is still a duplicate)."""
    _check_admin()
    _check_csrf()
    event_id = _chosen_event()
    if event_id is None:
        _stop(400, "invalid_event", "Name the dead event to delete (the form's `event`).")
    deleted = state().outbox.purge_dead_event(event_id)
    return redirect(_status_url(_view(), deleted=deleted), code=303)


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
    """Prometheus figures read from the store at each scrape (docs/operations.md, "Metrics", says why not multiprocess mode),
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
        suppressed = GaugeMetricFamily(
            "refiner_source_suppressed_people",
            "People on the suppression list (refiner-source forget), by key: current, or other (a key no longer set: not suppressed)",
            labels=["key"],
        )
        for key, count in zip(("current", "other"), suppression_status(self.outbox, self.settings), strict=True):
            suppressed.add_metric([key], count)
        yield from (webhooks, deliveries, pending, dead, oldest, latency, enabled, suppressed)
