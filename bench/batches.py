"""Segment's largest batches: `python bench/batches.py [--quick]`.

Posts batches as Segment's Webhooks (Actions) destination does at its largest setting (4,000 events
a batch, signed by the first event) to `refiner-source serve` with Segment to Refiner on, several
at once, and reports how long each took to be answered (Segment gives up after 10 s), what each
answer counted, and the peak memory of the whole `serve` tree (web processes, delivery worker,
supervisor) from the first byte sent until a Refiner stand-in has received every event, sampled
every 50 ms. Two kinds of event: analytics.js's page and track calls with a full browser context
(about 2.2 KB each, 8.2 MiB a batch), and events padded to 32 KB, the most Segment lets an event
be (125 MiB a batch).

Prints a table, then one JSON line. Asserts nothing about speed or memory: the numbers go in
bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import SEGMENT_SECRET, App, PeakRss, tree_rss_mb  # noqa: E402
from tests.browser_events import LARGEST_BATCH, batch, browser_event, signature  # noqa: E402
from tests.refiner_stub import RefinerStub  # noqa: E402
from tests.segment_stub import SegmentStub  # noqa: E402

SEGMENT_EVENT_LIMIT = 32 << 10  # bytes: what Segment lets one event be


def padded(event: dict, size: int) -> dict:
    """The event with a trait that brings its JSON to about `size` bytes."""
    room = size - len(json.dumps(event, separators=(",", ":"))) - len(',"notes":""')
    if room > 0:
        event["context"]["traits"]["notes"] = "n" * room
    return event


def post(port: int, body: bytes, first: bytes) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.monotonic()
    conn.request(
        "POST",
        "/webhooks/segment",
        body=body,
        headers={"Content-Type": "application/json", "X-Signature": signature(first, SEGMENT_SECRET)},
    )
    answer = conn.getresponse()
    data = json.loads(answer.read())
    seconds = time.monotonic() - started
    conn.close()
    invalid = len(data.get("invalid", []))
    return {"status": answer.status, "seconds": round(seconds, 2), "accepted": data.get("accepted"), "invalid": invalid}


def run(workdir: Path, kind: str, events: int, at_once: int) -> dict:
    with SegmentStub() as segment, RefinerStub() as refiner:
        extra = {"SEGMENT_SHARED_SECRET": SEGMENT_SECRET, "REFINER_API_KEY": refiner.api_key, "REFINER_API_URL": refiner.url}
        app = App("refiner-source", workdir, segment.url, extra)
        try:
            stamp = f"{kind}-{int(time.time() * 1000)}"
            bodies = []
            for k in range(at_once):
                made = [browser_event(i, f"{stamp}-{k}") for i in range(events)]
                if kind == "32kb":
                    made = [padded(e, SEGMENT_EVENT_LIMIT - 512) for e in made]  # room for what Segment adds
                bodies.append(batch(made))
            idle = tree_rss_mb(app.process.pid)
            with PeakRss(app.process.pid, interval=0.05) as peak:
                with ThreadPoolExecutor(at_once) as pool:
                    answers = list(pool.map(lambda b: post(app.port, *b), bodies))
                answered = peak.peak
                deadline = time.monotonic() + 300
                while len(refiner.calls) < events * at_once and time.monotonic() < deadline:
                    time.sleep(0.1)
            return {
                "kind": kind,
                "events_per_batch": events,
                "batch_mb": round(len(bodies[0][0]) / 2**20, 1),
                "at_once": at_once,
                "answers": answers,
                "idle_rss_mb": round(idle),
                "peak_rss_mb_answering": round(answered),
                "peak_rss_mb": round(peak.peak),
                "peak_pss_mb": round(peak.peak_pss),
                "refiner_calls": len(refiner.calls),
            }
        finally:
            app.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches, so that CI keeps the benchmark working")
    parser.add_argument("--at-once", type=int, default=2, help="batches posted at the same time")
    args = parser.parse_args()
    events = 200 if args.quick else LARGEST_BATCH
    results = []
    with tempfile.TemporaryDirectory(prefix="refiner-bench-") as tmp:
        for kind in ("browser", "32kb"):
            results.append(run(Path(tmp), kind, events, args.at_once))
    print("kind      events  batch MiB  at once  answered in s (status, accepted)        peak MB answering / until delivered (PSS)")
    for r in results:
        answers = ", ".join(f"{a['seconds']} ({a['status']}, {a['accepted']})" for a in r["answers"])
        print(
            f"{r['kind']:<9}{r['events_per_batch']:>7}{r['batch_mb']:>11}{r['at_once']:>9}  {answers:<40}"
            f"{r['peak_rss_mb_answering']:>6} / {r['peak_rss_mb']} ({r['peak_pss_mb']}), idle {r['idle_rss_mb']}, "
            f"{r['refiner_calls']} Refiner calls"
        )
    print(json.dumps({"quick": args.quick, "batches": results}))


if __name__ == "__main__":
    main()
