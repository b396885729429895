"""What answers outside the webhooks: / (what this is), /healthz, /readyz, /openapi.json, and every error as JSON."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from refiner_source.delivery.pidfile import worker_running
from refiner_source.store import StoreUnavailable
from refiner_source.web.body import body_limit, too_large
from refiner_source.web.state import error, state

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/")
def index():
    """What this service is and which directions are on, with links: for whoever opens the bare URL.
    Nothing secret: no settings' values, no counts (those are behind REFINER_ADMIN_PASSWORD on /status)."""
    from refiner_source.directions import DIRECTIONS
    from refiner_source.version import __version__

    settings = state().settings
    directions = {
        destination: {
            "title": direction.title,
            "on": settings.direction_on(destination),
            "webhook": f"/webhooks/{direction.source}",
            "turned_on_by": list(DIRECTIONS[destination].variables),
        }
        for destination, direction in DIRECTIONS.items()
    }
    return jsonify(
        {
            "service": "refiner-source",
            "version": __version__,
            "directions": directions,
            "links": {"status": "/status", "openapi": "/openapi.json", "healthz": "/healthz", "readyz": "/readyz"},
        }
    )


@bp.get("/openapi.json")
def openapi():
    document = current_app.extensions.get("refiner_source_openapi")
    if document is None:
        from refiner_source.version import __version__
        from refiner_source.web.openapi import build_openapi

        document = current_app.extensions["refiner_source_openapi"] = build_openapi(__version__)
    return jsonify(document)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    app_state = state()
    try:
        app_state.outbox.ping()
    except StoreUnavailable:
        return error(503, "store_unavailable", "The store is not answering.")
    if app_state.delivery_pidfile and not worker_running(app_state.delivery_pidfile):
        return error(
            503, "delivery_worker_down", "The embedded delivery worker is not running (refiner-source serve restarts it; see the log)."
        )
    return jsonify({"status": "ready"})


@bp.app_errorhandler(HTTPException)
def http_error(exc: HTTPException):
    if isinstance(exc, RequestEntityTooLarge):
        return too_large(body_limit(request.path))
    response, status = error(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"), exc.description or exc.name)
    for name, value in exc.get_headers():  # e.g. Allow on a 405, as RFC 9110 requires
        if name.lower() != "content-type":
            response.headers[name] = value
    return response, status


@bp.app_errorhandler(Exception)
def unexpected_error(exc: Exception):
    log.exception("unexpected error", extra={"path": request.path, "response_id": g.get("response_id")})
    return error(500, "internal_error", "Unexpected error; it has been logged.")
