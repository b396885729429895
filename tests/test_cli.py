"""SPEC sections 1 and 5: the refiner-source command, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from refiner_source.outbox import Outbox
from tests.service import command


def run(args, env, timeout=60):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SEGMENT_", "REFINER_", "DATABASE_URL"))}
    return subprocess.run([*command(), *args], env={**full, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "env, named",
    [
        ({"REFINER_WEBHOOK_SECRET": "s3cret-token-value"}, "SEGMENT_WRITE_KEY"),
        ({"SEGMENT_WRITE_KEY": "wk"}, "REFINER_WEBHOOK_SECRET"),
        ({"SEGMENT_WRITE_KEY": "wk", "REFINER_WEBHOOK_SECRET": "s3cret-token-value", "PORT": "http"}, "PORT"),
    ],
)
def test_serve_with_a_missing_or_malformed_setting_stops_with_one_line(env, named, tmp_path):
    result = run(["serve"], {"DATABASE_URL": f"sqlite:///{tmp_path}/x.db", **env})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_init_db_creates_the_schema_and_is_safe_twice(store_url):
    for _ in range(2):
        result = run(["init-db"], {"DATABASE_URL": store_url})
        assert result.returncode == 0, result.stderr
        assert "schema ready" in result.stdout


def test_status_prints_pending_delivered_dead_and_oldest_age(store_url, outbox):
    outbox.store("r\nE", "r", "E", [{"messageId": f"m{i}", "type": "track"} for i in range(3)])
    a, b, _c = outbox.claim(3, 60, "w")
    outbox.mark_delivered([a.id])
    outbox.mark_dead([b.id], "HTTP 400 invalid: nope")
    outbox.release([_c.id], 0, "retry")
    text = run(["status"], {"DATABASE_URL": store_url})
    assert text.returncode == 0, text.stderr
    assert "pending    1" in text.stdout and "delivered  1" in text.stdout and "dead       1" in text.stdout
    assert "oldest pending age" in text.stdout and "HTTP 400 invalid: nope" in text.stdout
    data = json.loads(run(["status", "--json"], {"DATABASE_URL": store_url}).stdout)
    assert (data["pending"], data["delivered"], data["dead"]) == (1, 1, 1) and data["oldest_pending_age"] >= 0


def test_replay_puts_dead_letters_back_in_line(store_url, outbox):
    outbox.store("r\nE", "r", "E", [{"messageId": "m", "type": "track"}])
    (claimed,) = outbox.claim(1, 60, "w")
    outbox.mark_dead([claimed.id], "HTTP 400")
    result = run(["replay"], {"DATABASE_URL": store_url})
    assert result.returncode == 0 and "1 dead letter(s) queued again" in result.stdout
    assert Outbox(store_url).stats().pending == 1


def test_status_with_an_unreachable_store_says_so_in_one_line():
    result = run(["status"], {"DATABASE_URL": "postgres://postgres@127.0.0.1:1/none"})
    assert result.returncode == 1
    assert "not answering" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_purge_dead_deletes_dead_letters_on_request(store_url, outbox):
    outbox.store("r\nE", "r", "E", [{"messageId": "m", "type": "track"}])
    (claimed,) = outbox.claim(1, 60, "w")
    outbox.mark_dead([claimed.id], "HTTP 400")
    kept = run(["purge-dead", "--older-than", "1", "--yes"], {"DATABASE_URL": store_url})
    assert kept.returncode == 0 and "0 dead letter(s) deleted" in kept.stdout
    gone = run(["purge-dead", "--yes"], {"DATABASE_URL": store_url})
    assert gone.returncode == 0 and "1 dead letter(s) deleted" in gone.stdout
    assert Outbox(store_url).stats().dead == 0
