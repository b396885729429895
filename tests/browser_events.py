"""Segment events as analytics.js sends them from a browser (page and track calls with the whole
browser context: campaign, page, userAgent, userAgentData, screen, traits), about 2.2 KB each,
and batches of them as Segment's Webhooks (Actions) destination posts them. Shared by the tests
and the benchmarks."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

# Segment's Webhooks (Actions) destination: 1,000 events a batch by default, 4,000 at most.
LARGEST_BATCH = 4000

_USER_AGENT = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)


def browser_event(i: int, run: str = "run") -> dict[str, Any]:
    """Event `i` of a run: a page call every third event, else a track, for user `i % 97`."""
    user = f"{run}-user-{i % 97}"
    url = f"https://app.example.com/projects/{i % 13}/reports?tab=overview&utm_source=newsletter&utm_campaign=winter-{i % 5}"
    event: dict[str, Any] = {
        "messageId": f"ajs-next-{run}-{i:06d}-0f7a9c2e4b1d4e8f9a6b3c5d7e9f1a2b",
        "type": "page" if i % 3 == 0 else "track",
        "userId": user,
        "anonymousId": f"6f3e2b1a-{i:04d}-4c5d-8e9f-0a1b2c3d4e5f",
        "timestamp": "2026-11-30T10:15:30.123Z",
        "sentAt": "2026-11-30T10:15:30.456Z",
        "receivedAt": "2026-11-30T10:15:31.012Z",
        "originalTimestamp": "2026-11-30T10:15:30.120Z",
        "channel": "client",
        "integrations": {},
        "context": {
            "active": True,
            "app": {"name": "Example App", "version": "4.12.0"},
            "campaign": {"name": f"winter-{i % 5}", "source": "newsletter", "medium": "email", "term": "reports", "content": "cta-2"},
            "ip": "203.0.113.42",
            "library": {"name": "analytics.js", "version": "next-1.74.0"},
            "locale": "en-GB",
            "page": {
                "path": f"/projects/{i % 13}/reports",
                "referrer": "https://mail.example.net/",
                "search": "?tab=overview&utm_source=newsletter",
                "title": "Reports · Example App",
                "url": url,
            },
            "screen": {"density": 2, "height": 1117, "width": 1728, "innerHeight": 993, "innerWidth": 1728},
            "timezone": "Europe/London",
            "traits": {"email": f"{user}@example.com", "name": f"User {i % 97}", "plan": "business", "company": {"id": "acct-7"}},
            "userAgent": _USER_AGENT,
            "userAgentData": {
                "brands": [
                    {"brand": "Google Chrome", "version": "131"},
                    {"brand": "Chromium", "version": "131"},
                    {"brand": "Not_A Brand", "version": "24"},
                ],
                "mobile": False,
                "platform": "macOS",
                "architecture": "arm",
                "bitness": "64",
                "model": "",
                "platformVersion": "15.1.0",
                "uaFullVersion": "131.0.6778.86",
                "fullVersionList": [
                    {"brand": "Google Chrome", "version": "131.0.6778.86"},
                    {"brand": "Chromium", "version": "131.0.6778.86"},
                    {"brand": "Not_A Brand", "version": "24.0.0.0"},
                ],
            },
        },
        "properties": {
            "path": f"/projects/{i % 13}/reports",
            "referrer": "https://mail.example.net/",
            "search": "?tab=overview&utm_source=newsletter",
            "title": "Reports · Example App",
            "url": url,
            "report_id": f"rep-{i:06d}",
            "filters": {"range": "last_30_days", "segment": "all", "compare": True},
        },
        "writeKey": "wk_0123456789abcdef0123456789abcdef",
        "version": 2,
    }
    if event["type"] == "page":
        event["name"] = "Reports"
        event["category"] = "Projects"
    else:
        event["event"] = "Report Viewed"
    return event


def batch(events: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """(the body Segment posts for a batch: compact JSON as JSON.stringify writes it, the text of its first element)."""
    elements = [json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode() for e in events]
    return b"[" + b",".join(elements) + b"]", elements[0]


def signature(text: bytes, secret: str) -> str:
    """X-Signature as Segment sends it: the hex HMAC-SHA1 of the text, keyed with the shared secret."""
    return hmac.new(secret.encode(), text, hashlib.sha1).hexdigest()
