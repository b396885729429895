"""The refiner-source command, run as a user runs it: settings read once, one line per mistake, and its subcommands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import pytest

from refiner_source.store import SEGMENT, DeadLetter, Store
from tests.conftest import entry_for
from tests.service import command


def run(args, env, timeout=60, cwd=None):
    """The command with `env` over a clean environment, run in `cwd` (a temporary folder by default, so
    that a relative path never writes into the checkout)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SEGMENT_", "REFINER_", "DATABASE_URL"))}
    with tempfile.TemporaryDirectory() as scratch:
        return subprocess.run([*command(), *args], env={**full, **env}, capture_output=True, text=True, timeout=timeout, cwd=cwd or scratch)


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
    outbox.store_many([entry_for(i) for i in range(3)])
    a, b, c = outbox.claim(SEGMENT, 3, 60, "w")
    outbox.settle(
        "w", delivered=[a.id], dead=[DeadLetter(b.id, "m1", "track", "HTTP 400 invalid: nope")], released=[c.id], destination=SEGMENT
    )
    text = run(["status"], {"DATABASE_URL": store_url})
    assert text.returncode == 0, text.stderr
    assert "pending    1" in text.stdout and "delivered  1" in text.stdout and "dead       1" in text.stdout
    assert "oldest pending age" in text.stdout and "HTTP 400 invalid: nope" in text.stdout
    data = json.loads(run(["status", "--json"], {"DATABASE_URL": store_url}).stdout)
    assert (data["pending"], data["delivered"], data["dead"]) == (1, 1, 1) and data["oldest_pending_age"] >= 0


def dead_one(outbox) -> None:
    outbox.store_many([entry_for(1)])
    (claimed,) = outbox.claim(SEGMENT, 1, 60, "w")
    outbox.settle("w", dead=[DeadLetter(claimed.id, "m", "track", "HTTP 400")], destination=SEGMENT)


def test_replay_puts_dead_letters_back_in_line(store_url, outbox):
    dead_one(outbox)
    result = run(["replay"], {"DATABASE_URL": store_url})
    assert result.returncode == 0 and "1 dead letter(s) queued again" in result.stdout
    assert Store(store_url).stats(SEGMENT).pending == 1


def test_status_with_an_unreachable_store_says_so_in_one_line():
    result = run(["status"], {"DATABASE_URL": "postgres://postgres@127.0.0.1:1/none"})
    assert result.returncode == 1
    assert "not answering" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_purge_dead_deletes_dead_letters_on_request(store_url, outbox):
    dead_one(outbox)
    kept = run(["purge-dead", "--older-than", "1", "--yes"], {"DATABASE_URL": store_url})
    assert kept.returncode == 0 and "0 dead letter(s) deleted" in kept.stdout
    gone = run(["purge-dead", "--yes"], {"DATABASE_URL": store_url})
    assert gone.returncode == 0 and "1 dead letter(s) deleted" in gone.stdout
    assert Store(store_url).stats(SEGMENT).dead == 0


# --- clear lines for the mistakes a new user makes (issue 9) -------------------------------------


def one_line_error(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_sqlite_url_with_two_slashes_is_one_line_showing_the_right_one(tmp_path):
    line = one_line_error(run(["status"], {"DATABASE_URL": "sqlite://refiner.db"}, cwd=tmp_path))
    assert "DATABASE_URL" in line and "sqlite:///refiner.db" in line
    assert not list(tmp_path.iterdir())  # nothing created on the way


def test_store_without_schema_says_run_init_db_with_the_resolved_path(store_url, tmp_path):
    url = f"sqlite:///{tmp_path}/never-initialised.db" if store_url.startswith("sqlite") else store_url
    line = one_line_error(run(["status"], {"DATABASE_URL": url}, cwd=tmp_path))
    assert "init-db" in line and "not answering" not in line
    if url.startswith("sqlite"):
        assert f"{tmp_path}/never-initialised.db" in line


def test_sqlite_in_a_missing_folder_names_the_folder(tmp_path):
    line = one_line_error(run(["init-db"], {"DATABASE_URL": "sqlite:///no/such/folder/x.db"}, cwd=tmp_path))
    assert f"the folder {tmp_path}/no/such/folder does not exist" in line and "not answering" not in line


def test_sqlite_in_an_unwritable_folder_names_the_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):  # root writes anywhere: make the folder immutable instead
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("running as root on a file system without chattr +i: no folder can be made unwritable")
    try:
        line = one_line_error(run(["init-db"], {"DATABASE_URL": f"sqlite:///{folder}/x.db"}))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
    assert f"the folder {folder} is not writable" in line and "not answering" not in line


def test_refiner_api_url_error_suggests_refiners_url_not_segments(tmp_path):
    line = one_line_error(run(["status"], {"REFINER_API_URL": "api.refiner.io/v1", "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}))
    assert "REFINER_API_URL" in line and "https://api.refiner.io/v1" in line and "segment" not in line.lower()


def test_replay_of_an_unknown_response_says_nothing_matched(store_url, outbox):
    result = run(["replay", "--response", "no-such-response"], {"DATABASE_URL": store_url})
    line = one_line_error(result)
    assert "nothing matched" in line and "--response no-such-response" in line


@pytest.mark.parametrize("command_args", [["replay"], ["backfill"]])
def test_reversed_since_until_is_refused(command_args, tmp_path):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/x.db", "REFINER_API_KEY": "k", "REFINER_API_URL": "http://127.0.0.1:9"}
    result = run([*command_args, "--since", "2026-11-15", "--until", "2026-11-01"], env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--since (2026-11-15 00:00:00) must be before --until (2026-11-01 00:00:00)" in result.stderr


def test_status_says_when_nothing_is_delivered_while_messages_wait(store_url, outbox, monkeypatch):
    import time

    outbox.store_many([entry_for(1)])
    fresh = run(["status"], {"DATABASE_URL": store_url})
    assert "nothing delivered" not in fresh.stdout
    # The message has waited two minutes, and nothing was delivered since.
    from sqlalchemy import update

    from refiner_source.store import events

    with outbox.engine.begin() as conn:
        conn.execute(update(events).values(created_at=time.time() - 120, queued_at=time.time() - 120))
    stalled = run(["status"], {"DATABASE_URL": store_url})
    assert re.search(r"nothing delivered for 12\ds while 1 event\(s\) wait", stalled.stdout), stalled.stdout
    assert "delivery worker running" in stalled.stdout
    assert json.loads(run(["status", "--json"], {"DATABASE_URL": store_url}).stdout)["stalled"] is True


def test_status_json_has_the_newest_dead_letters_and_the_last_error_per_direction(store_url, outbox):
    outbox.store_many([entry_for(i) for i in range(2)])
    a, b = outbox.claim(SEGMENT, 2, 60, "w")
    outbox.settle("w", released=[a.id], delay=60, error="HTTP 503: later", destination=SEGMENT)
    outbox.settle("w", dead=[DeadLetter(b.id, "m-b", "track", "HTTP 400 invalid: nope")], destination=SEGMENT)
    data = json.loads(run(["status", "--json"], {"DATABASE_URL": store_url}).stdout)
    segment = data["directions"]["segment"]
    assert segment["dead_letters"] == [{"id": "r1", "message_id": "m-b", "error": "HTTP 400 invalid: nope"}]
    assert segment["last_error"]["error"] == "HTTP 400 invalid: nope" and segment["last_error"]["at"]
    assert data["directions"]["refiner"]["last_error"] is None and data["directions"]["refiner"]["dead_letters"] == []
    text = run(["status", "--to", "segment"], {"DATABASE_URL": store_url}).stdout
    assert "last delivery error (" in text and "HTTP 400 invalid: nope" in text and "Segment to Refiner" not in text


def test_status_watch_refreshes_until_stopped(store_url, outbox):
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGMENT_", "REFINER_", "DATABASE_URL"))}
    watcher = subprocess.Popen(
        [*command(), "status", "--watch", "--json"], env={**env, "DATABASE_URL": store_url}, stdout=subprocess.PIPE, text=True
    )
    try:
        first = json.loads(watcher.stdout.readline())
        outbox.store_many([entry_for(1)])
        deadline = time.monotonic() + 20
        while True:  # each refresh is a new line; the new event shows up in one
            line = json.loads(watcher.stdout.readline())
            if line["pending"] == first["pending"] + 1 or time.monotonic() > deadline:
                break
        assert line["pending"] == first["pending"] + 1
    finally:
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0


def test_every_command_is_on_the_group_with_its_help(tmp_path):
    """The commands live in several modules of refiner_source/run/; the user sees one command."""
    listed = run(["--help"], {})
    assert listed.returncode == 0, listed.stderr
    names = ["backfill", "forget", "init-db", "preview", "purge-dead", "questions", "replay", "serve", "status", "worker"]
    assert [line.split()[0] for line in listed.stdout.split("Commands:")[1].strip().splitlines()] == names
    for name in names:
        helped = run([name, "--help"], {})
        assert helped.returncode == 0 and f"Usage: refiner-source {name}" in helped.stdout, helped.stdout + helped.stderr


def test_help_speaks_of_both_directions_and_what_turns_each_on():
    listed = run(["--help"], {})
    assert listed.returncode == 0, listed.stderr
    pairs = ("SEGMENT_WRITE_KEY and REFINER_WEBHOOK_SECRET", "SEGMENT_SHARED_SECRET and REFINER_API_KEY")
    for words in ("Refiner -> Segment", "Segment -> Refiner", *pairs):
        assert words in listed.stdout, listed.stdout


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["replay"], ["purge-dead", "--yes"]])
def test_commands_on_a_sqlite_file_that_is_not_there_say_so_and_create_nothing(args, tmp_path):
    missing = tmp_path / "nowhere" / "refiner-source.db"
    (tmp_path / "nowhere").mkdir()
    result = run(args, {"DATABASE_URL": f"sqlite:///{missing}"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and f"no database at {missing}" in result.stderr
    assert list((tmp_path / "nowhere").iterdir()) == []  # no database, -wal, -shm or lock file left behind
