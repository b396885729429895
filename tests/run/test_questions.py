"""`refiner-source questions`: the question identifiers seen, with what the mapping makes of each now."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from refiner_source.directions.mapping_file import MappingRules
from refiner_source.store import REFINER, events
from refiner_source.to_refiner.events import load
from refiner_source.to_refiner.intake import prepare
from refiner_source.to_segment.events import WebhookSchema
from refiner_source.to_segment.intake import prepare as prepare_response
from tests.conftest import survey_body
from tests.refiner_stub import RefinerStub
from tests.run.test_cli import run


def stored(i: int, **answers) -> object:
    body = survey_body(f"q{i}")
    body["response"]["data"].update(answers)
    return prepare_response(WebhookSchema().load(body), MappingRules())


def test_questions_lists_every_question_of_the_stored_events_with_counts_names_types_and_collisions(outbox, store_url, tmp_path):
    outbox.store_many([stored(1, **{"Job role": "PM"}), stored(2, **{"Job role": None}), stored(3)])
    outbox.store_many([prepare(load({"type": "identify", "messageId": "seg-1", "userId": "u", "traits": {"x": 1}}))])
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('[traits]\nemployee_count = "company_size"\n[types]\n"How likely are you to recommend us?" = "number"\n')
    done = run(["questions", "--json"], {"DATABASE_URL": store_url, "REFINER_MAPPING_FILE": str(mapping)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["source"] == "store"
    rows = {row["question"]: row for row in report["questions"]}
    assert set(rows) == {"what_is_your_job_role", "employee_count", "How likely are you to recommend us?", "Job role"}  # not Segment's
    assert rows["what_is_your_job_role"]["answers"] == 3 and rows["Job role"]["answers"] == 1  # a null answer is no answer
    assert rows["employee_count"]["trait"] == "company_size" and rows["employee_count"]["named_in_mapping_file"] is True
    assert rows["How likely are you to recommend us?"]["type"] == "number"
    assert rows["Job role"]["collides_with"] == [] and rows["Job role"]["trait"] == "refiner_job_role"
    text = run(["questions"], {"DATABASE_URL": store_url, "REFINER_MAPPING_FILE": str(mapping)})
    assert "company_size" in text.stdout and "How likely are you to recommend us?" in text.stdout


def test_questions_names_the_questions_whose_trait_names_collide(outbox, store_url):
    outbox.store_many([stored(1, **{"Job Role!": "PM", "job role": "CTO"})])
    rows = {r["question"]: r for r in json.loads(run(["questions", "--json"], {"DATABASE_URL": store_url}).stdout)["questions"]}
    assert rows["Job Role!"]["collides_with"] == ["job role"] and rows["job role"]["collides_with"] == ["Job Role!"]
    assert rows["Job Role!"]["trait"] != rows["job role"]["trait"]  # each keeps a name of its own
    text = run(["questions"], {"DATABASE_URL": store_url}).stdout
    assert "its name collides with: job role" in text


def test_questions_leave_out_events_past_retention(outbox, store_url):
    outbox.store_many([stored(1, forgotten_question="x")])
    with outbox.engine.begin() as conn:
        conn.execute(update(events).values(event=None))  # what retention does to an event's answers
    outbox.store_many([stored(2)])
    rows = json.loads(run(["questions", "--json"], {"DATABASE_URL": store_url}).stdout)["questions"]
    assert "forgotten_question" not in {r["question"] for r in rows}
    assert {r["question"]: r["answers"] for r in rows}["what_is_your_job_role"] == 1
    assert outbox.stats(REFINER).pending == 0


def test_questions_with_api_reads_refiners_responses_of_the_last_days(tmp_path):
    with RefinerStub(total=25) as refiner:
        env = {"REFINER_API_KEY": "refiner-key", "REFINER_API_URL": refiner.url, "DATABASE_URL": f"sqlite:///{tmp_path}/none.db"}
        done = run(["questions", "--api", "--days", "7", "--json"], env)
        assert done.returncode == 0, done.stderr
        asked = refiner.requests[0]["query"]
    rows = {r["question"]: r["answers"] for r in json.loads(done.stdout)["questions"]}
    assert rows == {"How likely are you to recommend us?": 25, "What could we do better?": 25}
    since = datetime.now(UTC) - timedelta(days=7)
    assert asked["date_range_start"].startswith(since.strftime("%Y-%m-%d"))
    assert not (tmp_path / "none.db").exists()  # --api reads no store


def test_questions_with_api_needs_the_api_key(tmp_path):
    done = run(["questions", "--api"], {"DATABASE_URL": f"sqlite:///{tmp_path}/x.db"})
    assert done.returncode == 1 and "REFINER_API_KEY is not set" in done.stderr and "Traceback" not in done.stderr


def test_questions_on_an_empty_store_says_so(outbox, store_url):
    assert "no answers in the stored events" in run(["questions"], {"DATABASE_URL": store_url}).stdout


def test_questions_show_the_name_delivery_gives_a_question_that_asks_for_a_reserved_one(outbox, store_url, tmp_path):
    from refiner_source.to_segment.mapping import map_event

    outbox.store_many([stored(1, email="work address", nps_category="x")])
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('[nps]\nquestion = "How likely are you to recommend us?"\n')
    rows = {
        r["question"]: r
        for r in json.loads(run(["questions", "--json"], {"DATABASE_URL": store_url, "REFINER_MAPPING_FILE": str(mapping)}).stdout)[
            "questions"
        ]
    }
    body = survey_body("q1")
    body["response"]["data"].update(email="work address", nps_category="x")
    rules = MappingRules(nps_question="How likely are you to recommend us?")
    (track,) = [m for m in map_event(WebhookSchema().load(body), rules, datetime.now(UTC)) if m["type"] == "track"]
    for question in ("email", "nps_category"):
        assert rows[question]["trait"] != f"refiner_{question}"
        assert track["properties"][rows[question]["trait"]] == body["response"]["data"][question]
