"""Survey answers the way analysts use them: [types], [nps] and [events] per_answer of the mapping file, rule by rule."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from refiner_source.directions.mapping_file import MappingRules, load_mapping_file
from refiner_source.errors import ConfigError
from refiner_source.to_segment.answers import NotConverted, convert, nps_category
from refiner_source.to_segment.events import ApiResponseSchema, WebhookSchema
from refiner_source.to_segment.intake import prepare
from refiner_source.to_segment.mapping import map_event
from tests.conftest import load_fixture

NOW = datetime(2030, 1, 1, tzinfo=UTC)
NPS = "How likely are you to recommend us?"


def webhook(**data) -> dict:
    body = copy.deepcopy(load_fixture("webhook_completed_survey.json"))
    body["response"]["data"].update(data)
    return body


def messages(body: dict, rules: MappingRules) -> dict[str, dict]:
    """The messages of a webhook body by type (a per-answer track by its question)."""
    found = {}
    for m in map_event(WebhookSchema().load(body), rules, NOW):
        key = m["properties"]["question"] if m["type"] == "track" and "question" in m.get("properties", {}) else m["type"]
        found[key] = m
    return found


def mapping_file(tmp_path, text: str) -> MappingRules:
    path = tmp_path / "mapping.toml"
    path.write_text(text)
    return load_mapping_file(str(path))


# --- [types] -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, value, expected",
    [
        ("number", "8", 8),
        ("number", " 7.5 ", 7.5),
        ("number", 9, 9),
        ("number", "-3", -3),
        ("boolean", "yes", True),
        ("boolean", "False", False),
        ("boolean", 1, True),
        ("boolean", True, True),
        ("string", 8, "8"),
        ("string", True, "true"),
        ("string", "as is", "as is"),
        ("list", "one choice", ["one choice"]),
        ("list", ["a", "b"], ["a", "b"]),
    ],
)
def test_types_convert_each_kind_of_answer(kind, value, expected):
    converted = convert(value, kind)
    assert converted == expected and type(converted) is type(expected)


@pytest.mark.parametrize(
    "kind, value", [("number", "eight"), ("number", "nan"), ("number", True), ("boolean", "maybe"), ("boolean", 2), ("string", ["a"])]
)
def test_types_refuse_what_does_not_read_as_the_type(kind, value):
    with pytest.raises(NotConverted):
        convert(value, kind)


@pytest.mark.parametrize("word", ["true", "yes", "y", "1", "on", " ON ", "True"])
def test_types_boolean_reads_each_yes_word_as_true(word):
    assert convert(word, "boolean") is True


@pytest.mark.parametrize("word", ["false", "no", "n", "0", "off", " Off ", "NO"])
def test_types_boolean_reads_each_no_word_as_false(word):
    assert convert(word, "boolean") is False


def test_types_boolean_reads_the_numbers_0_and_1_and_no_other():
    assert convert(0, "boolean") is False and convert(1, "boolean") is True
    with pytest.raises(NotConverted):
        convert(-1, "boolean")


def test_types_string_writes_a_boolean_as_json_does():
    assert convert(False, "string") == "false" and convert(True, "string") == "true"


def test_types_skip_a_typed_question_the_response_did_not_answer(caplog):
    rules = replace(MappingRules(), types={"never asked": "number", "skipped": "boolean", NPS: "number"})
    caplog.set_level(logging.WARNING)
    found = messages(webhook(skipped=None), rules)
    assert found["track"]["properties"]["refiner_how_likely_are_you_to_recommend_us"] == 8  # the answered one still converts
    assert "refiner_never_asked" not in found["track"]["properties"] and "refiner_skipped" not in found["track"]["properties"]
    assert not [r for r in caplog.records if "type" in r.getMessage()]  # nothing to convert is no failed conversion


def test_an_unknown_type_is_a_programming_error_naming_the_type():
    with pytest.raises(ValueError, match="unknown answer type 'integer'") as info:
        convert("8", "integer")
    assert not isinstance(info.value, NotConverted)


def test_a_failed_conversion_is_warned_of_in_words_that_say_it_was_sent_as_it_came(caplog):
    caplog.set_level(logging.WARNING)
    messages(webhook(), replace(MappingRules(), types={"what_is_your_job_role": "number"}))
    assert [r.getMessage() for r in caplog.records] == ["an answer does not read as its question's type; sent as it came"]


def test_types_apply_to_identify_group_and_track(tmp_path):
    rules = mapping_file(tmp_path, f'account_questions = ["seats"]\n[types]\n"{NPS}" = "number"\nseats = "number"\n')
    found = messages(webhook(seats="40"), rules)
    assert found["identify"]["traits"]["refiner_how_likely_are_you_to_recommend_us"] == 8
    assert found["group"]["traits"]["refiner_seats"] == 40
    assert found["track"]["properties"]["refiner_how_likely_are_you_to_recommend_us"] == 8
    assert found["track"]["properties"]["refiner_seats"] == 40
    untyped = messages(webhook(seats="40"), MappingRules())
    assert untyped["track"]["properties"]["refiner_how_likely_are_you_to_recommend_us"] == "8"  # as Refiner sent it


def test_types_apply_to_a_backfilled_response_as_to_its_webhook():
    rules = replace(MappingRules(), types={NPS: "number"})
    item = load_fixture("api_responses_page.json")["items"][0]
    from_api = [m for m in map_event(ApiResponseSchema().load(item), rules, NOW) if m["type"] == "track"][0]
    assert isinstance(from_api["properties"]["refiner_how_likely_are_you_to_recommend_us"], int)


def test_failed_conversion_is_sent_as_it_came_and_the_warning_names_question_and_response_never_the_value(caplog):
    rules = replace(MappingRules(), types={NPS: "number", "what_is_your_job_role": "boolean"})
    caplog.set_level(logging.WARNING)
    found = messages(webhook(), rules)
    assert found["identify"]["traits"]["refiner_what_is_your_job_role"] == "Product Manager"  # unchanged
    assert found["identify"]["traits"]["refiner_how_likely_are_you_to_recommend_us"] == 8  # the other still converts
    (warning,) = [r for r in caplog.records if "type" in r.getMessage()]
    assert warning.question == "what_is_your_job_role" and warning.type == "boolean"
    assert warning.response_id == "a3e1c2f0-a5d1-11ef-b050-03a44b320007"
    assert "Product Manager" not in caplog.text


def test_unknown_type_name_is_refused_at_start_up_with_the_reason(tmp_path):
    with pytest.raises(ConfigError) as info:
        mapping_file(tmp_path, '[types]\n"q1" = "integer"\n')
    message = str(info.value)
    assert message.startswith("REFINER_MAPPING_FILE") and "'integer'" in message and "number, boolean, string, list" in message


# --- [nps] -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, category",
    [
        (0, "detractor"),
        (6, "detractor"),
        ("6", "detractor"),
        (7, "passive"),
        (8, "passive"),
        ("8", "passive"),
        (9, "promoter"),
        (10, "promoter"),
        (9.0, "promoter"),
        (11, None),
        (-1, None),
        (7.5, None),
        ("eight", None),
        (None, None),
        (True, None),
    ],
)
def test_nps_category_boundaries(answer, category):
    assert nps_category(answer) == category


def test_nps_category_is_a_trait_where_the_answer_goes_and_a_property(tmp_path):
    rules = mapping_file(tmp_path, f'[nps]\nquestion = "{NPS}"\n')
    found = messages(webhook(), rules)
    assert found["identify"]["traits"]["refiner_nps_category"] == "passive"  # "8"
    assert found["track"]["properties"]["refiner_nps_category"] == "passive"
    assert "refiner_nps_category" not in found["group"]["traits"]
    on_account = replace(rules, account_questions=frozenset({NPS}))
    found = messages(webhook(**{NPS: "10"}), on_account)
    assert found["group"]["traits"]["refiner_nps_category"] == "promoter"
    assert "refiner_nps_category" not in found["identify"]["traits"]


def test_nps_category_is_left_out_when_the_answer_is_not_a_whole_number_from_0_to_10(tmp_path):
    rules = mapping_file(tmp_path, f'[nps]\nquestion = "{NPS}"\n')
    for answer in ("n/a", "12", None):
        found = messages(webhook(**{NPS: answer}), rules)
        assert "refiner_nps_category" not in found["identify"]["traits"]
        assert "refiner_nps_category" not in found["track"]["properties"]


# --- [events] per_answer -------------------------------------------------------------------------


def test_per_answer_event_is_off_by_default():
    assert [m["type"] for m in map_event(WebhookSchema().load(webhook()), MappingRules(), NOW)] == ["identify", "group", "track"]


def test_per_answer_event_sends_one_track_per_answer_besides_the_usual_calls(tmp_path):
    rules = mapping_file(tmp_path, f'[types]\n"{NPS}" = "number"\n[events]\nper_answer = "Survey Question Answered"\n')
    body = webhook(skipped=None)
    sent = map_event(WebhookSchema().load(body), rules, NOW)
    assert [m["type"] for m in sent[:3]] == ["identify", "group", "track"] and sent[2]["event"] == "Survey Completed"
    per_answer = sent[3:]
    assert [m["event"] for m in per_answer] == ["Survey Question Answered"] * 3  # the null answer has none
    nps = next(m for m in per_answer if m["properties"]["question"] == NPS)
    assert nps["properties"] == {
        "question": NPS,
        "trait": "refiner_how_likely_are_you_to_recommend_us",
        "answer": 8,
        "survey_id": "0d94c790-401c-11ef-bb27-e31f68320006",
        "survey_name": "Onboarding check-in",
        "response_id": "a3e1c2f0-a5d1-11ef-b050-03a44b320007",
    }
    assert nps["userId"] == "user-8812" and nps["integrations"] == {"Refiner": False} and nps["timestamp"] == sent[2]["timestamp"]
    assert prepare(WebhookSchema().load(body), rules).message_count == 6  # what the webhook answers as "messages"


def test_per_answer_message_ids_are_stable_across_resend_and_backfill(tmp_path):
    rules = mapping_file(tmp_path, '[events]\nper_answer = "Survey Question Answered"\n')
    first = map_event(WebhookSchema().load(webhook()), rules, NOW)
    resent = map_event(WebhookSchema().load(webhook()), rules, datetime(2031, 1, 1, tzinfo=UTC))
    item = load_fixture("api_responses_page.json")["items"][0]
    backfilled = map_event(ApiResponseSchema().load(item), rules, NOW)

    def ids(sent):
        return {m.get("properties", {}).get("question", m["type"]): m["messageId"] for m in sent}

    assert ids(first) == ids(resent)
    per_answer = {q: i for q, i in ids(first).items() if q not in ("identify", "group", "track")}
    assert len(set(per_answer.values())) == len(per_answer) == 3  # one id per question
    from_api = {q: i for q, i in ids(backfilled).items() if q in per_answer}
    assert from_api and from_api == {q: per_answer[q] for q in from_api}
    assert all(len(i) <= 100 for i in per_answer.values())


def test_per_answer_event_is_only_for_completed_surveys(tmp_path):
    rules = mapping_file(tmp_path, '[events]\nper_answer = "Survey Question Answered"\n')
    body = webhook()
    body["triggered_event"] = "Saw Survey"
    assert [m["event"] for m in map_event(WebhookSchema().load(body), rules, NOW)] == ["Survey Viewed"]


def test_per_answer_must_be_an_event_name_or_false(tmp_path):
    assert mapping_file(tmp_path, "[events]\nper_answer = false\n").per_answer_event is None
    with pytest.raises(ConfigError, match="per_answer must be an event name"):
        mapping_file(tmp_path, "[events]\nper_answer = 3\n")


# --- end to end: the real service, a mapping file, the Segment stand-in --------------------------------------


def test_e2e_typed_answers_and_one_event_per_answer_reach_segment(tmp_path, store_url, segment):
    import requests

    from tests.conftest import SECRET
    from tests.service import Service, free_port

    mapping = tmp_path / "mapping.toml"
    mapping.write_text(f'[types]\n"{NPS}" = "number"\n[nps]\nquestion = "{NPS}"\n[events]\nper_answer = "Survey Question Answered"\n')
    env = {
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "1",
        "DATABASE_URL": store_url,
        "SEGMENT_WRITE_KEY": "wk-answers",
        "REFINER_WEBHOOK_SECRET": SECRET,
        "SEGMENT_HOST": segment.url,
        "REFINER_MAPPING_FILE": str(mapping),
    }
    service = Service(["serve"], env, tmp_path / "serve.log").start()
    try:
        answer = requests.post(f"{service.url}/webhooks/refiner?token={SECRET}", json=webhook(), timeout=10)
        assert answer.status_code == 202 and answer.json()["messages"] == 6, answer.text
        received = segment.wait_for(lambda r: len(r) >= 6, timeout=30)
        track = next(m for m in received if m.get("event") == "Survey Completed")
        assert track["properties"]["refiner_how_likely_are_you_to_recommend_us"] == 8  # a number, not "8"
        assert track["properties"]["refiner_nps_category"] == "passive"
        per_answer = [m for m in received if m.get("event") == "Survey Question Answered"]
        assert sorted(m["properties"]["question"] for m in per_answer) == sorted(["what_is_your_job_role", "employee_count", NPS])
        assert next(m for m in per_answer if m["properties"]["question"] == NPS)["properties"]["answer"] == 8
        again = requests.post(f"{service.url}/webhooks/refiner?token={SECRET}", json=webhook(), timeout=10)
        assert again.json()["status"] == "duplicate"
    finally:
        assert service.stop() == 0


def test_the_docs_example_of_typed_answers_holds(tmp_path):
    import hashlib
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "mapping.md").read_text()
    section = text[text.index("### Typed answers, NPS and one event per answer") :]
    example = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    rules = mapping_file(tmp_path, example)
    sent = map_event(WebhookSchema().load(webhook()), rules, NOW)
    track = next(m for m in sent if m.get("event") == "Survey Completed")
    assert (
        '"refiner_how_likely_are_you_to_recommend_us": 8' in section
        and track["properties"]["refiner_how_likely_are_you_to_recommend_us"] == 8
    )
    assert '"refiner_nps_category": "passive"' in section and track["properties"]["refiner_nps_category"] == "passive"
    per_answer = [m for m in sent if m.get("event") == "Survey Question Answered"]
    assert "three *Survey Question Answered* tracks" in section and len(per_answer) == 3
    nps = next(m for m in per_answer if m["properties"]["question"] == NPS)
    digest = hashlib.sha1(NPS.encode()).hexdigest()[:8]
    assert nps["messageId"] == f"refiner-a3e1c2f0-a5d1-11ef-b050-03a44b320007-completed-survey-answer-{digest}"


def test_the_readmes_typed_answers_example_is_a_valid_mapping_file_that_types_and_adds(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    (example,) = [block for block in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[types]" in block]
    rules = mapping_file(tmp_path, example)
    sent = map_event(WebhookSchema().load(webhook()), rules, NOW)
    track = next(m for m in sent if m.get("event") == "Survey Completed")
    assert (
        track["properties"]["refiner_how_likely_are_you_to_recommend_us"] == 8 and track["properties"]["refiner_nps_category"] == "passive"
    )
    assert [m.get("event") for m in sent].count("Survey Question Answered") == 3


def test_a_number_too_long_for_python_is_no_number_and_costs_nothing_else(caplog):
    rules = replace(MappingRules(), types={NPS: "number"}, nps_question=NPS)
    huge = "1" * 5000  # over Python's 4,300-digit limit for int()
    found = messages(webhook(**{NPS: huge}), rules)
    assert found["track"]["properties"]["refiner_how_likely_are_you_to_recommend_us"] == huge  # sent as it came
    assert "refiner_nps_category" not in found["track"]["properties"]
    assert nps_category(huge) is None


def test_per_answer_message_ids_stay_within_100_characters_with_a_long_response_uuid_and_new_ids(tmp_path):
    rules = mapping_file(tmp_path, '[events]\nper_answer = "Survey Question Answered"\n')
    body = webhook()
    body["response"]["uuid"] = "u" * 200
    first = map_event(WebhookSchema().load(body), rules, NOW, generation="r1700000000000")
    again = map_event(WebhookSchema().load(body), rules, NOW, generation="r1700000000000")
    ids = [m["messageId"] for m in first]
    assert all(len(i) <= 100 for i in ids) and len(set(ids)) == len(ids) == 6
    assert ids == [m["messageId"] for m in again]


def test_e2e_refiner_mapping_with_a_trait_name_reaches_segment_and_both_variables_are_refused(tmp_path, store_url, segment):
    import requests

    from tests.conftest import SECRET
    from tests.run.test_cli import run
    from tests.service import Service, free_port

    env = {
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "1",
        "DATABASE_URL": store_url,
        "SEGMENT_WRITE_KEY": "wk-mapping",
        "REFINER_WEBHOOK_SECRET": SECRET,
        "SEGMENT_HOST": segment.url,
        "REFINER_MAPPING": '[traits]\n"what_is_your_job_role" = "job_role"\n',
    }
    service = Service(["serve"], env, tmp_path / "serve.log").start()
    try:
        assert requests.post(f"{service.url}/webhooks/refiner?token={SECRET}", json=webhook(), timeout=10).status_code == 202
        received = segment.wait_for(lambda r: len(r) >= 3, timeout=30)
        identify = next(m for m in received if m["type"] == "identify")
        assert identify["traits"]["job_role"] == "Product Manager" and "refiner_what_is_your_job_role" not in identify["traits"]
    finally:
        assert service.stop() == 0
    mapping = tmp_path / "mapping.toml"
    mapping.write_text("")
    refused = run(["serve"], {**env, "REFINER_MAPPING_FILE": str(mapping)})
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "Error: REFINER_MAPPING and REFINER_MAPPING_FILE are both set: keep one (the TOML itself, or a file holding it)"
    ]
