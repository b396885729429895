"""In-process profiles of the two hot paths: `python bench/profile.py [webhook|mapping] [--pyinstrument]`.

webhook  2,000 webhooks through Flask's test client into a fresh SQLite store, one thread (no
         group commit: every webhook pays its own fsync), after 200 to warm up;
mapping  the delivery worker's mapping of 3,000 stored events.

Prints the time per item, or, with --pyinstrument (pip install pyinstrument), where it goes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from refiner_source import create_app  # noqa: E402
from refiner_source.config import Settings, normalize_database_url  # noqa: E402
from refiner_source.directions.mapping_file import MappingRules  # noqa: E402
from refiner_source.store import Store  # noqa: E402
from refiner_source.to_segment.events import WebhookSchema, event_from_json  # noqa: E402
from refiner_source.to_segment.intake import prepare  # noqa: E402
from refiner_source.to_segment.mapping import map_event  # noqa: E402

FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "webhook_completed_survey.json").read_text())
TOKEN = "profile-secret-0123456789"


def bodies(n: int) -> list[dict]:
    out = []
    for i in range(n):
        body = copy.deepcopy(FIXTURE)
        body["response"]["uuid"] = f"p{i}"
        out.append(body)
    return out


def webhook(measure) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = normalize_database_url(f"sqlite:///{tmp}/profile.db")
        Store(url).init_schema()
        app = create_app(Settings(segment_write_key="k", webhook_secrets=(TOKEN,), database_url=url, log_level="WARNING"))
        client = app.test_client()
        raw = [json.dumps(b) for b in bodies(2200)]

        def run(items: list[str]) -> None:
            for body in items:
                assert client.post(f"/webhooks/refiner?token={TOKEN}", data=body, content_type="application/json").status_code == 202

        run(raw[:200])
        measure("webhook", len(raw) - 200, lambda: run(raw[200:]))


def mapping(measure) -> None:
    rules, now = MappingRules(), datetime.now(UTC)
    stored = [prepare(WebhookSchema().load(b), rules).event for b in bodies(3000)]
    measure("event mapped", len(stored), lambda: [map_event(event_from_json(e), rules, now) for e in stored])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", help="webhook, mapping, or both (the default)")
    parser.add_argument("--pyinstrument", action="store_true")
    args = parser.parse_args()
    unknown = set(args.what) - {"webhook", "mapping"}
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}; choose webhook or mapping")

    def measure(name: str, count: int, work) -> None:
        if args.pyinstrument:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
            work()
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False))
            return
        started = time.perf_counter()
        work()
        elapsed = time.perf_counter() - started
        print(f"{name}: {elapsed / count * 1000:.3f} ms each ({count / elapsed:,.0f}/s, one thread)")

    for what in args.what or ["webhook", "mapping"]:
        {"webhook": webhook, "mapping": mapping}[what](measure)


if __name__ == "__main__":
    main()
