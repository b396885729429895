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
STOP_SECONDS = 22  # from the stop signal to SIGKILL of the delivery worker: under SPEC's 25 s
STOPPED_ON_PURPOSE = (0, -signal.SIGTERM, -signal.SIGINT)


class DeliverySupervisor:
    """Keeps one `refiner-source worker` child running beside gunicorn's workers; restarts it if it dies."""

    def __init__(self, log) -> None:
        self.log = log
        self.process: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.deadline = 0.0
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
            # A stop signal to the whole group (Heroku, Ctrl-C) reaches the child and us at once;
            # give the master's handler a moment before taking the exit for a crash.
            if self.stopping.wait(1.0 if code in STOPPED_ON_PURPOSE else 0.0):
                break
            self.log.error("delivery worker exited with %s; restarted", code)

    def begin_stop(self) -> None:
        """Tell the child to finish its batch now, without waiting: the master goes on stopping."""
        if self.stopping.is_set():
            return
        self.deadline = time.monotonic() + STOP_SECONDS
        self.stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    def finish_stop(self) -> None:
        """Wait for the child until the deadline counted from the stop signal, then kill it."""
        self.begin_stop()
        process = self.process
        if process is None:
            return
        while process.poll() is None and time.monotonic() < self.deadline:
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()


_supervisor: DeliverySupervisor | None = None


def _forward_stop_signals(supervisor: DeliverySupervisor) -> None:
    """Chain gunicorn's own handlers (installed before when_ready) so the child hears a stop at once."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(signum)

        def handler(sig, frame, previous=previous):
            supervisor.begin_stop()
            if callable(previous):
                previous(sig, frame)

        signal.signal(signum, handler)


def when_ready(server) -> None:
    global _supervisor
    if os.environ.get(EMBEDDED_WORKER_ENV) == "1":
        _supervisor = DeliverySupervisor(server.log)
        _forward_stop_signals(_supervisor)
        _supervisor.start()


def on_exit(server) -> None:
    if _supervisor is not None:
        _supervisor.finish_stop()
