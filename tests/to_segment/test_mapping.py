"""docs/mapping.md, rule by rule: the pure mapping from a Refiner event to Segment messages."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refiner_source.directions.mapping_file import MappingRules
from refiner_source.to_segment.events import WebhookSchema
from refiner_source.to_segment.mapping import (
    OMITTED,
    MessageTooLarge,
    _make_room,
    _truncate,
    calls,
    map_event,
    message_id,
    reserved_names,
    split_answers,
    trait_names,
)
from tests import expected

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
RULES = MappingRules()


def mapped(body: dict, rules: MappingRules = RULES) -> list[dict]:
    return map_event(WebhookSchema().load(body), rules, NOW)


def by_type(messages: list[dict]) -> dict[str, dict]:
    return {m["type"]: m for m in messages}


def minimal(**overrides) -> dict:
    body = {
        "uuid": "contact-1",
        "remote_id": "user-1",
        "triggered_event": "Completed Survey",
        "form": {"uuid": "form-1", "name": "NPS"},
        "response": {"uuid": "resp-1", "completed_at": "2026-11-18T16:42:57.000000Z", "data": {}},
    }
    body.update(overrides)
    return body


# --- the fixture, as a whole -------------------------------------------------------------


def test_fixture_maps_to_identify_group_track_exactly(webhook_body):
    identify, group, track = mapped(webhook_body)
    assert identify["type"] == "identify" and group["type"] == "group" and track["type"] == "track"
    assert identify["userId"] == "user-8812"
    assert identify["traits"] == expected.IDENTIFY_TRAITS
    assert group["groupId"] == "acct-initech"
    assert group["traits"] == expected.GROUP_TRAITS
    assert track["event"] == "Survey Completed"
    assert track["properties"] == expected.TRACK_PROPERTIES


# --- identity ------------------------------------------------------------------------------


def test_identity_user_id_is_remote_id(webhook_body):
    assert {m["userId"] for m in mapped(webhook_body)} == {"user-8812"}


def test_identity_numeric_remote_id_becomes_string():
    (identify, track) = mapped(minimal(remote_id=8812))
    assert identify["userId"] == "8812" and track["userId"] == "8812"


def test_identity_without_remote_id_uses_anonymous_id_contact_uuid():
    messages = mapped(minimal(remote_id=None, uuid="c-uuid-9"))
    assert all(m["anonymousId"] == "c-uuid-9" and m.get("userId") is None for m in messages)


def test_identity_of_an_identified_contact_has_no_anonymous_id():
    assert all(m.get("anonymousId") is None and m["userId"] == "user-1" for m in mapped(minimal(uuid="c-uuid-9")))


# --- trait names ---------------------------------------------------------------------------


# Mutation testing (bench/mutation.py) leaves alive, in trait_names, a key that is no slug ranked 3
# instead of 2: it ranks after the other two kinds either way. And, in _short_hash and message_id,
# "utf-8" written "UTF-8": Python looks codec names up in any case.


def test_trait_name_is_prefix_plus_slug():
    assert trait_names(["What is your job role?"], RULES) == {"What is your job role?": "refiner_what_is_your_job_role"}


def test_trait_name_uses_refiner_trait_prefix():
    assert trait_names(["Plan"], MappingRules(prefix="survey__")) == {"Plan": "survey__plan"}


def test_trait_name_from_mapping_file_is_verbatim():
    rules = MappingRules(traits={"What is your job role?": "Job Role"})
    (identify, track) = mapped(minimal(response={"uuid": "r", "data": {"What is your job role?": "PM"}}), rules)
    assert identify["traits"] == {"Job Role": "PM"} and track["properties"]["Job Role"] == "PM"


def test_trait_names_are_deterministic_whatever_the_key_order():
    keys = ["Job role", "job_role", "JOB ROLE", "Team size", "😀"]
    assert trait_names(keys, RULES) == trait_names(list(reversed(keys)), RULES)


def test_trait_names_colliding_keys_both_keep_their_answers_under_distinct_names():
    data = {"Job role": "PM", "job_role": "Engineer", "JOB ROLE?": "CEO"}
    (identify, _track) = mapped(minimal(response={"uuid": "r", "data": data}))
    traits = identify["traits"]
    assert sorted(traits.values()) == ["CEO", "Engineer", "PM"]
    assert len(set(traits)) == 3
    assert traits["refiner_job_role"] == "Engineer"  # the key that already is its own slug keeps the plain name


def test_trait_names_colliding_key_gets_the_same_suffixed_name_whenever_it_collides():
    alone = trait_names(["Job role"], RULES)["Job role"]
    together = trait_names(["Job role", "job_role"], RULES)
    assert together["job_role"] == "refiner_job_role"
    assert together["Job role"] == trait_names(["Job role", "job_role", "other"], RULES)["Job role"]
    assert alone == "refiner_job_role"


def test_trait_name_of_key_with_empty_slug_is_stable_and_not_empty():
    first = trait_names(["😀", "???"], RULES)
    again = trait_names(["???", "😀", "x"], RULES)
    assert first["😀"] == again["😀"] and first["???"] == again["???"]
    assert first["😀"] != first["???"]
    assert all(name.startswith("refiner_") and len(name) > len("refiner_") for name in first.values())


def test_trait_name_of_unicode_question_text_is_transliterated():
    names = trait_names(["Ça va?", "日本語の質問"], RULES)
    assert names == {"Ça va?": "refiner_ca_va", "日本語の質問": "refiner_ri_ben_yu_nozhi_wen"}


def test_trait_name_of_exactly_100_characters_is_kept_and_a_longer_one_is_cut_to_100_with_a_hash():
    exact = "a" * (100 - len("refiner_"))
    assert trait_names([exact], RULES) == {exact: "refiner_" + exact}
    longer = exact + "b"
    (name,) = trait_names([longer], RULES).values()
    assert len(name) == 100 and name.startswith("refiner_" + "a" * 83) and name != "refiner_" + longer[:92]
    assert name == trait_names([longer, "other"], RULES)[longer]


def test_trait_name_cut_to_100_characters_drops_the_underscore_it_would_end_on():
    key = "a" * 82 + " " + "b" * 30  # its slug's cut falls just after the underscore between the words
    (name,) = trait_names([key], RULES).values()
    assert "__" not in name and name.startswith("refiner_" + "a" * 82 + "_") and len(name) == 99
    (name,) = trait_names(["b" * 20], MappingRules(prefix="P" * 90 + "X")).values()  # only underscores are dropped at the cut
    assert name.startswith("P" * 90 + "X_") and len(name) == 100


def test_trait_name_that_is_a_reserved_name_gets_the_suffix_of_its_own_key():
    names = trait_names(["Survey ID", "plan"], MappingRules(prefix=""), reserved={"survey_id"})
    assert names == {"plan": "plan", "Survey ID": "survey_id_" + hashlib.sha1(b"Survey ID").hexdigest()[:8]}


def test_trait_name_that_another_questions_suffix_would_take_stays_its_own():
    suffixed = trait_names(["Job role", "job_role"], RULES)["Job role"]  # refiner_job_role_<hash of "Job role">
    plain = suffixed.removeprefix("refiner_")  # a question whose own name is that suffixed name
    names = trait_names(["Job role", "job_role", plain], RULES)
    assert names[plain] == suffixed and names["job_role"] == "refiner_job_role"
    assert names["Job role"] == f"{suffixed}_{hashlib.sha1(suffixed.encode()).hexdigest()[:8]}"  # suffixed once more


def test_trait_names_stay_unique_when_two_keys_hashes_collide():
    a, b = "jObRolequesTioNAB", "jObRolEquEsTIonab"  # both slug to jobrolequestionab; sha1 starts 22d2ff36 for both
    names = trait_names([a, b, "jobrolequestionab"], RULES)
    assert names["jobrolequestionab"] == "refiner_jobrolequestionab"
    assert len(set(names.values())) == 3 and {names[a], names[b]} >= {"refiner_jobrolequestionab_22d2ff36"}


def test_trait_name_from_the_mapping_file_wins_over_a_key_that_is_its_own_slug():
    names = trait_names(["zz", "job_role"], MappingRules(traits={"zz": "refiner_job_role"}))
    assert names["zz"] == "refiner_job_role" and names["job_role"].startswith("refiner_job_role_")


def test_the_nps_category_name_is_reserved_only_when_an_nps_question_is_set():
    assert trait_names(["nps_category"], RULES, reserved=reserved_names(RULES)) == {"nps_category": "refiner_nps_category"}
    with_nps = MappingRules(nps_question="How likely?")
    assert trait_names(["nps_category"], with_nps, reserved=reserved_names(with_nps))["nps_category"].startswith("refiner_nps_category_")
    assert "refiner_nps_category" in reserved_names(with_nps) and "refiner_email" in reserved_names(RULES)


def test_trait_name_of_a_key_with_an_empty_slug_is_answer_and_its_hash():
    assert trait_names(["😀"], RULES) == {"😀": "refiner_answer_" + hashlib.sha1("😀".encode()).hexdigest()[:8]}


def test_a_key_or_response_id_with_a_lone_surrogate_is_named_and_hashed_not_refused():
    assert trait_names(["\udcff"], RULES) != trait_names(["\udcfe"], RULES)
    assert len(message_id("\udcff" * 100, "Completed Survey", "track")) <= 100
    assert message_id("\udcff" * 100, "Completed Survey", "track") != message_id("\udcfe" * 100, "Completed Survey", "track")


def test_trait_name_never_collides_with_email_trait():
    (identify, _track) = mapped(minimal(email="a@b.example", response={"uuid": "r", "data": {"email": "answer"}}))
    assert identify["traits"]["refiner_email"] == "a@b.example"
    assert "answer" in identify["traits"].values()


# --- values --------------------------------------------------------------------------------


def test_null_answers_are_left_out():
    (identify, track) = mapped(minimal(response={"uuid": "r", "data": {"a": None, "b": "x"}}))
    assert identify["traits"] == {"refiner_b": "x"}
    assert "refiner_a" not in track["properties"]


def test_answers_pass_through_unchanged():
    data = {"text": "8", "number": 8, "float": 2.5, "list": ["a", "b"], "object": {"x": [1, {"y": None}]}, "flag": True}
    (identify, _track) = mapped(minimal(response={"uuid": "r", "data": data}))
    assert identify["traits"] == {f"refiner_{k}": v for k, v in data.items()}


def test_split_answers_reads_the_events_own_answers_unless_given_others():
    event = WebhookSchema().load(minimal(response={"uuid": "r", "data": {"a": "1", "b": None}}))
    assert split_answers(event, RULES) == ({"a": "1"}, {})
    assert split_answers(event, RULES, {"a": 1}) == ({"a": 1}, {})


# --- user or account -----------------------------------------------------------------------


def _with_account(data, contact_attrs=None, account_attrs=None, remote_id="acct-1"):
    return minimal(
        attributes=contact_attrs or {},
        account={"uuid": "a-uuid", "remote_id": remote_id, "attributes": account_attrs or {}},
        response={"uuid": "r", "data": data},
    )


def test_account_answer_when_listed_in_account_questions():
    rules = MappingRules(account_questions=frozenset({"seats"}))
    messages = by_type(mapped(_with_account({"seats": "12", "role": "PM"}), rules))
    assert messages["group"]["traits"] == {"refiner_seats": "12"}
    assert messages["identify"]["traits"] == {"refiner_role": "PM"}


def test_account_answer_when_set_in_account_attributes_and_not_in_contact_attributes():
    body = _with_account({"size": "50", "role": "PM"}, contact_attrs={"role": "PM"}, account_attrs={"size": "50"})
    messages = by_type(mapped(body))
    assert messages["group"]["traits"] == {"refiner_size": "50"}
    assert messages["identify"]["traits"] == {"refiner_role": "PM"}


def test_answer_set_in_both_attributes_belongs_to_the_user():
    body = _with_account({"role": "PM"}, contact_attrs={"role": "PM"}, account_attrs={"role": "PM"})
    messages = by_type(mapped(body))
    assert messages["identify"]["traits"] == {"refiner_role": "PM"}


def test_every_other_answer_belongs_to_the_user():
    messages = by_type(mapped(_with_account({"free": "text"})))
    assert messages["identify"]["traits"] == {"refiner_free": "text"}
    assert messages["group"]["traits"] == {}


# --- Completed Survey ----------------------------------------------------------------------


def test_completed_survey_sends_identify_then_group_then_track(webhook_body):
    assert [m["type"] for m in mapped(webhook_body)] == ["identify", "group", "track"]


def test_identify_traits_are_user_answers_plus_prefixed_email(webhook_body):
    traits = by_type(mapped(webhook_body))["identify"]["traits"]
    assert traits["refiner_email"] == "ada@initech.example"
    assert "refiner_employee_count" not in traits


def test_identify_has_no_email_trait_without_email():
    (identify, _track) = mapped(minimal(email=None, response={"uuid": "r", "data": {"a": 1}}))
    assert identify["traits"] == {"refiner_a": 1}


def test_group_only_when_account_remote_id_is_set():
    assert [m["type"] for m in mapped(_with_account({"a": 1}, remote_id=None))] == ["identify", "track"]
    assert [m["type"] for m in mapped(minimal())] == ["identify", "track"]


def test_group_traits_are_non_null_account_attributes_and_account_answers(webhook_body):
    group = by_type(mapped(webhook_body))["group"]
    assert group["groupId"] == "acct-initech"
    assert "refiner_revenue" not in group["traits"]  # null attribute
    assert group["traits"]["refiner_plan"] == "enterprise"
    assert group["traits"]["refiner_employee_count"] == "250-1000"


def test_group_numeric_account_remote_id_becomes_string():
    group = by_type(mapped(_with_account({}, remote_id=42)))["group"]
    assert group["groupId"] == "42"


def test_track_survey_completed_has_survey_properties_and_every_answer(webhook_body):
    webhook_body["response"]["tags"] = ["beta", {"name": "vip"}]
    track = by_type(mapped(webhook_body))["track"]
    props = track["properties"]
    assert track["event"] == "Survey Completed"
    assert props["survey_id"] == webhook_body["form"]["uuid"]
    assert props["survey_name"] == "Onboarding check-in"
    assert props["response_id"] == webhook_body["response"]["uuid"]
    assert props["completed_at"] == "2026-11-18T16:42:57+00:00"
    assert props["tags"] == ["beta", {"name": "vip"}]
    assert {"refiner_what_is_your_job_role", "refiner_employee_count", "refiner_how_likely_are_you_to_recommend_us"} <= set(props)


# --- other events --------------------------------------------------------------------------


def test_saw_survey_is_a_lone_track_survey_viewed(webhook_body):
    webhook_body["triggered_event"] = "Saw Survey"
    (track,) = mapped(webhook_body)
    assert track["type"] == "track" and track["event"] == "Survey Viewed"
    assert track["properties"] == {
        "survey_id": webhook_body["form"]["uuid"],
        "survey_name": "Onboarding check-in",
        "response_id": webhook_body["response"]["uuid"],
    }


def test_dismissed_survey_is_a_lone_track_survey_dismissed(webhook_body):
    webhook_body["triggered_event"] = "Dismissed Survey"
    webhook_body["response"]["completed_at"] = None
    webhook_body["response"]["dismissed_at"] = "2026-11-18T16:50:00Z"
    (track,) = mapped(webhook_body)
    assert track["event"] == "Survey Dismissed" and track["timestamp"].startswith("2026-11-18T16:50:00")
    assert set(track["properties"]) == {"survey_id", "survey_name", "response_id"}


@pytest.mark.parametrize("event", ["Created Contact", "Completed Survey ", "survey completed", "Updated Attributes"])
def test_any_other_event_is_not_forwarded(webhook_body, event):
    webhook_body["triggered_event"] = event
    assert mapped(webhook_body) == []


def test_mapping_file_renames_an_event(webhook_body):
    rules = MappingRules(events={"Completed Survey": "NPS Answered", "Saw Survey": "Survey Viewed", "Dismissed Survey": "Survey Dismissed"})
    assert by_type(mapped(webhook_body, rules))["track"]["event"] == "NPS Answered"


def test_mapping_file_turns_an_event_off(webhook_body):
    rules = MappingRules(events={"Completed Survey": None, "Saw Survey": "Survey Viewed", "Dismissed Survey": "Survey Dismissed"})
    assert mapped(webhook_body, rules) == []


# --- every message -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "times, expected",
    [
        (
            {"completed_at": "2026-01-01T00:00:01Z", "dismissed_at": "2026-01-01T00:00:02Z", "received_at": "2026-01-01T00:00:03Z"},
            "2026-01-01T00:00:01",
        ),
        ({"completed_at": None, "dismissed_at": "2026-01-01T00:00:02Z", "received_at": "2026-01-01T00:00:03Z"}, "2026-01-01T00:00:02"),
        ({"completed_at": None, "dismissed_at": None, "received_at": "2026-01-01T00:00:03Z"}, "2026-01-01T00:00:03"),
        ({"completed_at": None, "dismissed_at": None, "received_at": None}, "2030-01-02T03:04:05"),
    ],
)
def test_timestamp_is_completed_at_then_dismissed_at_then_received_at_then_now(times, expected):
    messages = mapped(minimal(response={"uuid": "r", "data": {"a": 1}, **times}))
    assert {m["timestamp"][:19] for m in messages} == {expected}


def test_api_style_timestamps_are_utc():
    (identify, _track) = mapped(minimal(response={"uuid": "r", "completed_at": "2026-11-18 16:42:57", "data": {}}))
    assert identify["timestamp"] == "2026-11-18T16:42:57.000+00:00"


def test_message_id_is_identical_on_every_resend(webhook_body):
    first = [m["messageId"] for m in mapped(webhook_body)]
    again = [m["messageId"] for m in map_event(WebhookSchema().load(webhook_body), RULES, datetime(2040, 1, 1, tzinfo=UTC))]
    assert first == again and len(set(first)) == 3


def test_message_id_differs_per_call_and_per_event(webhook_body):
    completed = {m["messageId"] for m in mapped(webhook_body)}
    webhook_body["triggered_event"] = "Saw Survey"
    viewed = {m["messageId"] for m in mapped(webhook_body)}
    assert not completed & viewed


def test_message_id_is_at_most_100_characters():
    long_uuid = "u" * 255
    ids = [message_id(long_uuid, "Completed Survey", call) for call in ("identify", "group", "track")]
    assert all(len(i) <= 100 for i in ids) and len(set(ids)) == 3
    assert ids == [message_id(long_uuid, "Completed Survey", call) for call in ("identify", "group", "track")]


def test_message_id_of_exactly_100_characters_is_kept_whole_and_a_longer_one_is_a_digest_within_100():
    uuid = "u" * (100 - len("refiner--completed-survey-track"))
    assert message_id(uuid, "Completed Survey", "track") == f"refiner-{uuid}-completed-survey-track"
    digest = hashlib.sha256(f"{uuid}u\x00Completed Survey".encode()).hexdigest()
    assert message_id(uuid + "u", "Completed Survey", "track") == f"refiner-{digest}-track"
    # The longest tail (a per-answer call of a replay generation) leaves the digest 61 characters.
    longest = message_id(uuid + "u", "Completed Survey", "answer-0123abcd", "r1700000000000")
    assert longest == f"refiner-{digest[:61]}-answer-0123abcd-r1700000000000" and len(longest) == 100


def test_message_id_of_a_lone_track_is_the_deterministic_one(webhook_body):
    webhook_body["triggered_event"] = "Saw Survey"
    (track,) = mapped(webhook_body)
    assert track["messageId"] == message_id(webhook_body["response"]["uuid"], "Saw Survey", "track")


def test_every_message_has_integrations_refiner_false(webhook_body):
    assert all(m["integrations"] == {"Refiner": False} for m in mapped(webhook_body))


def test_messages_are_built_by_segment_analytics_python(webhook_body):
    for message in mapped(webhook_body):
        assert message["context"]["library"]["name"] == "analytics-python"
        assert message["timestamp"].endswith("+00:00")


# Mutation testing (bench/mutation.py) leaves alive these changes to map_event and _build, none of
# which can change a message:
# - typed_answers called with no [types] (`if rules.types` made always true): it returns a copy;
# - nps_category asked of `answers.get(None)` with no [nps] question: no answer's key is None, so
#   the category is None as before;
# - the "answer" left out of the ids computed up front, spelt otherwise: an id computed for no
#   message is never used (the per-answer ids are made per question);
# - `_build`'s margin, what the library adds to our fields (some 300 bytes), an estimate: 1,024 made
#   1,025 cuts one byte more of a text cut anyway; the least room asked (64 bytes, made 65) and how
#   the margin grows after a pass (doubled, made tripled, halved or 2) matter only when a first cut
#   falls short, which the over-estimate prevents (test_a_message_over_32kb_is_cut_in_one_pass),
#   and when answers are replaced or left out, one per pass whatever the margin.


def test_message_over_32kb_is_shortened_not_dropped(caplog):
    data = {"essay": "x" * 40_000, "short": "kept", "other": "é" * 9_000}
    with caplog.at_level(logging.WARNING):
        messages = mapped(minimal(response={"uuid": "r", "data": data}))
    assert [m["type"] for m in messages] == ["identify", "track"]
    for message in messages:
        body = message.get("traits") or message["properties"]
        assert len(json.dumps(message).encode()) <= 32 * 1024
        assert body["refiner_short"] == "kept"
        assert body["refiner_essay"].endswith("…") and body["refiner_essay"].startswith("xxxx")
        assert len(body["refiner_essay"]) > 1000  # shortened, not emptied
    assert "shortened" in caplog.text
    assert "xxxxxxxx" not in caplog.text  # the answer itself is not logged


def test_text_inside_list_and_object_answers_is_shortened_in_place():
    data = {"essay": {"title": "kept", "body": "x" * 40_000}, "choices": ["y" * 30_000, "kept"]}
    (identify, track) = mapped(minimal(response={"uuid": "r", "data": data}))
    for message in (identify, track):
        body = message.get("traits") or message["properties"]
        assert len(json.dumps(message).encode()) <= 32 * 1024
        assert body["refiner_essay"]["title"] == "kept" and body["refiner_essay"]["body"].startswith("xxxx")
        assert body["refiner_essay"]["body"].endswith("…")
        assert body["refiner_choices"][1] == "kept" and body["refiner_choices"][0].endswith("…")


def test_message_over_32kb_without_text_to_cut_has_its_largest_answer_replaced_by_a_marker():
    data = {"numbers": list(range(6_000)), "more": list(range(5_000)), "short": "kept"}
    (identify, track) = mapped(minimal(response={"uuid": "r", "data": data}))
    for message in (identify, track):
        body = message.get("traits") or message["properties"]
        assert len(json.dumps(message).encode()) <= 32 * 1024
        assert body["refiner_numbers"] == OMITTED and body["refiner_more"] == list(range(5_000)) and body["refiner_short"] == "kept"


def test_the_largest_answer_is_the_one_replaced_whatever_its_name_or_place():
    shortened, cut = _make_room({"small": list(range(5_000)), "big": list(range(6_000))}, 1_000)
    assert cut == {"big"} and shortened == {"small": list(range(5_000)), "big": OMITTED}


def test_message_over_32kb_of_names_alone_loses_the_answer_with_the_longest_name():
    rules = MappingRules(traits={"a": "a" * 20_000, "b": "b" * 15_000, "c": "c" * 100})
    (identify, track) = mapped(minimal(response={"uuid": "r", "data": {"a": 1, "b": 2, "c": 3}}), rules)
    assert identify["traits"] == {"b" * 15_000: 2, "c" * 100: 3}
    assert {"b" * 15_000, "c" * 100, "survey_id", "response_id"} <= set(track["properties"]) and "a" * 20_000 not in track["properties"]


def test_message_that_cannot_fit_even_with_nothing_left_to_cut_raises_message_too_large():
    rules = MappingRules(events={"Saw Survey": "x" * 40_000})
    with pytest.raises(MessageTooLarge, match="over 32 KB"):
        mapped(minimal(triggered_event="Saw Survey"), rules)


def test_another_error_of_the_segment_library_is_raised_as_it_is(monkeypatch):
    from refiner_source.to_segment import mapping

    class Failing:
        def identify(self, **fields):
            raise RuntimeError("the library failed otherwise")

    monkeypatch.setattr(mapping, "_builder", Failing)
    with pytest.raises(RuntimeError, match="failed otherwise"):
        mapped(minimal(response={"uuid": "r", "data": {"a": "x" * 100}}))


def test_text_that_can_save_exactly_the_excess_is_shortened_not_omitted():
    values = {"a": "x" * 116}  # 118 bytes of JSON, of which all but the 16 a shortened text keeps can go
    shortened, cut = _make_room(values, 118 - 16)
    assert cut == {"a"} and shortened["a"] != OMITTED and shortened["a"].endswith("…")


def test_text_that_cannot_save_the_excess_is_omitted_and_a_short_text_saves_nothing():
    shortened, cut = _make_room({"a": "x" * 116, "b": "y"}, 118 - 16 + 1)
    assert (shortened, cut) == ({"a": OMITTED, "b": "y"}, {"a"})


def test_a_value_no_larger_than_the_marker_is_removed_not_replaced():
    same_size = "a" * (len(json.dumps(OMITTED)) - 2)
    assert _make_room({"q": same_size}, 1_000) == ({}, {"q"})
    assert _make_room({"q": 1, "longer": 2}, 1_000) == ({"q": 1}, {"longer"})


# Mutation testing (bench/mutation.py) leaves alive three changes to _shorten_longest that cannot
# change what it cuts:
# - the next length after the last text, 0 made 1: a candidate under 1 is a level under
#   MIN_TEXT_BYTES, which the level is raised to either way;
# - `(total - excess) // n` made `/`: lengths are whole bytes, so a fractional level compares with
#   every length, and cuts every text, as its floor does;
# - `candidate >= nxt` made `>`: when the common length equals the next text's, taking that text in
#   too gives the same length again (its share adds exactly that length), so the same texts are cut
#   to the same length.
def test_the_longest_texts_are_cut_to_one_common_length_that_saves_the_excess():
    values = {"a": "x" * 1_000, "b": "y" * 800, "c": "z" * 98}  # 1,002, 802 and 100 bytes of JSON
    shortened, cut = _make_room(values, 600)
    assert cut == {"a", "b"} and shortened["c"] == values["c"]
    assert len(json.dumps(shortened["a"])) == len(json.dumps(shortened["b"])) == 602  # (1,002 + 802 - 600) / 2
    shortened, cut = _make_room(values, 200)  # saved by the longest alone, cut to the next one's length: that one stays whole
    assert cut == {"a"} and len(json.dumps(shortened["a"])) == 802 and shortened["b"] == values["b"] and shortened["c"] == values["c"]


def test_equal_texts_in_different_object_answers_are_cut_alike():
    shortened, cut = _make_room({"a": {"t": "x" * 500}, "b": {"t": "y" * 500}}, 400)
    assert cut == {"a", "b"} and len(json.dumps(shortened["a"]["t"])) == len(json.dumps(shortened["b"]["t"])) == 302


# Mutation testing (bench/mutation.py) leaves alive, in _truncate, the search starting one length
# further past the text's end: a slice past the end is the whole text, so it finds the same prefix.
@pytest.mark.parametrize(
    "text, max_bytes, expected",
    [
        ("x" * 1_000, 100, "x" * 92 + "…"),  # 92 + 6 for the ellipsis + 2 quotes
        ("x" * 50, 57, "x" * 49 + "…"),  # one byte over: one character fewer
        ("é" * 1_000, 100, "é" * 15 + "…"),  # each é is \u00e9 in JSON: 6 bytes
        ("é" * 10, 10, "…"),  # not even one character fits
        ("é" + "x" * 20, 13, "…"),  # nor the first, once the cut comes down to it
        ("x" * 50 + "é" * 50, 100, "x" * 50 + "é" * 7 + "…"),  # narrow characters, then wide ones: as many of each as fit
    ],
)
def test_a_text_is_cut_to_the_longest_prefix_whose_json_with_an_ellipsis_fits(text, max_bytes, expected):
    assert _truncate(text, max_bytes) == expected and len(json.dumps(expected)) <= max_bytes


def test_shortening_warns_in_the_docs_words_naming_response_call_and_every_trait_left_out(caplog):
    rules = MappingRules(traits={"a": "a" * 17_000, "b": "b" * 16_500, "c": "c" * 16_000})
    with caplog.at_level(logging.WARNING):
        (identify, _track) = mapped(minimal(response={"uuid": "r-9", "data": {"a": 1, "b": 2, "c": 3}}), rules)
    assert identify["traits"] == {"c" * 16_000: 3}  # two rounds: the longest name, then the next
    (warning, *_) = [r for r in caplog.records if r.getMessage() == "shortened values to fit Segment's 32 KB message limit"]
    assert (warning.response_id, warning.call, warning.fields) == ("r-9", "identify", ["a" * 17_000, "b" * 16_500])


def test_a_group_and_a_per_answer_track_over_32kb_are_shortened_too(caplog):
    body = minimal(
        account={"remote_id": "acct-1", "attributes": {"notes": "n" * 40_000}}, response={"uuid": "r-7", "data": {"essay": "x" * 40_000}}
    )
    rules = MappingRules(per_answer_event="Survey Question Answered")
    with caplog.at_level(logging.WARNING):
        messages = mapped(body, rules)
    assert [m["type"] for m in messages] == ["identify", "group", "track", "track"]
    assert all(len(json.dumps(m).encode()) <= 32 * 1024 for m in messages)
    assert messages[1]["traits"]["refiner_notes"].endswith("…") and messages[3]["properties"]["answer"].endswith("…")
    shortened = [(r.response_id, r.call) for r in caplog.records if r.getMessage().startswith("shortened")]
    assert shortened == [("r-7", "identify"), ("r-7", "group"), ("r-7", "track"), ("r-7", "track")]


def test_a_message_over_32kb_is_cut_in_one_pass(monkeypatch):
    from refiner_source.to_segment import mapping

    real = mapping._builder()
    tries: list[str] = []

    class Counting:
        def identify(self, **fields):
            tries.append("identify")
            return real.identify(**fields)

        def track(self, **fields):
            tries.append("track")
            return real.track(**fields)

    monkeypatch.setattr(mapping, "_builder", Counting)
    mapped(minimal(response={"uuid": "r", "data": {"essay": "x" * 40_000}}))
    assert tries == ["identify", "identify", "track", "track"]  # too large, then cut once to fit


def test_per_answer_calls_are_one_per_non_null_answer_in_order_whatever_comes_first():
    rules = MappingRules(per_answer_event="Survey Question Answered")
    body = minimal(response={"uuid": "r", "data": {"skipped": None, "a": "1", "b": "2"}})
    assert calls(WebhookSchema().load(body), rules) == ("identify", "track", "answer", "answer")
    assert [m["properties"]["question"] for m in mapped(body, rules)[2:]] == ["a", "b"]


def test_per_answer_message_ids_are_new_with_a_replay_generation():
    rules = MappingRules(per_answer_event="Survey Question Answered")
    event = WebhookSchema().load(minimal(response={"uuid": "r", "data": {"a": "1"}}))
    first = [m["messageId"] for m in map_event(event, rules, NOW)]
    replayed = [m["messageId"] for m in map_event(event, rules, NOW, generation="r1700000000000")]
    assert not set(first) & set(replayed) and all(i.endswith("-r1700000000000") for i in replayed)


def test_a_backfilled_response_with_completed_survey_turned_off_makes_no_message():
    from refiner_source.to_segment.intake import map_api_page
    from tests.conftest import load_fixture

    rules = MappingRules(events={"Completed Survey": None, "Saw Survey": "Survey Viewed", "Dismissed Survey": "Survey Dismissed"})
    page = map_api_page(load_fixture("api_responses_page.json")["items"], rules)
    assert page.entries and all(entry.message_count == 0 for entry in page.entries)
    assert calls(WebhookSchema().load(minimal()), rules) == ()


def test_mapping_is_pure(webhook_body):
    event = WebhookSchema().load(webhook_body)
    assert map_event(event, RULES, NOW) == map_event(event, RULES, NOW)
    assert WebhookSchema().load(webhook_body) == event  # the input is not modified


# --- properties ----------------------------------------------------------------------------

answers = st.dictionaries(
    st.text(max_size=40),
    st.one_of(st.none(), st.text(max_size=3000), st.integers(), st.lists(st.text(max_size=50), max_size=5)),
    max_size=30,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    data=answers,
    account_attrs=st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=5),
    prefix=st.sampled_from(["refiner_", "r.", ""]),
)
def test_property_trait_names_are_nonempty_prefixed_unique_and_messages_fit(data, account_attrs, prefix):
    body = minimal(account={"remote_id": "a", "attributes": account_attrs}, response={"uuid": "r", "completed_at": None, "data": data})
    rules = MappingRules(prefix=prefix)
    messages = mapped(body, rules)
    names = trait_names([*data, *account_attrs], rules)
    assert len(set(names.values())) == len(names)
    assert all(name.startswith(prefix) and name != prefix for name in names.values())
    assert all(len(json.dumps(m).encode()) <= 32 * 1024 for m in messages)
    non_null = {k for k, v in data.items() if v is not None}
    track = by_type(messages)["track"]
    assert len(track["properties"]) == 5 + len(non_null)  # survey_id, survey_name, response_id, completed_at, tags
