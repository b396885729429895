"""`refiner-source serve`: one small supervisor process with two children, gunicorn and the delivery worker.

Why a process of its own, and not a thread in gunicorn's master: there,
`subprocess.Popen` raced gunicorn's forks of web workers (a forked worker inherited Popen's
exec-status pipe, and Popen waited until that worker exited, so the delivery worker ran without
a supervisor), and gunicorn's SIGCHLD handler reaps every child, ours included. This process
starts nothing but its two children and takes signals one at a time from `sigwaitinfo` (the
signals stay blocked, so none can interrupt it half-way), so it knows both pids from the first
start and on every restart, whatever WEB_CONCURRENCY is.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from refiner_source.delivery.pidfile import PIDFILE_ENV
from refiner_source.errors import RefinerSourceError

log = logging.getLogger(__name__)

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
WATCHED = STOP_SIGNALS | {signal.SIGCHLD, signal.SIGHUP}  # SIGHUP goes on to gunicorn: it reloads its workers
STOP_SECONDS = 22.0  # from the stop signal to SIGKILL of what is left: under the 25 s a stop may take, above gunicorn's 20
STEADY_SECONDS = 10.0  # a worker that lived this long is restarted at once; quicker deaths back off
MAX_RESTART_DELAY = 30.0
STOPPED_ON_PURPOSE = (0, -signal.SIGTERM, -signal.SIGINT)
PARENT_ENV = "REFINER_SOURCE_SUPERVISOR_PID"  # gunicorn's master stops if this process goes away


class PortInUse(RefinerSourceError):
    """The port cannot be bound; str() is the one line to show."""


def bind(port: int, backlog: int = 2048) -> socket.socket:
    """The listening socket, made here so that a port in use is one clear line (gunicorn retries for
    five seconds and prints each try); gunicorn takes it over as fd://. Listening at once: two
    sockets with SO_REUSEADDR may both bind a port, only one may listen on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("0.0.0.0", port))
        sock.listen(backlog)  # gunicorn's default backlog; gunicorn does not listen() again
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"PORT {port} is in use by another program: stop it, or set PORT to a free port") from None
        if exc.errno == errno.EACCES:
            raise PortInUse(f"PORT {port} needs privileges this user does not have: set PORT to 1024 or above") from None
        raise PortInUse(f"cannot listen on PORT {port}: {exc.strerror}") from None
    return sock


class Supervisor:
    """Runs gunicorn and `refiner-source worker`; restarts the worker whenever it dies; stops both on a signal."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        # $XDG_RUNTIME_DIR where there is one: temporary-file cleaners leave it alone.
        self.runtime = Path(tempfile.mkdtemp(prefix="refiner-source-", dir=os.environ.get("XDG_RUNTIME_DIR") or None))
        self.pidfile = self.runtime / "delivery.pid"
        self.gunicorn: int | None = None
        self.worker: int | None = None
        self.worker_started = 0.0
        self.quick_deaths = 0
        self.restart_at: float | None = None
        self.exited_with = 0
        self.stop_deadline: float | None = None
        self.exit_code = 0

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
        try:
            self._start_gunicorn()
            self.listener.close()  # gunicorn holds it now; the worker must not (it would keep the port open)
            self._start_worker()
            while self.gunicorn is not None or self.worker is not None:
                self._step()
        finally:
            self._kill_all()
            for path in (self.pidfile, self.runtime):
                try:
                    path.unlink() if path.is_file() else path.rmdir()
                except OSError:
                    pass
        return self.exit_code

    def _step(self) -> None:
        now = time.monotonic()
        due = [t for t in (self.restart_at, self.stop_deadline) if t is not None]
        timeout = max(0.0, min(due) - now) if due else None
        info = signal.sigwaitinfo(WATCHED) if timeout is None else signal.sigtimedwait(WATCHED, timeout)
        if info is not None:
            if info.si_signo == signal.SIGCHLD:
                self._reap()
            elif info.si_signo == signal.SIGHUP:
                if self.gunicorn is not None:
                    _signal(self.gunicorn, signal.SIGHUP)
            else:
                self._begin_stop(info.si_signo)
        now = time.monotonic()
        if self.stop_deadline is not None and now >= self.stop_deadline:
            log.error("stop deadline reached; killing what is left", extra={"seconds": STOP_SECONDS})
            self._kill_all()
            self.gunicorn = self.worker = None
        elif self.restart_at is not None and now >= self.restart_at and self.stop_deadline is None:
            self._restart_worker()

    def _spawn(self, argv: list[str], env: dict[str, str]) -> int:
        # posix_spawn, not fork: nothing of this process is copied, and the child starts with
        # the signals unblocked that this process keeps blocked for sigwaitinfo.
        return os.posix_spawn(sys.executable, [sys.executable, *argv], env, setsigmask=())

    def _start_worker(self) -> None:
        """Start the delivery worker; if that fails (no memory, a process limit), try again later."""
        env = {k: v for k, v in os.environ.items() if k != PIDFILE_ENV}
        env[PARENT_ENV] = str(os.getpid())
        try:
            self.worker = self._spawn(["-m", "refiner_source", "worker", "--exit-with-parent"], env)
        except OSError as exc:
            self.quick_deaths += 1
            delay = min(MAX_RESTART_DELAY, 2.0 ** min(self.quick_deaths, 5))
            log.error(f"cannot start the delivery worker ({exc.strerror}); trying again in {delay:g} s")
            self.restart_at = time.monotonic() + delay
            return
        self.worker_started = time.monotonic()
        log.info(f"delivery worker running as pid {self.worker}", extra={"pid": self.worker})
        try:
            self.runtime.mkdir(exist_ok=True)
            tmp = self.pidfile.with_suffix(".tmp")
            tmp.write_text(str(self.worker))
            os.replace(tmp, self.pidfile)
        except OSError as exc:  # /readyz will say the worker is down; delivery itself goes on
            log.error(f"cannot write {self.pidfile} ({exc.strerror}): /readyz cannot see the delivery worker")

    def _start_gunicorn(self) -> None:
        self.listener.set_inheritable(True)  # for this child alone: it is closed right after
        env = {**os.environ, PIDFILE_ENV: str(self.pidfile), PARENT_ENV: str(os.getpid())}
        argv = [
            "-m",
            "gunicorn",
            "-c",
            "python:refiner_source.run.gunicorn_conf",
            "--bind",
            f"fd://{self.listener.fileno()}",
            "refiner_source:create_app()",
        ]
        self.gunicorn = self._spawn(argv, env)
        log.info(f"web server (gunicorn) running as pid {self.gunicorn}", extra={"pid": self.gunicorn})

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid == self.worker:
                self._worker_exited(code)
            elif pid == self.gunicorn:
                self.gunicorn = None
                if self.stop_deadline is None:
                    log.error(f"web server (gunicorn) exited with {code}; stopping", extra={"code": code})
                    self.exit_code = code if code >= 0 else 128 - code  # killed by a signal: as a shell says it
                    self._begin_stop(signal.SIGTERM)

    def _worker_exited(self, code: int) -> None:
        self.worker = None
        self.pidfile.unlink(missing_ok=True)  # /readyz: 503 until the next one runs
        if self.stop_deadline is not None:
            return
        lived = time.monotonic() - self.worker_started
        self.quick_deaths = 0 if lived >= STEADY_SECONDS else self.quick_deaths + 1
        delay = 0.0 if self.quick_deaths <= 1 else min(MAX_RESTART_DELAY, 2.0 ** (self.quick_deaths - 2))
        if code in STOPPED_ON_PURPOSE:
            # A stop signal sent to every process (Heroku, Ctrl-C) may reach the worker a moment
            # before it reaches us: give it that moment to arrive before restarting the worker.
            delay = max(delay, 1.0)
        self.restart_at = time.monotonic() + delay
        self.exited_with = code

    def _restart_worker(self) -> None:
        self.restart_at = None
        log.error(f"delivery worker exited with {self.exited_with}; restarted", extra={"code": self.exited_with})
        self._start_worker()

    def _begin_stop(self, signum: int) -> None:
        """Pass the stop on: gunicorn finishes requests in flight, the worker the batch in flight."""
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + STOP_SECONDS
            self.restart_at = None
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            signum = signal.SIGTERM  # the first stop is always the graceful one
        # A second Ctrl-C goes on to gunicorn as it is (its quick shutdown).
        for pid in (self.gunicorn, self.worker):
            if pid is not None:
                _signal(pid, signum if pid == self.gunicorn else signal.SIGTERM)

    def _kill_all(self) -> None:
        for pid in (self.gunicorn, self.worker):
            if pid is not None:
                _signal(pid, signal.SIGKILL)
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def stop_when_orphaned(stop, parent: int | None = None) -> None:
    """Call `stop()` once the parent process has gone (the supervisor was killed), so that nothing runs
    unsupervised. The parent is the supervisor's pid from the environment when there is one: one read
    with getppid() after a slow start could already be init's."""
    import threading

    if parent is None:
        parent = int(os.environ.get(PARENT_ENV) or os.getppid())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        stop()

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
