"""`refiner-source serve` as a process tree: the delivery worker is always supervised, stops are clean.

These start the real command, as a user would, and look at its processes the way an operator
would (`pgrep -f`, `kill -9`): no test reads the supervisor's internals.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import SECRET
from tests.e2e.test_e2e import WRITE_KEY, post, tracks, unique_body
from tests.segment_stub import SegmentStub
from tests.service import Service, command, free_port


@pytest.fixture
def start(tmp_path, segment):
    """Start `refiner-source serve` on SQLite (what is under test here is the process tree, not the store)."""
    started: list[Service] = []

    def make(**env: str) -> Service:
        service = Service(
            ["serve"],
            {
                "PORT": str(free_port()),
                "DATABASE_URL": f"sqlite:///{tmp_path / f'serve-{len(started)}.db'}",
                "SEGMENT_HOST": segment.url,
                "SEGMENT_WRITE_KEY": WRITE_KEY,
                "REFINER_WEBHOOK_SECRET": SECRET,
                **env,
            },
            tmp_path / f"serve-{len(started)}.log",
        )
        started.append(service)
        return service.start()

    yield make
    for service in started:
        service.stop()


def tree(service: Service) -> dict[int, str]:
    """pid -> command line of every live process in the service's process group."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgid = fields[0], int(fields[2])
        if pgid == service.process.pid and state not in ("Z", "X"):
            found[int(entry.name)] = cmdline
    return found


def delivery_workers(service: Service) -> list[int]:
    return [pid for pid, cmdline in tree(service).items() if " worker" in cmdline and "--exit-with-parent" in cmdline]


def gunicorn_master(service: Service) -> int:
    """The gunicorn process whose parent is not itself a gunicorn process."""
    pids = tree(service)
    for pid, cmdline in pids.items():
        if "gunicorn" in cmdline:
            parent = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if "gunicorn" not in pids.get(parent, ""):
                return pid
    raise AssertionError(f"no gunicorn master in {pids}")


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def one_worker(service: Service, other_than: int | None = None) -> int:
    def found():
        pids = [p for p in delivery_workers(service) if p != other_than]
        return pids[0] if len(pids) == 1 else None

    return wait_until(found, 15, f"one delivery worker (other than {other_than}); tree: {tree(service)}")


def assert_delivers(service: Service, segment: SegmentStub, i: int, timeout: float = 10) -> None:
    body = unique_body(i)
    assert post(service, body).status_code == 202
    segment.wait_for(lambda got: body["response"]["uuid"] in tracks(got), timeout=timeout)


@pytest.mark.parametrize("web_concurrency", range(1, 9))
def test_serve_restarts_a_killed_delivery_worker_at_any_web_concurrency(start, segment, web_concurrency):
    service = start(WEB_CONCURRENCY=str(web_concurrency))
    first = one_worker(service)
    # The supervisor knows its child from the first start: it says so in the log.
    wait_until(lambda: f"delivery worker running as pid {first}" in service.logs(), 10, "the supervisor logs the worker's pid")

    os.kill(first, signal.SIGKILL)
    second = one_worker(service, other_than=first)
    wait_until(lambda: f"delivery worker running as pid {second}" in service.logs(), 10, "the restart is logged with its pid")
    assert_delivers(service, segment, web_concurrency)

    # And again: every restart is supervised, not only the first start.
    os.kill(second, signal.SIGKILL)
    one_worker(service, other_than=second)
    assert_delivers(service, segment, 100 + web_concurrency)


@pytest.mark.parametrize("web_concurrency", [1, 8])
def test_serve_sigterm_to_the_top_process_alone_stops_everything_within_25s(start, segment, web_concurrency):
    service = start(WEB_CONCURRENCY=str(web_concurrency))
    one_worker(service)
    assert_delivers(service, segment, 0)
    began = time.monotonic()
    os.kill(service.process.pid, signal.SIGTERM)  # not the group: only the process the user started
    code = service.process.wait(30)
    took = time.monotonic() - began
    assert took < 25, f"stopping took {took:.1f}s"
    assert code == 0, service.logs()[-2000:]
    wait_until(lambda: not tree(service), 5, "no process of the service is left")
    assert "delivery worker stopped" in service.logs()


def test_serve_sigterm_to_gunicorns_master_alone_stops_everything_within_25s(start, segment):
    service = start(WEB_CONCURRENCY="4")
    one_worker(service)
    began = time.monotonic()
    os.kill(gunicorn_master(service), signal.SIGTERM)
    code = service.process.wait(30)
    assert time.monotonic() - began < 25
    assert code == 0, service.logs()[-2000:]
    wait_until(lambda: not tree(service), 5, "no process of the service is left")


def test_readyz_is_503_while_the_embedded_delivery_worker_is_down(start, segment):
    service = start(WEB_CONCURRENCY="2")
    worker = one_worker(service)
    assert requests.get(service.url + "/readyz", timeout=5).status_code == 200
    # Freeze the supervisor so that it cannot restart the worker, then kill the worker.
    os.kill(service.process.pid, signal.SIGSTOP)
    try:
        os.kill(worker, signal.SIGKILL)
        answer = wait_until(
            lambda: (r := requests.get(service.url + "/readyz", timeout=5)).status_code == 503 and [r], 10, "readyz says 503"
        )[0]
        assert answer.json()["error"] == "delivery_worker_down"
        assert "delivery worker" in answer.json()["message"]
    finally:
        os.kill(service.process.pid, signal.SIGCONT)
    one_worker(service, other_than=worker)
    wait_until(lambda: requests.get(service.url + "/readyz", timeout=5).status_code == 200, 10, "readyz 200 again")
    assert_delivers(service, segment, 1)


def test_serve_on_a_port_in_use_says_so_in_one_line_naming_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "PORT": str(port),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
            "SEGMENT_WRITE_KEY": WRITE_KEY,
            "REFINER_WEBHOOK_SECRET": SECRET,
        }
        began = time.monotonic()
        done = subprocess.run([*command(), "serve"], env=env, capture_output=True, text=True, timeout=30)
    assert time.monotonic() - began < 5  # gunicorn alone retries for five seconds
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "PORT" in lines[0] and str(port) in lines[0] and "in use" in lines[0]


def test_serve_killed_alone_leaves_neither_gunicorn_nor_the_delivery_worker_running(start, segment):
    service = start(WEB_CONCURRENCY="2")
    one_worker(service)
    os.kill(service.process.pid, signal.SIGKILL)  # the OOM killer, say: no chance to pass anything on
    service.process.wait(5)
    wait_until(lambda: not tree(service), 15, f"gunicorn and the worker notice and stop; left: {tree(service)}")


def test_worker_running_reads_the_pidfile_the_supervisor_keeps(tmp_path):
    from refiner_source.delivery.pidfile import worker_running

    pidfile = tmp_path / "delivery.pid"
    assert not worker_running(str(pidfile))  # no file: the worker is between two lives
    pidfile.write_text(str(os.getpid()))
    assert worker_running(str(pidfile))
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: the pid is free
    pidfile.write_text(str(child.pid))
    assert not worker_running(str(pidfile))
    pidfile.write_text("garbage")
    assert not worker_running(str(pidfile))


@pytest.mark.parametrize(("level", "logged"), [("INFO", False), ("DEBUG", True)])
def test_the_access_log_is_written_at_debug_only_and_without_the_query_string(start, level, logged):
    service = start(LOG_LEVEL=level)
    assert requests.get(service.url + "/healthz?token=not-in-the-log", timeout=10).status_code == 200
    assert requests.get(service.url + "/healthz", timeout=10).status_code == 200
    post(service, unique_body(1))
    wait_until(lambda: '"accepted"' in service.logs(), 10, "the webhook's own line is logged at INFO and DEBUG alike")
    access = [line for line in service.logs().splitlines() if '"gunicorn.access"' in line and "GET /healthz" in line]
    assert bool(access) is logged, service.logs()[-2000:]
    assert "not-in-the-log" not in service.logs()
