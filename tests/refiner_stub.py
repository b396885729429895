"""A real local HTTP server standing in for Refiner's REST API `GET /responses`."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.http_stub import JsonHandler, LoopbackServer


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


class RefinerStub(LoopbackServer):
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

        class Handler(JsonHandler):
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
                    return self.send_json(401, {"message": "Unauthenticated."})
                if scripted:
                    return self.send_json(scripted[0], {"message": "scripted"}, scripted[1])
                self.send_json(200, stub.page(query))

        super().__init__(Handler)
        self.url = self.base + "/v1"

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
