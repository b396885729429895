"""Start `refiner-source serve` (or `worker`) as a user would: the installed command, a real port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """The first true value of check(), tried every 0.1 s; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout}s")
        time.sleep(0.1)


def command() -> list[str]:
    script = Path(sys.executable).parent / "refiner-source"
    return [str(script)] if script.exists() else [sys.executable, "-m", "refiner_source"]


class Service:
    """One `refiner-source` process tree in its own process group, so it can be killed whole."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.port = int(env.get("PORT", "0"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> Service:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*command(), *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        if wait_ready and "serve" in self.args:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until /readyz answers 200. The deadline only ends a hang: a serve of 8 web processes, started
        beside three other tests doing the same on 2 CPUs in a fresh virtualenv (no bytecode yet), was
        seen to need more than 30 s to be ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"service not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process tree, as a crash (SIGKILL) or Heroku's restart (SIGTERM) would."""
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 30.0) -> int | None:
        if not self.process:
            return None
        self.kill(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            return self.process.wait(5)
        finally:
            time.sleep(0.2)
            self.kill(signal.SIGKILL)  # anything of the group still lingering

    def logs(self) -> str:
        return self.log_path.read_text()
