"""A real local HTTP server standing in for Segment's /v1/batch, scriptable for faults."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections import deque
from typing import Any

from tests.http_stub import JsonHandler, LoopbackServer


class SegmentStub(LoopbackServer):
    """Records every message it accepts; `script` holds (status, headers, body) answers to give first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []  # {"at", "status", "count", "headers"}
        self.script: deque[tuple[int, dict[str, str], dict[str, Any] | None]] = deque()
        self.reject: dict[str, tuple[int, dict[str, Any]]] = {}  # messageId -> answer that fails its batch
        self.down = False  # while True every request gets 503, as during an outage
        self.arrivals: dict[str, float] = {}  # messageId -> time.monotonic() it was first accepted
        self.keep_requests = True  # benchmarks turn the request log off
        stub = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                body = json.loads(raw)
                batch = body.get("batch", [])
                status, headers, answer = stub._answer(batch)
                now = time.monotonic()
                with stub.lock:
                    if stub.keep_requests:
                        stub.requests.append(
                            {"at": now, "status": status, "count": len(batch), "headers": dict(self.headers), "body": body}
                        )
                    if status == 200:
                        stub.messages.extend(batch)
                        for message in batch:
                            stub.arrivals.setdefault(message.get("messageId"), now)
                self.send_json(status, answer if answer is not None else {"success": status == 200}, headers)

        super().__init__(Handler)
        self.url = self.base

    def _answer(self, batch: list[dict[str, Any]]) -> tuple[int, dict[str, str], dict[str, Any] | None]:
        with self.lock:
            for message in batch:
                if message.get("messageId") in self.reject:
                    status, answer = self.reject[message["messageId"]]
                    return status, {}, answer
            if self.down:
                return 503, {}, {"code": "unavailable", "message": "outage"}
            if self.script:
                return self.script.popleft()
        return 200, {}, None

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.messages)

    def wait_for(self, predicate, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            received = self.received()
            if predicate(received):
                return received
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s; received {len(self.received())} messages")
