"""Hostile and broken input: limits, tokens, logs, and any JSON at all (issue: nothing gets in, nothing breaks)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from refiner_source import create_app
from refiner_source.config import load_settings
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.errors import ConfigError
from refiner_source.store import SEGMENT
from refiner_source.to_segment.events import MAX_ANSWERS, MAX_ATTRIBUTES, MAX_DEPTH, MAX_ID_LENGTH, event_from_json
from refiner_source.to_segment.mapping import map_event
from tests.conftest import SECRET, load_fixture

# --- limits, each with its own answer ------------------------------------------------------


def nested(depth: int):
    value: object = "leaf"
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest.mark.parametrize(
    "mutate, code, path",
    [
        (lambda b: b["response"]["data"].update(deep=nested(MAX_DEPTH)), "too_deep", "_schema"),
        (lambda b: b["response"].update(data={f"q{i}": i for i in range(MAX_ANSWERS + 1)}), "too_many_answers", "response.data"),
        (lambda b: b.update(attributes={f"a{i}": i for i in range(MAX_ATTRIBUTES + 1)}), "too_many_attributes", "attributes"),
        (
            lambda b: b["account"].update(attributes={f"a{i}": i for i in range(MAX_ATTRIBUTES + 1)}),
            "too_many_attributes",
            "account.attributes",
        ),
        (lambda b: b["response"].update(uuid="r" * (MAX_ID_LENGTH + 1)), "too_long", "response.uuid"),
        (lambda b: b.update(remote_id="u" * (MAX_ID_LENGTH + 1)), "too_long", "remote_id"),
        (lambda b: b["account"].update(remote_id="a" * (MAX_ID_LENGTH + 1)), "too_long", "account.remote_id"),
        (lambda b: b.update(triggered_event="E" * (MAX_ID_LENGTH + 1)), "too_long", "triggered_event"),
    ],
)
def test_each_limit_is_answered_422_with_its_own_code(post_webhook, webhook_body, outbox, mutate, code, path):
    mutate(webhook_body)
    response = post_webhook(webhook_body)
    assert response.status_code == 422
    assert response.json["error"] == code and path in response.json["fields"]
    assert outbox.stats(SEGMENT).pending == 0


def test_limits_leave_room_for_a_real_body(post_webhook, webhook_body):
    webhook_body["response"]["data"] = {f"q{i}": "answer" for i in range(MAX_ANSWERS - 1)}
    webhook_body["response"]["data"]["nested"] = nested(MAX_DEPTH - 4)
    webhook_body["response"]["uuid"] = "r" * MAX_ID_LENGTH
    assert post_webhook(webhook_body).status_code == 202


def test_json_nested_beyond_the_parser_is_too_deep_not_a_500(post_webhook):
    response = post_webhook(b"[" * 100_000 + b"]" * 100_000)
    assert response.status_code == 422 and response.json["error"] == "too_deep"


def test_body_over_1_mib_is_refused_from_content_length_without_reading_it(client):
    class Endless:
        """A body that fails the test if anyone reads it."""

        def read(self, *args):
            raise AssertionError("the body was read")

    environ = {"CONTENT_LENGTH": str(50 << 20), "CONTENT_TYPE": "application/json", "wsgi.input": Endless()}
    response = client.post(f"/webhooks/refiner?token={SECRET}", environ_overrides=environ)
    assert response.status_code == 413 and response.json["error"] == "body_too_large"


# --- the token -----------------------------------------------------------------------------


def test_token_in_query(post_webhook, webhook_body):
    assert post_webhook(webhook_body).status_code == 202


def test_token_in_authorization_header(client, webhook_body):
    assert client.post("/webhooks/refiner", json=webhook_body, headers={"Authorization": f"bearer {SECRET}"}).status_code == 202


def test_wrong_secret_of_the_same_length_is_refused(post_webhook, webhook_body):
    wrong = SECRET[:-1] + ("x" if SECRET[-1] != "x" else "y")
    response = post_webhook(webhook_body, token=wrong)
    assert response.status_code == 401 and response.json["error"] == "invalid_token"


def test_rotated_secret_old_and_new_both_accepted_during_rotation(settings, outbox, webhook_body):
    old, new = "old-secret-0123456789", "new-secret-9876543210"
    client = create_app(replace(settings, webhook_secrets=(old, new))).test_client()
    assert client.post(f"/webhooks/refiner?token={old}", json=webhook_body).status_code == 202
    webhook_body["response"]["uuid"] = "another-response"
    assert client.post(f"/webhooks/refiner?token={new}", json=webhook_body).status_code == 202
    after = create_app(replace(settings, webhook_secrets=(new,))).test_client()
    webhook_body["response"]["uuid"] = "a-third-response"
    assert after.post(f"/webhooks/refiner?token={old}", json=webhook_body).status_code == 401


@pytest.mark.parametrize("secret", ["short", "a" * 15, "long-enough-secret-1,short"])
def test_start_up_refuses_a_short_secret(secret):
    with pytest.raises(ConfigError, match="REFINER_WEBHOOK_SECRET must be at least 16 characters"):
        load_settings({"REFINER_WEBHOOK_SECRET": secret})


@pytest.mark.parametrize("secret", [",", " , "])
def test_start_up_refuses_an_empty_secret(secret):
    with pytest.raises(ConfigError, match="REFINER_WEBHOOK_SECRET"):
        load_settings({"REFINER_WEBHOOK_SECRET": secret})


def test_token_is_never_echoed(post_webhook, webhook_body):
    response = post_webhook(webhook_body, token="attacker-supplied-token-value")
    assert "attacker-supplied-token-value" not in response.get_data(as_text=True)


# --- logs ----------------------------------------------------------------------------------


def test_logs_at_info_hold_no_answers_emails_or_token(post_webhook, caplog):
    body = load_fixture("webhook_completed_survey.json")
    body["email"] = "zed.secretive@private.example"
    body["attributes"]["email"] = "zed.secretive@private.example"
    body["response"]["data"] = {"q1": "PURPLE-ELEPHANT-ANSWER", "q2": "x" * 40_000 + "TAIL-OF-LONG-ANSWER"}
    invalid = json.loads(json.dumps(body))
    invalid["response"]["completed_at"] = "NOT-A-DATE-SECRET"
    invalid["response"]["uuid"] = "other"
    with caplog.at_level(logging.INFO):
        assert post_webhook(body).status_code == 202
        assert post_webhook(body).status_code == 200
        assert post_webhook(invalid).status_code == 422
        assert post_webhook(body, token="wrong-token-value-123").status_code == 401
    text = caplog.text + " ".join(json.dumps(getattr(r, "shape", "")) for r in caplog.records)
    for secret in ("PURPLE-ELEPHANT", "TAIL-OF-LONG", "zed.secretive", "NOT-A-DATE-SECRET", SECRET, "wrong-token-value"):
        assert secret not in text
    rejected = [r for r in caplog.records if r.getMessage() == "rejected"]
    assert rejected and rejected[0].shape["response"]["completed_at"] == "str"  # the shape, not the value


# --- any JSON at all -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25,
)
fields_of_a_webhook = st.fixed_dictionaries(
    {},
    optional={
        "uuid": json_values,
        "remote_id": json_values,
        "email": json_values,
        "attributes": json_values,
        "account": json_values | st.fixed_dictionaries({}, optional={"remote_id": json_values, "attributes": json_values}),
        "triggered_event": st.sampled_from(["Completed Survey", "Saw Survey", "Dismissed Survey"]) | json_values,
        "form": json_values,
        "response": json_values
        | st.fixed_dictionaries(
            {"uuid": st.text(min_size=1, max_size=10)},
            optional={"data": json_values, "tags": json_values, "completed_at": json_values, "dismissed_at": json_values},
        ),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=json_values | fields_of_a_webhook)
def test_property_any_json_body_gets_a_2xx_or_4xx_and_never_raises(client, body):
    response = client.post(f"/webhooks/refiner?token={SECRET}", data=json.dumps(body), content_type="application/json")
    assert response.status_code < 500, response.get_data(as_text=True)
    assert response.is_json and (response.status_code < 300 or response.json["error"])


def is_a_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)  # as the webhook reads it
    except ValueError:  # UnicodeDecodeError included
        return False


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_property_any_bytes_but_a_json_object_get_a_4xx(client, raw):
    # 200 bytes are enough for a body Refiner's webhook answers 200 "ignored" (an object with a
    # response.uuid and some other triggered_event): any JSON object is the property above's.
    assume(not is_a_json_object(raw))
    response = client.post(f"/webhooks/refiner?token={SECRET}", data=raw, content_type="application/json")
    assert 400 <= response.status_code < 500, (response.status_code, response.get_data(as_text=True))
    assert response.is_json and response.json["error"]


# --- regressions found in review -----------------------------------------------------------


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_response_uuid_is_422_never_a_silent_duplicate(post_webhook, webhook_body, outbox, blank):
    webhook_body["response"]["uuid"] = blank
    response = post_webhook(webhook_body)
    assert response.status_code == 422 and "response.uuid" in response.json["fields"]
    assert outbox.stats(SEGMENT).pending == 0


@pytest.mark.parametrize("bad", ["abc\x00def", "abc\ud800"])
@pytest.mark.parametrize(
    "where",
    [lambda b, v: b["response"].update(uuid=v), lambda b, v: b.update(remote_id=v), lambda b, v: b.update(triggered_event=v)],
    ids=["response.uuid", "remote_id", "triggered_event"],
)
def test_nul_or_invalid_unicode_in_an_id_is_422_not_500_or_503(post_webhook, webhook_body, where, bad, capfd):
    where(webhook_body, bad)
    response = post_webhook(json.dumps(webhook_body))
    assert response.status_code == 422, response.json
    assert "Traceback" not in capfd.readouterr().err  # the log line itself must not break either


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(post_webhook, webhook_body, constant):
    raw = json.dumps(webhook_body).replace('"8"', constant)
    response = post_webhook(raw)
    assert response.status_code == 400 and response.json["error"] == "invalid_json"


def test_a_message_no_text_cut_can_shrink_is_still_accepted_and_fits(post_webhook, webhook_body, outbox):
    webhook_body["response"]["tags"] = list(range(20_000))
    webhook_body["response"]["data"] = {"k" * 40_000: "v", "numbers": list(range(10_000)), "essay": "x" * 5_000}
    response = post_webhook(webhook_body)
    assert response.status_code == 202 and response.json["messages"] == 3
    (claimed,) = outbox.claim(SEGMENT, 10, 60, "t")
    messages = map_event(event_from_json(claimed.event), MappingRules(), datetime.now(UTC))  # as the worker maps it
    assert len(messages) == 3
    for message in messages:
        assert len(json.dumps(message).encode()) <= 32 * 1024
        body = message.get("traits") or message.get("properties")
        assert all(len(name) <= 100 for name in body)
        if message["type"] != "group":
            assert body["refiner_essay"] == "x" * 5_000  # untouched: the lists made the room
            assert body["refiner_numbers"].startswith("… (omitted")
