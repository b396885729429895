"""A real local HTTP server standing in for Refiner's REST API `GET /responses`."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


def api_item(i: int, *, account: bool = True, remote_id: bool = True, completed: bool = True) -> dict[str, Any]:
    """A response as the API lists it (see tests/fixtures/api_responses_page.json)."""
    contact: dict[str, Any] = {
        "uuid": f"contact-{i}",
        "remote_id": f"user-{i}" if remote_id else None,
        "email": f"person{i}@example.com",
        "display_name": f"Person {i}",
    }
    if account:
        contact["account"] = {
            "uuid": f"acct-uuid-{i % 50}",
            "remote_id": f"acct-{i % 50}",
            "display_name": "Acme",
            "domain": "acme.example",
        }
    return {
        "uuid": f"response-{i:07d}",
        "first_shown_at": "2026-11-18 16:41:02",
        "completed_at": "2026-11-18 16:42:57" if completed else None,
        "received_at": "2026-11-18 16:42:57",
        "dismissed_at": None,
        "form": {"uuid": "form-1", "name": "NPS"},
        "data": {"How likely are you to recommend us?": str(i % 11), "What could we do better?": f"answer number {i}"},
        "contact": contact,
    }


class RefinerStub:
    """Serves `total` responses, `page_length` a page, by cursor (default) or by page number."""

    def __init__(self, total: int, *, cursor: bool = True, api_key: str = "refiner-key", delay: float = 0.0, make=api_item) -> None:
        self.total = total
        self.cursor = cursor
        self.api_key = api_key
        self.delay = delay
        self.make = make
        self.script: deque[tuple[int, dict[str, str]]] = deque()  # answers to give first
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                with stub.lock:
                    stub.requests.append(
                        {"path": parts.path, "query": query, "auth": self.headers.get("Authorization"), "at": time.monotonic()}
                    )
                    scripted = stub.script.popleft() if stub.script else None
                if stub.delay:
                    time.sleep(stub.delay)
                if self.headers.get("Authorization") != f"Bearer {stub.api_key}":
                    return self._send(401, {"message": "Unauthenticated."})
                if scripted:
                    return self._send(scripted[0], {"message": "scripted"}, scripted[1])
                self._send(200, stub.page(query))

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def page(self, query: dict[str, str]) -> dict[str, Any]:
        length = int(query.get("page_length", 50))
        if "page_cursor" in query:
            number = json.loads(base64.urlsafe_b64decode(query["page_cursor"]))["page"]
        else:
            number = int(query.get("page", 1))
        last = max(1, -(-self.total // length))
        start = (number - 1) * length
        items = [self.make(i) for i in range(start, min(start + length, self.total))]
        pagination: dict[str, Any] = {"current_page": number, "last_page": last, "page_length": length}
        if self.cursor:
            has_next = number < last
            pagination["next_page_cursor"] = (
                base64.urlsafe_b64encode(json.dumps({"page": number + 1}).encode()).decode() if has_next else None
            )
        return {"items": items, "pagination": pagination}

    def __enter__(self) -> RefinerStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
