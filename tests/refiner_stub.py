"""A real local HTTP server standing in for Refiner's REST API: `GET /responses` (the backfill),
`POST /identify-user` and `POST /track-event` (Segment to Refiner).

`GET /responses` answers as Refiner documents it (docs/backfill.md): the contact's `attributes` only
with `with_attributes=1`, and responses without `completed_at` left out with `include=completed`."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.http_stub import JsonHandler, LoopbackServer


def api_item(i: int, *, account: bool = True, remote_id: bool = True, completed: bool = True) -> dict[str, Any]:
    """A response as the API lists it with `with_attributes=1` (see tests/fixtures/api_responses_page.json)."""
    contact: dict[str, Any] = {
        "uuid": f"contact-{i}",
        "remote_id": f"user-{i}" if remote_id else None,
        "email": f"person{i}@example.com",
        "display_name": f"Person {i}",
        "attributes": {"email": f"person{i}@example.com", "first_name": f"Person {i}", "form_submissions_count": "1"},
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


def api_item_of_webhook(body: dict[str, Any], *, account_attributes: bool = False) -> dict[str, Any]:
    """The item `GET /responses?with_attributes=1` lists for the response a webhook `body` carries.

    The account comes with its uuid, remote_id, display_name and domain; its `attributes` only with
    `account_attributes`, which Refiner's documentation does not promise (docs/backfill.md)."""
    response = body["response"]
    account = body.get("account")
    contact: dict[str, Any] = {k: body.get(k) for k in ("uuid", "remote_id", "email", "display_name", "attributes")}
    if account:
        contact["account"] = {k: account.get(k) for k in ("uuid", "remote_id", "display_name", "domain")}
        if account_attributes:
            contact["account"]["attributes"] = account.get("attributes")
    return {
        "uuid": response["uuid"],
        **{key: _api_time(response.get(key)) for key in _TIMES},
        "show_counter": response.get("show_counter"),
        "form": body.get("form"),
        "data": response.get("data"),
        "contact": contact,
    }


_TIMES = (
    "first_shown_at",
    "last_shown_at",
    "first_data_reception_at",
    "last_data_reception_at",
    "completed_at",
    "received_at",
    "dismissed_at",
)


def _api_time(webhook_time: str | None) -> str | None:
    # Webhooks write 2026-11-18T16:42:57.000000Z; the API writes 2026-11-18 16:42:57 (UTC, to the second).
    return webhook_time[:19].replace("T", " ") if webhook_time else None


def as_asked(item: Any, query: dict[str, str]) -> Any:
    """`item` as the API lists it for `query`: the attributes only with `with_attributes=1` (a copy: a
    test's `make` may hand the same item out again)."""
    if query.get("with_attributes") in ("1", "true") or not isinstance(item, dict) or not isinstance(item.get("contact"), dict):
        return item
    contact = {k: v for k, v in item["contact"].items() if k != "attributes"}
    if isinstance(contact.get("account"), dict):
        contact["account"] = {k: v for k, v in contact["account"].items() if k != "attributes"}
    return {**item, "contact": contact}


def _wanted(item: Any, query: dict[str, str]) -> bool:
    # include=completed leaves out views and partial responses; without it every item is listed.
    return query.get("include") != "completed" or not isinstance(item, dict) or bool(item.get("completed_at"))


# An answer to give: (status, headers) or (status, headers, JSON body).
Answer = tuple[int, dict[str, str]] | tuple[int, dict[str, str], Any]
POST_PATHS = ("/v1/identify-user", "/v1/track-event")


class RefinerStub(LoopbackServer):
    """Serves `total` responses (`make(i)`, each as listed with `with_attributes=1`; see as_asked()),
    `page_length` a page, by cursor (default) or by page number; and
    takes identify-user and track-event calls, each recorded in `calls` as
    {"path", "body", "auth", "at", "done", "status"} (`at` when it arrived and `done` when it was
    answered, both time.monotonic()).

    A call is answered, in this order: 401 when the Bearer key is not `api_key`; what `respond(path,
    body)` returns, when it returns an Answer (a refusal that depends on the call, as Refiner's
    validation); the next answer of `post_script`; else 200 {"message": "ok"}. `delay` seconds pass
    before every answer, GET or POST."""

    def __init__(self, total: int = 0, *, cursor: bool = True, api_key: str = "refiner-key", delay: float = 0.0, make=api_item) -> None:
        self.total = total
        self.cursor = cursor
        self.api_key = api_key
        self.delay = delay
        self.make = make
        self.script: deque[tuple[int, dict[str, str]]] = deque()  # answers to give first
        self.requests: list[dict[str, Any]] = []
        self.post_script: deque[Answer] = deque()  # answers to POSTs to give first
        self.respond: Callable[[str, Any], Answer | None] = lambda path, body: None
        self.calls: list[dict[str, Any]] = []
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

            def do_POST(self) -> None:
                arrived = time.monotonic()
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = urlsplit(self.path).path
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                auth = self.headers.get("Authorization")
                if path not in POST_PATHS:
                    answer: tuple = (404, {}, {"message": "Not found."})
                elif auth != f"Bearer {stub.api_key}":
                    answer = (401, {}, {"message": "Unauthenticated."})
                elif body is None or not isinstance(body, dict):
                    answer = (400, {}, {"message": "The body is not a JSON object."})
                else:
                    answer = stub.respond(path, body)
                    if answer is None:
                        with stub.lock:
                            answer = stub.post_script.popleft() if stub.post_script else (200, {}, {"message": "ok"})
                status, headers = answer[0], answer[1]
                reply = answer[2] if len(answer) > 2 else {"message": "scripted"}
                if stub.delay:
                    time.sleep(stub.delay)
                call = {"path": path.removeprefix("/v1"), "body": body, "auth": auth, "at": arrived, "status": status}
                with stub.lock:
                    call["done"] = time.monotonic()
                    stub.calls.append(call)
                self.send_json(status, reply, headers)

        super().__init__(Handler)
        self.url = self.base + "/v1"

    def posted(self, path: str | None = None, status: int | None = 200) -> list[dict[str, Any]]:
        """The calls so far (to `path` only, when given) that got `status` (any, when None), in the order answered."""
        with self.lock:
            calls = list(self.calls)
        return [c for c in calls if (path is None or c["path"] == path) and (status is None or c["status"] == status)]

    def wait_for_calls(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0, status: int | None = 200):
        """The calls answered `status`, once `predicate` holds for them; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            calls = self.posted(status=status)
            if predicate(calls):
                return calls
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s; {len(calls)} call(s): {[c['body'] for c in calls][-10:]}")
            time.sleep(0.05)

    def page(self, query: dict[str, str]) -> dict[str, Any]:
        length = int(query.get("page_length", 50))
        if "page_cursor" in query:
            number = json.loads(base64.urlsafe_b64decode(query["page_cursor"]))["page"]
        else:
            number = int(query.get("page", 1))
        last = max(1, -(-self.total // length))
        start = (number - 1) * length
        # A page keeps its window of `total` even when include= leaves some of it out: the real API
        # fills pages, but the backfill follows cursors and last_page either way, which is what matters.
        made = (self.make(i) for i in range(start, min(start + length, self.total)))
        items = [as_asked(item, query) for item in made if _wanted(item, query)]
        pagination: dict[str, Any] = {"current_page": number, "last_page": last, "page_length": length}
        if self.cursor:
            has_next = number < last
            pagination["next_page_cursor"] = (
                base64.urlsafe_b64encode(json.dumps({"page": number + 1}).encode()).decode() if has_next else None
            )
        return {"items": items, "pagination": pagination}


class RateLimit:
    """A rate limit for RefinerStub.respond, as an API gateway keeps one: a bucket of `burst` calls
    that refills at `per_second`; a call that finds it empty is answered 429 with Retry-After (whole
    seconds, as HTTP has it). Refiner documents no limit: this is the one a delivery must live with
    when there is one."""

    def __init__(self, per_second: float, burst: float | None = None, retry_after: int = 1) -> None:
        self.per_second = per_second
        self.burst = burst if burst is not None else max(1.0, per_second / 10)
        self.retry_after = retry_after
        self.tokens = self.burst
        self.at = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, path: str, body: Any) -> Answer | None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return None
        return (429, {"Retry-After": str(self.retry_after)}, {"message": "Too Many Attempts."})


def max_in_flight(calls: list[dict[str, Any]]) -> int:
    """The most calls the stub held at once: each is in flight from arrival to answer."""
    edges = sorted([(c["at"], 1) for c in calls] + [(c["done"], -1) for c in calls], key=lambda e: (e[0], e[1]))
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most
