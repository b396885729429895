"""docs/mapping.md's Segment to Refiner, rule by rule: the pure mapping from one Segment event to Refiner REST calls."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from refiner_source.directions.mapping_file import MappingRules, ToRefinerRules
from refiner_source.to_refiner import events as segment_events
from refiner_source.to_refiner.mapping import (
    IDENTIFY_USER,
    TRACK_EVENT,
    RefinerCall,
    audience_key,
    contact_key,
    email_of,
    flatten,
    ignored_reason,
    merge,
    mergeable,
    to_refiner,
)
from refiner_source.to_segment.events import WebhookSchema
from refiner_source.to_segment.mapping import map_event
from tests.conftest import survey_body

RULES = MappingRules()


def rules(track_events=None, page_event="pageview") -> MappingRules:
    return MappingRules(to_refiner=ToRefinerRules(None if track_events is None else frozenset(track_events), page_event))


def identify(**overrides) -> dict:
    return {"type": "identify", "messageId": "m-1", "userId": "u-1", **overrides}


def track(name: str = "Signed Up", **overrides) -> dict:
    return {"type": "track", "messageId": "m-2", "userId": "u-1", "event": name, "properties": {"plan": "pro"}, **overrides}


def audience(name: str, key: str = "order_completed_last_30days", **overrides) -> dict:
    context = {"personas": {"computation_key": key, "computation_class": "audience"}}
    return track(name, context=context, properties={key: name == "Audience Entered"}, **overrides)


def only(event: dict, mapping_rules: MappingRules = RULES) -> RefinerCall:
    (call,) = to_refiner(event, mapping_rules)
    return call


# --- identify ------------------------------------------------------------------------------


def test_identify_becomes_identify_user_with_every_trait_but_email_at_the_top_level():
    event = identify(traits={"email": "ada@example.com", "name": "Ada", "plan": "pro", "logins": 7, "tags": ["a", "b"]})
    call = only(event)
    assert call.path == IDENTIFY_USER == "/identify-user"
    assert call.is_identify
    assert call.body == {"id": "u-1", "email": "ada@example.com", "name": "Ada", "plan": "pro", "logins": 7, "tags": ["a", "b"]}
    assert list(call.body).count("email") == 1  # email once, as the contact's, not again as a trait


def test_nested_traits_are_flattened_with_underscore():
    event = identify(traits={"address": {"city": "Paris", "geo": {"lat": 48.8}}, "company": {"name": "Initech"}})
    assert only(event).body == {"id": "u-1", "address_city": "Paris", "address_geo_lat": 48.8, "company_name": "Initech"}


def test_flatten_keeps_lists_and_scalars_as_they_are():
    assert flatten({"a": [1, {"b": 2}], "c": False, "d": 0, "e": ""}) == {"a": [1, {"b": 2}], "c": False, "d": 0, "e": ""}
    assert flatten(None) == {} and flatten(["not", "a", "map"]) == {}


def test_null_traits_are_left_out():
    event = identify(traits={"name": None, "plan": "pro", "address": {"city": None, "zip": "75001"}, "empty": {}})
    assert only(event).body == {"id": "u-1", "plan": "pro", "address_zip": "75001"}


def test_email_comes_from_traits_else_context_traits():
    both = identify(traits={"email": "top@example.com"}, context={"traits": {"email": "ctx@example.com"}})
    assert only(both).body["email"] == "top@example.com"
    context_only = identify(traits={"name": "Ada"}, context={"traits": {"email": "ctx@example.com"}})
    assert only(context_only).body == {"id": "u-1", "email": "ctx@example.com", "name": "Ada"}
    on_a_track = track(context={"traits": {"email": "ctx@example.com"}})
    assert only(on_a_track).body["email"] == "ctx@example.com"
    assert email_of({"traits": {"email": "  "}, "context": {"traits": {"email": "ctx@example.com"}}}) == "ctx@example.com"


def test_email_is_left_out_when_absent():
    for event in (identify(traits={"name": "Ada"}), identify(traits={"email": None, "name": "Ada"}), identify(traits={"email": ""})):
        assert "email" not in only(event).body, event
    assert "email" not in only(track()).body
    assert email_of({"traits": {"email": 5}}) is None


def test_engage_audience_traits_pass_as_they_are():
    event = identify(traits={"order_completed_last_30days": True, "churn_risk_audience": False})
    assert only(event).body == {"id": "u-1", "order_completed_last_30days": True, "churn_risk_audience": False}


# --- group ---------------------------------------------------------------------------------


def test_group_becomes_identify_user_with_the_account():
    event = {
        "type": "group",
        "messageId": "m-3",
        "userId": "u-1",
        "groupId": "acct-9",
        "traits": {"name": "Initech", "plan": "enterprise", "address": {"country": "FR"}, "seats": None},
        "context": {"traits": {"email": "ada@example.com"}},
    }
    call = only(event)
    assert call.path == IDENTIFY_USER
    assert call.body == {
        "id": "u-1",
        "email": "ada@example.com",
        "account": {"id": "acct-9", "name": "Initech", "plan": "enterprise", "address_country": "FR"},
    }


def test_group_account_id_is_the_group_id_even_when_a_trait_is_named_id():
    event = {"type": "group", "messageId": "m-3", "userId": "u-1", "groupId": "acct-9", "traits": {"id": "other"}}
    assert only(event).body["account"] == {"id": "acct-9"}


def test_group_traits_email_is_the_accounts_email_never_the_contacts():
    # A company's address in a group's traits: Refiner must not re-address the user to it.
    event = {
        "type": "group",
        "messageId": "m-4",
        "userId": "member-7",
        "groupId": "company-3",
        "traits": {"name": "Globex", "email": "billing@globex.example"},
    }
    assert only(event).body == {"id": "member-7", "account": {"id": "company-3", "name": "Globex", "email": "billing@globex.example"}}
    assert email_of(event) is None and contact_key(event) == "id:member-7"


def test_group_contact_email_comes_from_context_traits_only():
    event = {
        "type": "group",
        "messageId": "m-5",
        "userId": "member-7",
        "groupId": "company-3",
        "traits": {"email": "billing@globex.example"},
        "context": {"traits": {"email": "member7@globex.example"}},
    }
    body = only(event).body
    assert body["email"] == "member7@globex.example" and body["account"]["email"] == "billing@globex.example"


def test_group_without_user_id_and_only_an_account_email_is_ignored_not_a_new_contact():
    event = {
        "type": "group",
        "messageId": "m-6",
        "anonymousId": "anon-1",
        "groupId": "company-3",
        "traits": {"email": "billing@globex.example"},
    }
    assert to_refiner(event, RULES) == []
    assert ignored_reason(event, RULES) == "no userId and no email: Refiner cannot tell whose it is"


def test_identify_traits_email_is_still_the_contacts_email():
    assert only(identify(traits={"email": "ada@example.com"})).body == {"id": "u-1", "email": "ada@example.com"}


# --- track and page ------------------------------------------------------------------------


def test_track_becomes_track_event_without_properties():
    call = only(track("Plan Upgraded", properties={"from": "free", "to": "pro", "revenue": 9}))
    assert call.path == TRACK_EVENT == "/track-event"
    assert not call.is_identify
    assert call.body == {"id": "u-1", "event": "Plan Upgraded"}


def test_audience_entered_becomes_identify_user_true():
    call = only(audience("Audience Entered", traits={"email": "ada@example.com"}))
    assert call.path == IDENTIFY_USER
    assert call.body == {"id": "u-1", "email": "ada@example.com", "order_completed_last_30days": True}


def test_audience_exited_becomes_identify_user_false():
    call = only(audience("Audience Exited"))
    assert call.path == IDENTIFY_USER
    assert call.body == {"id": "u-1", "order_completed_last_30days": False}


def test_audience_event_without_computation_key_is_an_ordinary_track():
    event = track("Audience Entered", context={"personas": {}})
    assert audience_key(event) is None
    assert only(event) == RefinerCall(TRACK_EVENT, {"id": "u-1", "event": "Audience Entered"})


def test_only_a_track_is_an_audience_and_only_with_a_computation_key_of_text():
    personas = {"personas": {"computation_key": "vip"}}
    assert audience_key(track("Audience Entered", context=personas)) == "vip"
    assert audience_key(identify(event="Audience Entered", context=personas)) is None
    for key in ("  ", 7, None):
        assert audience_key(track("Audience Entered", context={"personas": {"computation_key": key}})) is None


@pytest.mark.parametrize(
    "event, mapping_rules, reason",
    [
        (identify(type="screen"), RULES, "type 'screen' is not sent to Refiner (only identify, group, track, page)"),
        (identify(integrations={"All": False}), RULES, "integrations.All is false and integrations.Refiner is not true"),
        (
            track("Clicked"),
            rules(track_events=["Signed Up"]),
            "track event 'Clicked' is not in the mapping file's [to_refiner] track_events",
        ),
        (
            {"type": "page", "messageId": "m-4", "userId": "u-1"},
            rules(page_event=None),
            "page calls are turned off in the mapping file ([to_refiner] page_event = false)",
        ),
    ],
)
def test_an_event_not_sent_is_ignored_saying_why(event, mapping_rules, reason):
    assert ignored_reason(event, mapping_rules) == reason


def test_page_becomes_pageview_track_event():
    event = {"type": "page", "messageId": "m-4", "userId": "u-1", "name": "Pricing", "properties": {"url": "https://x.example"}}
    assert only(event) == RefinerCall(TRACK_EVENT, {"id": "u-1", "event": "pageview"})


def test_page_event_custom_name():
    event = {"type": "page", "messageId": "m-4", "userId": "u-1", "name": "Pricing"}
    assert only(event, rules(page_event="Viewed Page")).body == {"id": "u-1", "event": "Viewed Page"}


def test_page_event_false_ignores_page_calls():
    event = {"type": "page", "messageId": "m-4", "userId": "u-1"}
    off = rules(page_event=None)
    assert to_refiner(event, off) == []
    assert "page_event" in ignored_reason(event, off)
    assert to_refiner(track(), off) != []  # only page calls are dropped


# --- contact -------------------------------------------------------------------------------


def test_contact_without_user_id_is_sent_by_email_alone():
    event = identify(userId=None, anonymousId="anon-1", traits={"email": "ada@example.com", "name": "Ada"})
    assert only(event).body == {"email": "ada@example.com", "name": "Ada"}
    anonymous_track = {"type": "track", "messageId": "m", "anonymousId": "anon-1", "event": "Signed Up"}
    anonymous_track["context"] = {"traits": {"email": "ada@example.com"}}
    assert only(anonymous_track).body == {"email": "ada@example.com", "event": "Signed Up"}


def test_contact_key_is_the_user_id_else_the_email_lowercased():
    assert contact_key(identify(traits={"email": "Ada@Example.com"})) == "id:u-1"
    assert contact_key(identify(userId=None, traits={"email": "Ada@Example.com"})) == "email:ada@example.com"
    assert contact_key(identify(userId=None)) is None


def test_identify_traits_cannot_override_the_contact_id():
    assert only(identify(traits={"id": "someone-else", "name": "Ada"})).body == {"id": "u-1", "name": "Ada"}


# --- ignored -------------------------------------------------------------------------------


def assert_ignored(event: dict, says: str, mapping_rules: MappingRules = RULES) -> None:
    reason = ignored_reason(event, mapping_rules)
    assert reason is not None and says in reason, reason
    assert to_refiner(event, mapping_rules) == []


def test_loop_guard_integrations_refiner_false_is_ignored():
    assert_ignored(identify(integrations={"Refiner": False}), "integrations.Refiner")


def test_loop_guard_integrations_all_false_without_refiner_true_is_ignored():
    assert_ignored(identify(integrations={"All": False}), "integrations.All")
    assert_ignored(identify(integrations={"All": False, "Segment.io": True}), "integrations.All")


def test_loop_guard_integrations_all_false_with_refiner_true_is_sent():
    event = identify(integrations={"All": False, "Refiner": True}, traits={"name": "Ada"})
    assert ignored_reason(event, RULES) is None
    assert only(event).body == {"id": "u-1", "name": "Ada"}


def test_loop_guard_other_integrations_do_not_matter():
    event = identify(integrations={"Refiner": True, "Amplitude": False, "All": True})
    assert ignored_reason(event, RULES) is None


def test_refiner_sources_own_segment_messages_are_ignored_by_the_loop_guard():
    """What refiner-source itself sends to Segment (section 3) must never come back to Refiner."""
    messages = map_event(WebhookSchema().load(survey_body(7)), RULES, datetime(2030, 1, 1, tzinfo=UTC))
    assert {m["type"] for m in messages} == {"identify", "group", "track"}
    for message in messages:
        as_posted = json.loads(json.dumps(message, default=str))  # what Segment's Webhooks destination would post
        event = segment_events.load(as_posted)
        assert "integrations.Refiner" in ignored_reason(event, RULES), message["type"]
        assert to_refiner(event, RULES) == []
        assert to_refiner(segment_events.normalise(event), RULES) == []  # also when mapped again from the store


@pytest.mark.parametrize("kind", ["screen", "alias", "Identify", "", None])
def test_other_types_are_ignored(kind):
    event = {"type": kind, "messageId": "m", "userId": "u-1", "event": "x", "groupId": "g", "previousId": "p"}
    assert_ignored(event, "type")


def test_no_user_id_and_no_email_is_ignored():
    assert_ignored(identify(userId=None, anonymousId="anon-1", traits={"name": "Ada"}), "no userId and no email")
    assert_ignored(track(userId="   "), "no userId and no email")
    assert_ignored(identify(userId=None, traits={"email": ""}, context={"traits": {"email": None}}), "no userId and no email")


def test_track_outside_the_allowlist_is_ignored():
    allow = rules(track_events=["Signed Up", "Plan Upgraded"])
    assert_ignored(track("Clicked Button"), "track_events", allow)
    assert only(track("Signed Up"), allow).body == {"id": "u-1", "event": "Signed Up"}
    assert only(track("Plan Upgraded"), allow).body["event"] == "Plan Upgraded"


def test_track_allowlist_absent_means_every_track():
    assert only(track("Anything At All")).body["event"] == "Anything At All"


def test_track_allowlist_empty_sends_no_track():
    assert_ignored(track("Signed Up"), "track_events", rules(track_events=[]))


def test_audience_events_are_not_subject_to_the_allowlist():
    allow = rules(track_events=["Signed Up"])
    assert only(audience("Audience Entered"), allow).body == {"id": "u-1", "order_completed_last_30days": True}
    assert only(audience("Audience Exited"), allow).body == {"id": "u-1", "order_completed_last_30days": False}


def test_allowlist_applies_to_track_only():
    allow = rules(track_events=["Signed Up"])
    assert ignored_reason(identify(), allow) is None
    assert ignored_reason({"type": "page", "messageId": "m", "userId": "u-1"}, allow) is None


# --- merge ---------------------------------------------------------------------------------


def test_merge_of_identifies_later_values_win():
    first = RefinerCall(IDENTIFY_USER, {"id": "u-1", "email": "old@example.com", "plan": "free", "name": "Ada"})
    second = RefinerCall(IDENTIFY_USER, {"id": "u-1", "plan": "pro", "seats": 3})
    third = RefinerCall(IDENTIFY_USER, {"id": "u-1", "email": "new@example.com"})
    merged = merge([first, second, third])
    assert merged.path == IDENTIFY_USER
    assert merged.body == {"id": "u-1", "email": "new@example.com", "plan": "pro", "name": "Ada", "seats": 3}


def test_merge_of_identifies_same_account_merged():
    first = RefinerCall(IDENTIFY_USER, {"id": "u-1", "account": {"id": "acct-1", "name": "Initech", "plan": "free"}})
    second = RefinerCall(IDENTIFY_USER, {"id": "u-1", "account": {"id": "acct-1", "plan": "pro"}})
    assert merge([first, second]).body == {"id": "u-1", "account": {"id": "acct-1", "name": "Initech", "plan": "pro"}}


def test_merge_of_identifies_different_account_replaced():
    first = RefinerCall(IDENTIFY_USER, {"id": "u-1", "account": {"id": "acct-1", "name": "Initech"}})
    second = RefinerCall(IDENTIFY_USER, {"id": "u-1", "account": {"id": "acct-2", "plan": "pro"}})
    assert merge([first, second]).body == {"id": "u-1", "account": {"id": "acct-2", "plan": "pro"}}


def test_merge_of_mapped_events_keeps_traits_audiences_and_account():
    calls = [
        *to_refiner(identify(traits={"name": "Ada", "plan": "free"}), RULES),
        *to_refiner({"type": "group", "messageId": "g", "userId": "u-1", "groupId": "acct-1", "traits": {"name": "Initech"}}, RULES),
        *to_refiner(audience("Audience Entered"), RULES),
        *to_refiner(identify(traits={"plan": "pro"}), RULES),
    ]
    assert all(call.is_identify for call in calls)
    assert merge(calls).body == {
        "id": "u-1",
        "name": "Ada",
        "plan": "pro",
        "account": {"id": "acct-1", "name": "Initech"},
        "order_completed_last_30days": True,
    }


def test_merge_does_not_change_its_inputs():
    first = RefinerCall(IDENTIFY_USER, {"id": "u-1", "account": {"id": "acct-1", "name": "Initech"}})
    second = RefinerCall(IDENTIFY_USER, {"id": "u-1", "account": {"id": "acct-1", "plan": "pro"}})
    merge([first, second])
    assert first.body == {"id": "u-1", "account": {"id": "acct-1", "name": "Initech"}}
    assert second.body == {"id": "u-1", "account": {"id": "acct-1", "plan": "pro"}}


# --- what is stored maps the same ----------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        identify(traits={"email": "ada@example.com", "address": {"city": "Paris"}}, context={"ip": "1.2.3.4"}),
        identify(userId=None, anonymousId=5, traits={"name": "Ada"}, context={"traits": {"email": "ada@example.com"}}),
        {"type": "group", "messageId": "g", "userId": "u-1", "groupId": "acct-1", "traits": {"name": "Initech"}},
        track("Signed Up", context={"traits": {"email": "ada@example.com"}, "page": {"url": "https://x.example"}}),
        audience("Audience Entered"),
        {"type": "page", "messageId": "p", "userId": 42, "properties": {"url": "https://x.example"}},
    ],
)
def test_the_stored_event_maps_to_the_same_calls_as_the_posted_one(event):
    loaded = segment_events.load(event)
    stored = json.loads(json.dumps(segment_events.normalise(loaded)))
    assert to_refiner(stored, RULES) == to_refiner(loaded, RULES) != []
    assert "properties" not in stored  # Refiner never receives them, so they are not kept


def test_merge_of_identifies_keeps_an_account_trait_that_is_not_an_object():
    group = RefinerCall(IDENTIFY_USER, {"id": "u1", "account": {"id": "a1", "plan": "pro"}})
    named = RefinerCall(IDENTIFY_USER, {"id": "u1", "account": "Acme Inc"})  # a user trait named "account"
    assert mergeable(group, named)
    assert merge([group, named]).body == {"id": "u1", "account": "Acme Inc"}  # later wins; no crash


def test_group_calls_of_two_accounts_are_not_merged():
    # Each account's traits must reach Refiner: merging would send only the later account.
    first = RefinerCall(IDENTIFY_USER, {"id": "u1", "account": {"id": "A", "seats": 40}})
    then = RefinerCall(IDENTIFY_USER, {"id": "u1", "account": {"id": "B", "plan": "free"}})
    assert not mergeable(first, then)
    assert mergeable(first, RefinerCall(IDENTIFY_USER, {"id": "u1", "account": {"id": "A", "plan": "pro"}}))
    assert mergeable(first, RefinerCall(IDENTIFY_USER, {"id": "u1", "order_completed_last_30days": True}))
    assert not mergeable(first, RefinerCall(TRACK_EVENT, {"id": "u1", "event": "Signed Up"}))


# --- what the webhook answers as "messages" ---------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        identify(traits={"plan": "pro", "address": {"city": "Oslo"}}),
        {"type": "group", "messageId": "m-3", "userId": "u-1", "groupId": "acme", "traits": {"name": "Acme"}},
        track(),
        audience("Audience Entered"),
        audience("Audience Exited"),
        {"type": "page", "messageId": "m-4", "anonymousId": "a", "context": {"traits": {"email": "ada@example.com"}}},
    ],
    ids=["identify", "group", "track", "audience entered", "audience exited", "page by email"],
)
def test_a_forwarded_event_is_one_call_as_the_webhook_counts_it_without_mapping(event):
    """The webhook counts an event's messages without running the mapping (CALLS_PER_EVENT): true
    only while every event that is not ignored becomes exactly that many calls."""
    from refiner_source.to_refiner.intake import prepare
    from refiner_source.to_refiner.mapping import CALLS_PER_EVENT

    loaded = segment_events.load(event)
    assert ignored_reason(loaded, RULES) is None
    assert len(to_refiner(segment_events.normalise(loaded), RULES)) == CALLS_PER_EVENT == prepare(loaded).message_count == 1
