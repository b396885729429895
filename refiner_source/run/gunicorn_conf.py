"""gunicorn settings for `refiner-source serve` and Heroku: PORT, WEB_CONCURRENCY, graceful stops.

Nothing here opens a database connection or a Segment client: the app is built in each
worker after the fork (no preload). The delivery worker is gunicorn's sibling, started and
watched by `refiner-source serve` (run/supervisor.py), not by gunicorn's master.
"""

from __future__ import annotations

import os
import signal

from gunicorn.glogging import Logger

from refiner_source.config import load_settings
from refiner_source.errors import ConfigError
from refiner_source.run.supervisor import PARENT_ENV, stop_when_orphaned

try:
    _settings = load_settings()
except ConfigError:  # `serve` validated already; under bare gunicorn the app factory reports it
    _settings = None

bind = f"0.0.0.0:{_settings.port if _settings else os.environ.get('PORT', '8000')}"
workers = _settings.web_concurrency if _settings else 2
worker_class = "gthread"
threads = 4
timeout = 30
graceful_timeout = 20  # Heroku sends SIGKILL 30 s after SIGTERM
keepalive = 5
preload_app = False
# %(U)s is the path without its query string: the webhook token rides in ?token= and must never be logged.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
control_socket_disable = True  # gunicorn 25+ would put a fixed-path socket in $HOME; two services would clash
errorlog = "-"
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "refiner_source.logs.JsonFormatter"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
    "root": {"level": "INFO", "handlers": []},  # the app's configure_logging() owns the root logger
    "loggers": {
        "gunicorn.error": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
        "gunicorn.access": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
    },
}


class AccessLogAtDebug(Logger):
    """gunicorn's logger with its access log (one line per request) only at LOG_LEVEL=DEBUG: the app logs
    each webhook's outcome at INFO, and Heroku's router logs every request. Building the line cost a
    tenth of a web process's CPU under load (bench/README.md, "Near the machine's limit"); a level on
    the logger would not save that, as gunicorn builds the line before it asks the level."""

    def access(self, resp, req, environ, request_time) -> None:
        if _settings is not None and _settings.log_level == "DEBUG":
            super().access(resp, req, environ, request_time)


logger_class = AccessLogAtDebug


def when_ready(server) -> None:
    # Under `refiner-source serve`: stop (gracefully) if the supervisor is killed, so that no web
    # server goes on without its delivery worker.
    parent = os.environ.get(PARENT_ENV)
    if parent:
        stop_when_orphaned(lambda: os.kill(os.getpid(), signal.SIGTERM), parent=int(parent))
