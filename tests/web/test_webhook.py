"""POST /webhooks/refiner, status by status (docs/http.md), on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest

from refiner_source import create_app
from refiner_source.store import SEGMENT, Store
from refiner_source.to_segment.events import WebhookSchema, event_from_json
from tests.conftest import SECRET


def test_stored_will_be_delivered_answers_202_with_message_count(post_webhook, webhook_body, outbox):
    response = post_webhook(webhook_body)
    assert response.status_code == 202
    assert response.json == {"status": "accepted", "response_id": webhook_body["response"]["uuid"], "messages": 3}
    assert outbox.stats(SEGMENT).pending == 1  # one stored event; its three messages are made at delivery


def test_accepted_messages_are_committed_before_the_answer(post_webhook, webhook_body, store_url, settings):
    post_webhook(webhook_body)
    fresh = Store(settings.database_url)  # another connection sees it: committed, not just written
    (claimed,) = fresh.claim(SEGMENT, 10, 60, "other")
    fresh.dispose()
    assert event_from_json(claimed.event) == WebhookSchema().load(webhook_body)  # the event as received, normalised


def test_same_response_seen_before_answers_200_duplicate_without_new_rows(post_webhook, webhook_body, outbox):
    assert post_webhook(webhook_body).status_code == 202
    again = post_webhook(webhook_body)
    assert again.status_code == 200
    assert again.json["status"] == "duplicate" and again.json["response_id"] == webhook_body["response"]["uuid"]
    assert outbox.stats(SEGMENT).pending == 1


def test_same_response_with_another_event_is_not_a_duplicate(post_webhook, webhook_body, outbox):
    webhook_body["triggered_event"] = "Saw Survey"
    assert post_webhook(webhook_body).json["messages"] == 1
    webhook_body["triggered_event"] = "Completed Survey"
    assert post_webhook(webhook_body).status_code == 202
    assert outbox.stats(SEGMENT).pending == 2


def test_event_that_is_not_forwarded_answers_200_ignored(post_webhook, webhook_body, outbox):
    webhook_body["triggered_event"] = "Created Contact"
    response = post_webhook(webhook_body)
    assert response.status_code == 200
    assert response.json["status"] == "ignored" and "Created Contact" in response.json["reason"]
    assert outbox.stats(SEGMENT).pending == 0


def test_event_that_is_not_forwarded_is_ignored_with_the_reason_docs_http_md_gives(post_webhook, webhook_body):
    webhook_body["triggered_event"] = "Created Contact"
    assert post_webhook(webhook_body).json == {"status": "ignored", "reason": "triggered_event 'Created Contact': not a forwarded event"}


def test_event_turned_off_in_mapping_file_is_ignored_with_the_reason_docs_http_md_gives(settings, outbox, webhook_body):
    from dataclasses import replace

    rules = replace(settings.rules, events={**settings.rules.events, "Completed Survey": None})
    client = create_app(replace(settings, rules=rules)).test_client()
    answer = client.post(f"/webhooks/refiner?token={SECRET}", json=webhook_body).json
    assert answer == {"status": "ignored", "reason": "triggered_event 'Completed Survey': turned off in the mapping file"}


def test_event_turned_off_in_mapping_file_answers_200_ignored(settings, outbox, webhook_body):
    from dataclasses import replace

    rules = replace(settings.rules, events={**settings.rules.events, "Completed Survey": None})
    client = create_app(replace(settings, rules=rules)).test_client()
    response = client.post(f"/webhooks/refiner?token={SECRET}", json=webhook_body)
    assert response.status_code == 200 and response.json["status"] == "ignored"
    assert "mapping file" in response.json["reason"]


@pytest.mark.parametrize(
    "body, code",
    [
        (b"", "empty_body"),
        (b"   ", "empty_body"),
        (b"{not json", "invalid_json"),
        (b"\xff\xfe{}", "invalid_encoding"),
    ],
)
def test_body_not_json_or_not_utf8_or_empty_answers_400(post_webhook, body, code):
    response = post_webhook(body)
    assert response.status_code == 400
    assert response.json["error"] == code and response.json["message"]


def test_token_missing_answers_401(post_webhook, webhook_body, outbox):
    response = post_webhook(webhook_body, token=None)
    assert response.status_code == 401 and response.json["error"] == "missing_token"
    assert outbox.stats(SEGMENT).pending == 0


def test_token_wrong_answers_401(post_webhook, webhook_body):
    response = post_webhook(webhook_body, token="x" * len(SECRET))
    assert response.status_code == 401 and response.json["error"] == "invalid_token"
    assert SECRET not in response.get_data(as_text=True)


def test_token_as_authorization_bearer_header(client, webhook_body):
    response = client.post("/webhooks/refiner", json=webhook_body, headers={"Authorization": f"Bearer {SECRET}"})
    assert response.status_code == 202
    wrong = client.post("/webhooks/refiner", json=webhook_body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


class RecordedBody:
    """A request body that remembers whether anyone read it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.read_by_someone = False

    def read(self, *args) -> bytes:
        self.read_by_someone = True
        data, self.data = self.data, b""
        return data

    readline = read


def test_token_is_checked_before_the_body_is_read(client, outbox):
    def post(query: str) -> tuple[int, bool]:
        body = RecordedBody(b"{not json")
        environ = {"CONTENT_LENGTH": str(len(body.data)), "CONTENT_TYPE": "application/json", "wsgi.input": body}
        response = client.post(f"/webhooks/refiner{query}", environ_overrides=environ)
        return response.status_code, body.read_by_someone

    assert post("?token=wrong-token-0123456789") == (401, False)
    assert post("") == (401, False)  # no token at all
    assert post(f"?token={SECRET}") == (400, True)  # the same request with the token: read, and found not JSON
    assert outbox.stats(SEGMENT).pending == 0


def test_body_over_1_mib_answers_413(post_webhook, webhook_body, outbox):
    webhook_body["response"]["data"]["essay"] = "x" * (1 << 20)
    response = post_webhook(webhook_body)
    assert response.status_code == 413 and response.json["error"] == "body_too_large"
    assert outbox.stats(SEGMENT).pending == 0


@pytest.mark.parametrize(
    "mutate, path",
    [
        (lambda b: b["response"].pop("uuid"), "response.uuid"),
        (lambda b: b.pop("response"), "response"),
        (lambda b: b["response"].update(data=["not", "a", "map"]), "response.data"),
        (lambda b: b["response"].update(completed_at="yesterday"), "response.completed_at"),
        (lambda b: b.update(account="acct"), "account._schema"),
        (lambda b: b.update(remote_id={"id": 1}), "remote_id"),
        (lambda b: b.update(triggered_event=7), "triggered_event"),
        (lambda b: (b.pop("uuid"), b.pop("remote_id")), "uuid"),
    ],
)
def test_json_of_the_wrong_shape_answers_422_with_field_paths(post_webhook, webhook_body, outbox, mutate, path):
    mutate(webhook_body)
    response = post_webhook(webhook_body)
    assert response.status_code == 422, response.json
    assert response.json["error"] == "invalid_payload"
    assert path in response.json["fields"] and all(response.json["fields"][path])
    assert outbox.stats(SEGMENT).pending == 0


@pytest.mark.parametrize("body", [[], "string", 3, None])
def test_json_that_is_not_an_object_answers_422(post_webhook, body):
    response = post_webhook(json.dumps(body))
    assert response.status_code == 422 and "_schema" in response.json["fields"]


@pytest.mark.parametrize("body", [[], "string", 3, None])
def test_json_that_is_not_an_object_answers_422_invalid_shape_at_the_root(post_webhook, body):
    response = post_webhook(json.dumps(body))
    assert response.status_code == 422
    message = "Expected a JSON object."
    assert response.json == {"error": "invalid_shape", "message": message, "fields": {"_schema": [message]}}


def test_json_nested_beyond_the_parser_answers_422_too_deep_at_the_root(post_webhook):
    response = post_webhook(b"[" * 100_000 + b"]" * 100_000)
    assert response.status_code == 422
    message = "The JSON is nested too deeply."
    assert response.json == {"error": "too_deep", "message": message, "fields": {"_schema": [message]}}


def test_field_paths_of_an_error_flatten_nesting_and_name_the_root_schema():
    from marshmallow import ValidationError

    from refiner_source.directions.validation import error_fields

    assert error_fields(ValidationError("Not an event.")) == {"_schema": ["Not an event."]}
    assert error_fields(ValidationError([{"a": ["No."]}, "Bad."])) == {"0.a": ["No."], "1": ["Bad."]}
    assert error_fields(ValidationError(42)) == {"_schema": ["42"]}  # whatever is not a list or object is the root's too
    nested = ValidationError({"response": {"uuid": ["Missing."], "tags": {0: ["Not a string."]}}, "items": [{"a": ["No."]}, "Bad."]})
    assert error_fields(nested) == {
        "response.uuid": ["Missing."],
        "response.tags.0": ["Not a string."],
        "items.0.a": ["No."],
        "items.1": ["Bad."],
    }


def test_a_body_over_a_limit_answers_its_code_and_message_at_the_fields_path(post_webhook, webhook_body):
    webhook_body["response"]["uuid"] = "r" * 256
    response = post_webhook(webhook_body)
    message = "Longer than 255 characters."
    assert response.status_code == 422
    assert response.json == {"error": "too_long", "message": message, "fields": {"response.uuid": [message]}}


def test_json_of_the_wrong_shape_answers_invalid_payload_saying_so(post_webhook, webhook_body):
    webhook_body["response"].pop("uuid")
    answer = post_webhook(webhook_body).json
    assert (answer["error"], answer["message"]) == ("invalid_payload", "The body does not have the shape of a Refiner webhook.")


@pytest.mark.parametrize(
    "body, says",
    [
        (b'{"n": NaN}', "The body is not valid JSON: NaN is not a JSON value"),
        (b'{"n": 1e999}', "The body is not valid JSON: 1e999 is too large for a JSON number"),
    ],
)
def test_a_number_json_cannot_write_back_answers_400_naming_it(post_webhook, body, says):
    response = post_webhook(body)
    assert response.status_code == 400 and response.json == {"error": "invalid_json", "message": says}


# Mutation testing (bench/mutation.py) leaves alive "utf-8" written "UTF-8" in validation's
# strict_json and storable: Python looks codec names up in any case, so it decodes and encodes alike.
def test_a_body_that_is_not_utf8_answers_400_saying_so(post_webhook):
    assert post_webhook(b"\xff\xfe{}").json == {"error": "invalid_encoding", "message": "The body is not UTF-8."}


def test_a_refusal_says_its_message_and_answers_fields_only_when_it_has_them():
    from refiner_source.directions.validation import Refused, too_large

    refused = too_large(1024)
    assert str(refused) == refused.message == "The body is larger than 1024 bytes."
    assert refused.answer() == {"error": "body_too_large", "message": "The body is larger than 1024 bytes."}
    assert Refused(422, "c", "m", {}).answer() == {"error": "c", "message": "m", "fields": {}}


def test_unknown_extra_fields_are_accepted_and_ignored(post_webhook, webhook_body):
    webhook_body["brand_new_field"] = {"x": 1}
    webhook_body["response"]["another"] = [1, 2]
    assert post_webhook(webhook_body).status_code == 202


def test_store_unreachable_answers_503(webhook_body, tmp_path):
    from refiner_source.config import Settings

    app = create_app(Settings(segment_write_key="wk", webhook_secrets=(SECRET,), database_url=f"sqlite:///{tmp_path}/missing-dir/x.db"))
    response = app.test_client().post(f"/webhooks/refiner?token={SECRET}", json=webhook_body)
    assert response.status_code == 503 and response.json["error"] == "store_unavailable"
    assert app.test_client().get("/readyz").status_code == 503


def test_store_unreachable_postgres_answers_503(webhook_body):
    from refiner_source.config import Settings

    app = create_app(
        Settings(segment_write_key="wk", webhook_secrets=(SECRET,), database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")
    )
    response = app.test_client().post(f"/webhooks/refiner?token={SECRET}", json=webhook_body)
    assert response.status_code == 503 and "traceback" not in response.get_data(as_text=True).lower()


def test_healthz_answers_200_while_the_process_lives(client):
    assert client.get("/healthz").status_code == 200


def test_readyz_answers_200_when_the_store_answers(client):
    assert client.get("/readyz").json == {"status": "ready"}


def test_unknown_route_and_method_answer_json(client):
    assert client.get("/nope").status_code == 404 and client.get("/nope").json["error"]
    not_allowed = client.get("/webhooks/refiner")
    assert not_allowed.status_code == 405 and not_allowed.json["error"] == "method_not_allowed"


def test_no_input_gives_a_500(post_webhook, webhook_body):
    oddities = [
        {**webhook_body, "response": {**webhook_body["response"], "data": {"": None, "\ud800": "lone surrogate"}}},
        {**webhook_body, "remote_id": 1e308},
        {**webhook_body, "account": {"remote_id": True}},
        {**webhook_body, "response": {**webhook_body["response"], "tags": "x"}},
        {**webhook_body, "triggered_event": ""},
        {"triggered_event": "Completed Survey"},
    ]
    for body in oddities:
        response = post_webhook(json.dumps(body))
        assert response.status_code < 500, (body, response.json)
