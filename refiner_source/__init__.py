"""refiner-source: Refiner survey responses into Segment, and Segment's events into Refiner, self-hosted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from refiner_source.config import Settings

from refiner_source.version import __version__ as __version__  # the package's, for whoever embeds it


def create_app(config: Mapping[str, Any] | Settings | None = None) -> Flask:
    """The app factory: settings from the environment, or from `config` (tests).

    Touches no database: under gunicorn this runs in each worker after the fork. Imports
    happen here, not at package import, so that a backfill's mapping processes do not load
    Flask and the web app.
    """
    import os

    from flask import Flask

    from refiner_source.config import key_of, settings_from
    from refiner_source.delivery.pidfile import PIDFILE_ENV
    from refiner_source.directions import LARGEST_BODY_BYTES
    from refiner_source.logs import configure_logging
    from refiner_source.ops import forget_page  # noqa: F401 - its routes join the operator's blueprint
    from refiner_source.ops.status_page import operator_bp
    from refiner_source.privacy import Suppressed
    from refiner_source.store import Store
    from refiner_source.store.tally import Tally
    from refiner_source.web.counts import count_webhook
    from refiner_source.web.health import bp as health_bp
    from refiner_source.web.refiner_webhook import bp as refiner_webhook_bp
    from refiner_source.web.segment_webhook import bp as segment_webhook_bp
    from refiner_source.web.state import AppState

    settings = settings_from(config)
    configure_logging(settings.log_level)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = LARGEST_BODY_BYTES + 1  # each route has its own limit: see web.body.read_body
    app.json.sort_keys = False
    outbox = Store(settings.database_url)
    app.extensions["refiner_source"] = AppState(
        settings=settings,
        outbox=outbox,
        delivery_pidfile=os.environ.get(PIDFILE_ENV),
        tally=Tally(outbox),
        suppressed=Suppressed(outbox, key_of(settings)),
    )
    app.register_blueprint(health_bp)
    app.register_blueprint(refiner_webhook_bp)
    app.register_blueprint(segment_webhook_bp)
    app.register_blueprint(operator_bp)
    app.after_request(count_webhook)
    return app
