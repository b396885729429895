"""gunicorn settings for `refiner-source serve` and Heroku: PORT, WEB_CONCURRENCY, graceful stops.

Nothing here opens a database connection or a Segment client: the app is built in each
worker after the fork (no preload), and the embedded delivery worker is a separate process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from refiner_source.config import ConfigError, load_settings

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

EMBEDDED_WORKER_ENV = "REFINER_SOURCE_EMBEDDED_WORKER"
STOP_SECONDS = 25


class DeliverySupervisor:
    """Keeps one `refiner-source worker` child running beside gunicorn's workers; restarts it if it dies."""

    def __init__(self, log) -> None:
        self.log = log
        self.process: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="delivery-supervisor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _spawn(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "refiner_source", "worker", "--exit-with-parent"]
        return subprocess.Popen(cmd, env={k: v for k, v in os.environ.items() if k != EMBEDDED_WORKER_ENV})

    def _watch(self) -> None:
        while not self.stopping.is_set():
            self.process = self._spawn()
            self.log.info("delivery worker running as pid %s", self.process.pid)
            code = self.process.wait()
            # Heroku and `kill -TERM -<pgid>` signal the whole tree: give on_exit a moment to say so.
            if self.stopping.wait(1.0):
                break
            self.log.error("delivery worker exited with %s; restarted", code)

    def stop(self) -> None:
        self.stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()


_supervisor: DeliverySupervisor | None = None


def when_ready(server) -> None:
    global _supervisor
    if os.environ.get(EMBEDDED_WORKER_ENV) == "1":
        _supervisor = DeliverySupervisor(server.log)
        _supervisor.start()


def on_exit(server) -> None:
    if _supervisor is not None:
        _supervisor.stop()
