"""POST /webhooks/segment: docs/http.md's status table, row by row, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from dataclasses import replace

import pytest
from sqlalchemy import select

from refiner_source import create_app
from refiner_source.config import Settings
from refiner_source.store import REFINER, SEGMENT, events
from refiner_source.web.stream import Body
from tests.browser_events import LARGEST_BATCH, browser_event
from tests.browser_events import batch as browser_batch

SEGMENT_SECRET = "segment-shared-secret-0123456789"
URL = "/webhooks/segment"


def sign(data: bytes, secret: str = SEGMENT_SECRET) -> str:
    return hmac.new(secret.encode(), data, hashlib.sha1).hexdigest()


def event(i: int | str = 1, kind: str = "identify", **overrides) -> dict:
    body = {
        "type": kind,
        "messageId": f"msg-{i}",
        "userId": f"user-{i}",
        "timestamp": "2030-01-02T03:04:05.000Z",
        "traits": {"email": f"user{i}@example.com", "plan": "pro"},
        "context": {"ip": "1.2.3.4", "library": {"name": "analytics.js"}},
        "integrations": {},
    }
    if kind == "track":
        body.update(event="Signed Up", properties={"plan": "pro"})
    if kind == "group":
        body.update(groupId=f"acct-{i}")
    body.update(overrides)
    return body


@pytest.fixture
def segment_settings(settings) -> Settings:
    return replace(settings, segment_shared_secret=SEGMENT_SECRET, refiner_api_key="refiner-api-key")


@pytest.fixture
def segment_app(segment_settings, outbox):
    app = create_app(segment_settings)
    yield app
    app.extensions["refiner_source"].outbox.dispose()


@pytest.fixture
def post(segment_app):
    client = segment_app.test_client()

    def post(body, *, token: str | None = SEGMENT_SECRET, signature: str | None = None, headers: dict | None = None):
        data = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        all_headers = dict(headers or {})
        if signature is not None:
            all_headers["X-Signature"] = signature
        elif token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        return client.post(URL, data=data, content_type="application/json", headers=all_headers)

    return post


def rows(outbox) -> list:
    with outbox.engine.connect() as conn:
        return conn.execute(select(events).order_by(events.c.id)).all()


def answer(accepted=0, duplicate=0, ignored=0, invalid=()) -> dict:
    return {"status": "accepted", "accepted": accepted, "duplicate": duplicate, "ignored": ignored, "invalid": list(invalid)}


# --- stored: 200 ---------------------------------------------------------------------------


def test_single_event_stored_answers_200_accepted_1(post, outbox):
    response = post(event(1))
    assert response.status_code == 200
    assert response.json == answer(accepted=1)
    (row,) = rows(outbox)
    assert row.destination == REFINER == "refiner"
    assert row.receipt_key == "msg-1" and row.status == "pending"
    assert row.contact == "id:user-1"
    assert outbox.stats(REFINER).pending == 1 and outbox.stats(SEGMENT).pending == 0
    stored = json.loads(row.event)
    assert stored["userId"] == "user-1" and stored["traits"] == {"email": "user1@example.com", "plan": "pro"}
    assert "ip" not in json.dumps(stored)  # the context but its traits' email and personas is not kept


def test_batch_stored_answers_200_with_each_event_accepted(post, outbox):
    batch = [event(1), event(2, "track"), event(3, "group"), event(4, "page")]
    response = post(batch)
    assert response.status_code == 200
    assert response.json == answer(accepted=4)
    assert [r.receipt_key for r in rows(outbox)] == ["msg-1", "msg-2", "msg-3", "msg-4"]
    assert {r.destination for r in rows(outbox)} == {REFINER}


def test_stored_events_are_committed_before_the_answer(post, segment_settings, outbox):
    from refiner_source.store import Store

    assert post([event(1), event(2)]).status_code == 200
    fresh = Store(segment_settings.database_url)  # another connection sees them: committed
    try:
        claimed = fresh.claim(REFINER, 10, 60, "other", contact_order=True)
    finally:
        fresh.dispose()
    assert sorted(c.source_id for c in claimed) == ["msg-1", "msg-2"]


def test_malformed_event_in_a_batch_never_costs_the_batchs_good_events(post, outbox):
    batch = [
        event(1),
        {"type": "identify", "userId": "no-message-id"},
        "not an object",
        event(4, "group", groupId=None),
        event(5, "track"),
        event(6, "track", event=None),
    ]
    response = post(batch)
    assert response.status_code == 200
    body = response.json
    assert (body["status"], body["accepted"], body["duplicate"], body["ignored"]) == ("accepted", 2, 0, 0)
    assert [item["index"] for item in body["invalid"]] == [1, 2, 3, 5]
    assert all(isinstance(item["error"], str) and item["error"] for item in body["invalid"])
    assert "messageId" in body["invalid"][0]["error"]
    assert "groupId" in body["invalid"][2]["error"]
    assert [r.receipt_key for r in rows(outbox)] == ["msg-1", "msg-5"]


def test_batch_of_only_malformed_events_answers_200_and_stores_nothing(post, outbox):
    response = post([{"type": "identify"}, 7])
    assert response.status_code == 200
    assert response.json["accepted"] == 0 and [i["index"] for i in response.json["invalid"]] == [0, 1]
    assert rows(outbox) == []


# --- 400 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, code",
    [
        (b"", "empty_body"),
        (b"  \n ", "empty_body"),
        (b"{not json", "invalid_json"),
        (b'{"type": "identify",', "invalid_json"),
        (b"\xff\xfe{}", "invalid_encoding"),
        (b'{"n": NaN}', "invalid_json"),
        # Valid JSON that Python reads as infinity, which no encoder writes back: stored, it could
        # never be sent to Refiner (and would hold up the contact's later calls for good).
        (b'{"type": "identify", "messageId": "m", "userId": "u", "traits": {"score": 1e999}}', "invalid_json"),
        (b'"a string"', "invalid_shape"),
        (b"42", "invalid_shape"),
        (b"null", "invalid_shape"),
        (b"true", "invalid_shape"),
    ],
)
def test_not_json_or_empty_or_not_object_or_array_answers_400(post, outbox, body, code):
    response = post(body)
    assert response.status_code == 400, response.json
    assert response.json["error"] == code and response.json["message"]
    assert rows(outbox) == []


# Mutation testing (bench/mutation.py) leaves alive the changes to the fallback name of
# `_JSON_TYPES.get(type(body), 'value')` in to_refiner/admission.py: a parsed JSON body is an
# object, an array, or one of the types the table names, so the fallback is never read.
@pytest.mark.parametrize(
    "body, what",
    [
        (b'"a string"', "a JSON string"),
        (b"42", "a JSON number"),
        (b"4.5", "a JSON number"),
        (b"null", "a JSON null"),
        (b"true", "a JSON boolean"),
        (b"[]", "an empty array"),
    ],
)
def test_a_400_for_a_body_that_is_no_event_says_what_it_got(post, body, what):
    response = post(body)
    assert response.status_code == 400 and response.json["error"] == "invalid_shape"
    assert response.json["message"] == f"Expected a Segment event (a JSON object) or an array of them, got {what}."


# --- 401 -----------------------------------------------------------------------------------


def test_signature_missing_answers_401_and_stores_nothing(post, outbox):
    response = post(event(1), token=None)
    assert response.status_code == 401 and response.json["error"]
    assert rows(outbox) == []


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "0" * 40,
        "not-hex-at-all",
        sign(b"something else"),
        "ü" * 40,
    ],
)
def test_signature_wrong_answers_401_and_stores_nothing(post, outbox, signature):
    response = post(event(1), signature=signature)
    assert response.status_code == 401 and response.json["error"]
    assert rows(outbox) == []


def test_signature_with_another_secret_answers_401(post, outbox):
    raw = json.dumps(event(1)).encode()
    assert post(raw, signature=sign(raw, "another-secret-of-enough-length")).status_code == 401
    assert rows(outbox) == []


@pytest.mark.parametrize("token", ["wrong-token", SEGMENT_SECRET + "x", SEGMENT_SECRET[:-1], "test-secret-0123456789"])
def test_token_wrong_answers_401_and_stores_nothing(post, outbox, token):
    response = post(event(1), token=token)
    assert response.status_code == 401
    assert SEGMENT_SECRET not in response.get_data(as_text=True)
    assert rows(outbox) == []


def test_refiner_webhook_token_does_not_open_the_segment_route(post, outbox):
    from tests.conftest import SECRET

    assert post(event(1), token=SECRET).status_code == 401
    assert rows(outbox) == []


def test_signature_is_checked_before_the_body_is_parsed(post):
    # Not before it is read: the signature is an HMAC of the raw body.
    assert post(b"{not json", signature="0" * 40).status_code == 401
    assert post(b"", token=None).status_code == 401


# --- authenticated ---------------------------------------------------------------------------


def test_x_signature_over_the_raw_body_is_accepted(post, outbox):
    raw = b'{"type": "identify", "messageId": "msg-raw",  "userId": "user-raw" }\n'  # its exact bytes, spaces and all
    response = post(raw, signature=sign(raw))
    assert response.status_code == 200 and response.json["accepted"] == 1
    assert [r.receipt_key for r in rows(outbox)] == ["msg-raw"]


def test_x_signature_in_upper_case_hex_is_accepted(post):
    raw = json.dumps(event(1)).encode()
    assert post(raw, signature=sign(raw).upper()).status_code == 200


def test_x_signature_over_the_raw_body_of_a_batch_is_accepted(post, outbox):
    raw = json.dumps([event(1), event(2)]).encode()
    assert post(raw, signature=sign(raw)).json == answer(accepted=2)


def test_x_signature_over_the_exact_text_of_a_batchs_first_element_is_accepted(post, outbox):
    first = '{ "type" :"identify",\n\t"messageId": "msg-a",   "userId":"user-a", "traits": {"name": "Zoë \\u00e9"} }'
    raw = ("[" + first + " ,\n  " + json.dumps(event("b")) + "]").encode()
    end = raw.index(b" ,\n")
    assert raw[1:end] == first.encode()  # what Segment signs: the element as sent, odd whitespace and all
    response = post(raw, signature=sign(raw[1:end]))
    assert response.status_code == 200, response.json
    assert response.json == answer(accepted=2)
    assert [r.receipt_key for r in rows(outbox)] == ["msg-a", "msg-b"]


def test_x_signature_over_the_first_element_after_leading_whitespace_is_accepted(post):
    element = json.dumps(event(1)).encode()
    raw = b" \n[\n  " + element + b",\n  " + json.dumps(event(2)).encode() + b"\n]\n"
    assert next(Body(io.BytesIO(raw).read, len(raw)).elements(len(raw))).text.encode() == element
    assert post(raw, signature=sign(element)).json["accepted"] == 2


def test_x_signature_over_a_re_serialised_first_element_is_refused(post, outbox):
    """The exact text counts: the same event written differently is not what was signed."""
    first = '{"type":"identify","messageId":"msg-a","userId":"user-a"}'
    raw = ("[" + first + "]").encode()
    respaced = json.dumps(json.loads(first)).encode()  # ", " and ": " instead
    assert respaced != first.encode()
    assert post(raw, signature=sign(respaced)).status_code == 401
    assert rows(outbox) == []


def test_x_signature_over_the_second_element_is_refused(post, outbox):
    second = json.dumps(event(2)).encode()
    raw = b"[" + json.dumps(event(1)).encode() + b"," + second + b"]"
    assert post(raw, signature=sign(second)).status_code == 401
    assert rows(outbox) == []


def test_x_signature_of_the_first_element_of_an_object_body_is_not_a_thing(post, outbox):
    inner = json.dumps(event(1)).encode()
    raw = b'{"batch": [' + inner + b"]}"
    assert post(raw, signature=sign(inner)).status_code == 401


def test_bearer_token_is_accepted(post, outbox):
    assert post(event(1), token=SEGMENT_SECRET).json == answer(accepted=1)
    assert len(rows(outbox)) == 1


def test_query_token_is_accepted(segment_app, outbox):
    client = segment_app.test_client()
    response = client.post(f"{URL}?token={SEGMENT_SECRET}", json=event(1))
    assert response.status_code == 200 and response.json == answer(accepted=1)
    assert client.post(f"{URL}?token=wrong", json=event(2)).status_code == 401
    assert [r.receipt_key for r in rows(outbox)] == ["msg-1"]


def test_wrong_signature_with_the_right_token_is_accepted(segment_app):
    """Either proof is enough: a token in the URL is the secret itself."""
    client = segment_app.test_client()
    response = client.post(f"{URL}?token={SEGMENT_SECRET}", json=event(1), headers={"X-Signature": "0" * 40})
    assert response.status_code == 200


# --- 413 -----------------------------------------------------------------------------------


def test_single_event_over_1_mib_answers_413(post, outbox):
    """One event may be 1 MiB, 32 times what Segment lets an event be."""
    response = post(event(1, traits={"essay": "x" * (1 << 20)}))
    assert response.status_code == 413 and response.json["error"] == "body_too_large" and str(1 << 20) in response.json["message"]
    assert rows(outbox) == []
    assert post(event(2, traits={"essay": "x" * ((1 << 20) - 1000)})).status_code == 200


def test_single_event_over_1_mib_without_a_length_answers_413(segment_app, outbox):
    """Chunked, as a proxy may pass it on: no Content-Length to refuse it by, the stream itself is cut."""
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    body = b'{"type": "identify", "messageId": "m", "userId": "u", "traits": {"essay": "' + b"x" * (9 << 20) + b'"}}'
    environ = EnvironBuilder(
        path=URL, method="POST", content_type="application/json", headers={"Authorization": f"Bearer {SEGMENT_SECRET}"}
    ).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"})
    _, status, _ = run_wsgi_app(segment_app, environ)
    assert status.startswith("413")
    assert rows(outbox) == []


def test_event_over_1_mib_in_a_batch_answers_413_after_taking_the_events_before_it(post, outbox):
    batch = [event(1), event(2, traits={"essay": "x" * (1 << 20)}), event(3)]
    response = post(batch)
    assert response.status_code == 413 and response.json["error"] == "event_too_large" and "Element 1" in response.json["message"]
    assert response.json["accepted"] == 1 and [r.receipt_key for r in rows(outbox)] == ["msg-1"]


def test_batch_over_8_mib_is_accepted(post, outbox):
    """Segment's largest batches are larger than 8 MiB: 4,000 events of up to 32 KB each."""
    batch = [event(i, traits={"bio": "y" * 200_000}) for i in range(50)]
    raw = json.dumps(batch).encode()
    assert len(raw) > 8 << 20
    response = post(raw)
    assert response.status_code == 200 and response.json["accepted"] == 50


def test_largest_batch_segment_sends_is_accepted_and_a_resend_is_all_duplicates(post, outbox):
    """4,000 events as analytics.js sends them (about 2.2 KB each, over 8 MiB in all), signed by their first."""
    body, first = browser_batch([browser_event(i, "largest") for i in range(LARGEST_BATCH)])
    assert len(body) > 8 << 20
    response = post(body, signature=sign(first))
    assert response.status_code == 200, response.json
    assert response.json == answer(accepted=LARGEST_BATCH)
    assert len(rows(outbox)) == LARGEST_BATCH
    assert post(body, signature=sign(first)).json == answer(duplicate=LARGEST_BATCH)


def test_batch_that_stops_being_json_part_way_answers_400_and_keeps_what_came_before(post, outbox):
    """What was read before the break is stored (a resend finds it a duplicate) and the answer says how much."""
    good = b",".join(json.dumps(event(i)).encode() for i in range(1200))
    response = post(b"[" + good + b', {"type": oops}]')
    assert response.status_code == 400 and response.json["error"] == "invalid_json"
    assert "element 1200" in response.json["message"] and "1200 accepted" in response.json["message"]
    assert (response.json["accepted"], response.json["duplicate"]) == (1200, 0)
    assert len(rows(outbox)) == 1200


def test_store_down_part_way_through_a_batch_answers_503_and_the_resend_takes_the_rest(post, segment_app, outbox, monkeypatch):
    from refiner_source.store import StoreUnavailable

    store = segment_app.extensions["refiner_source"].outbox
    real, calls = store.store_many, []

    def failing_second_time(entries, *args, **kwargs):
        calls.append(len(entries))
        if len(calls) == 2:
            raise StoreUnavailable("connection lost")
        return real(entries, *args, **kwargs)

    monkeypatch.setattr(store, "store_many", failing_second_time)
    batch = [event(i) for i in range(1200)]
    response = post(batch)
    assert response.status_code == 503 and response.json["error"] == "store_unavailable"
    stored = len(rows(outbox))
    assert 0 < stored < 1200
    again = post(batch)
    assert again.json == answer(accepted=1200 - stored, duplicate=stored)
    assert len(rows(outbox)) == 1200


def test_batch_signed_as_a_whole_is_read_to_its_end_before_anything_is_stored(post, outbox):
    """Larger than what is spooled in memory: the rest of the body goes to a temporary file while its HMAC is made."""
    raw = json.dumps([event(i, traits={"bio": "z" * 5000}) for i in range(1500)]).encode()
    assert len(raw) > 4 << 20
    assert post(raw, signature=sign(raw)).json == answer(accepted=1500)
    tampered = raw[:-200] + raw[-200:].replace(b"z", b"Z", 1)
    assert post(tampered, signature=sign(raw)).status_code == 401


def test_batch_whose_first_element_is_not_json_with_a_signature_answers_401(post, outbox):
    raw = b'[{"type": nope}, ' + json.dumps(event(2)).encode() + b"]"
    assert post(raw, signature=sign(raw[1:15])).status_code == 401
    assert post(raw, signature=sign(raw)).status_code == 400  # signed as a whole: it is the sender's, and not JSON
    assert rows(outbox) == []


# --- 422 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda e: e.pop("messageId"), "messageId"),
        (lambda e: e.pop("type"), "type"),
        (lambda e: e.update(type=7), "type"),
        (lambda e: e.update(messageId=""), "messageId"),
        (lambda e: e.update(messageId="m" * 256), "messageId"),
        (lambda e: e.update(userId={"id": 1}), "userId"),
        (lambda e: e.update(userId=True), "userId"),
        (lambda e: e.update(userId="a\x00b"), "userId"),
        (lambda e: e.update(messageId="m\x00"), "messageId"),
        (lambda e: e.update(traits=["not", "an", "object"]), "traits"),
        (lambda e: e.update(integrations="Refiner"), "integrations"),
        (lambda e: e.update(type="group", groupId=None), "groupId"),
        (lambda e: e.update(type="track", event=None), "event"),
        (lambda e: e.update(type="track", event=""), "event"),
    ],
)
def test_single_event_of_the_wrong_shape_answers_422_with_fields(post, outbox, mutate, field):
    body = event(1)
    mutate(body)
    response = post(body)
    assert response.status_code == 422, response.json
    assert response.json["error"] and response.json["message"]
    fields = response.json["fields"]
    assert any(path.split(".")[0] == field for path in fields), fields
    assert all(isinstance(messages, list) and messages for messages in fields.values())
    assert rows(outbox) == []


def test_single_event_of_the_wrong_shape_answers_invalid_event_saying_so(post):
    answer = post(event(1, messageId=5)).json
    assert (answer["error"], answer["message"], answer["fields"]) == (
        "invalid_event",
        "The body is not a Segment event.",
        {"messageId": ["Not a valid string."]},
    )


def test_a_batchs_invalid_event_is_named_by_index_with_every_failing_path():
    from refiner_source.directions.mapping_file import MappingRules
    from refiner_source.to_refiner.admission import admit

    admitted = admit([event(1), event(2, messageId=5, traits="x")], MappingRules())
    assert admitted.invalid == [{"index": 1, "error": "messageId: Not a valid string.; traits: Not a valid mapping type."}]
    assert [entry.receipt_key for entry in admitted.entries] == ["msg-1"] and admitted.single is False


def test_single_event_nested_too_deep_answers_422(post, outbox):
    deep: object = "leaf"
    for _ in range(40):
        deep = {"x": deep}
    response = post(event(1, traits={"deep": deep}))
    assert response.status_code == 422 and "traits" in response.json["fields"]
    assert rows(outbox) == []


# --- 503 -----------------------------------------------------------------------------------


def test_store_unreachable_answers_503(tmp_path):
    settings = Settings(segment_shared_secret=SEGMENT_SECRET, refiner_api_key="k", database_url=f"sqlite:///{tmp_path}/missing-dir/x.db")
    client = create_app(settings).test_client()
    response = client.post(URL, json=event(1), headers={"Authorization": f"Bearer {SEGMENT_SECRET}"})
    assert response.status_code == 503 and response.json["error"] == "store_unavailable"
    batch = client.post(URL, json=[event(1), event(2)], headers={"Authorization": f"Bearer {SEGMENT_SECRET}"})
    assert batch.status_code == 503


def test_store_unreachable_postgres_answers_503():
    settings = Settings(
        segment_shared_secret=SEGMENT_SECRET, refiner_api_key="k", database_url="postgresql+psycopg://postgres@127.0.0.1:1/none"
    )
    client = create_app(settings).test_client()
    response = client.post(URL, json=[event(1)], headers={"Authorization": f"Bearer {SEGMENT_SECRET}"})
    assert response.status_code == 503 and response.json["error"] == "store_unavailable"
    assert "traceback" not in response.get_data(as_text=True).lower()


def test_nothing_to_store_does_not_need_the_store(tmp_path):
    """A batch of only ignored events touches no store: answered 200 even while it is down."""
    settings = Settings(segment_shared_secret=SEGMENT_SECRET, refiner_api_key="k", database_url=f"sqlite:///{tmp_path}/missing-dir/x.db")
    client = create_app(settings).test_client()
    response = client.post(URL, json=[event(1, "screen")], headers={"Authorization": f"Bearer {SEGMENT_SECRET}"})
    assert response.status_code == 200 and response.json["ignored"] == 1


# --- duplicates ----------------------------------------------------------------------------


def test_same_message_id_twice_is_a_duplicate_and_stores_one_row(post, outbox):
    assert post(event(1)).json == answer(accepted=1)
    again = post(event(1, traits={"plan": "changed"}))
    assert again.status_code == 200
    assert again.json == answer(duplicate=1)
    (row,) = rows(outbox)
    assert json.loads(row.event)["traits"]["plan"] == "pro"  # the first one is kept


def test_same_message_id_twice_in_one_batch_stores_one_row(post, outbox):
    response = post([event(1), event(1), event(2)])
    assert response.status_code == 200
    assert response.json == answer(accepted=2, duplicate=1)
    assert [r.receipt_key for r in rows(outbox)] == ["msg-1", "msg-2"]


def test_resent_batch_is_all_duplicates(post, outbox):
    batch = [event(1), event(2, "track"), event(3, "screen")]
    assert post(batch).json["accepted"] == 2
    again = post(batch)
    assert (again.json["accepted"], again.json["duplicate"], again.json["ignored"]) == (0, 2, 1)
    assert len(rows(outbox)) == 2


def test_message_id_of_a_refiner_webhook_receipt_is_not_a_duplicate(post, outbox):
    """Receipts are per destination: a Segment messageId never collides with a Refiner response."""
    from tests.conftest import entry_for

    entry = entry_for(1)
    outbox.store_many([entry])
    assert post(event(1, messageId=entry.receipt_key)).json["accepted"] == 1
    assert sorted(r.destination for r in rows(outbox)) == [REFINER, SEGMENT]


# --- ignored -------------------------------------------------------------------------------


def test_ignored_events_answer_200_with_reasons_and_store_nothing(post, outbox):
    batch = [
        event(0, integrations={"Refiner": False}),
        event(1, integrations={"All": False}),
        event(2, "screen"),
        event(3, userId=None, anonymousId="anon", traits={"name": "No Email"}),
        event(4, "alias", previousId="old"),
        event(5, integrations={"All": False, "Refiner": True}),
    ]
    response = post(batch)
    assert response.status_code == 200
    body = response.json
    assert (body["accepted"], body["duplicate"], body["ignored"], body["invalid"]) == (1, 0, 5, [])
    reasons = body["ignored_reasons"]
    assert [(r["index"], r["message_id"]) for r in reasons] == [(i, f"msg-{i}") for i in range(5)]
    assert "integrations.Refiner" in reasons[0]["reason"]
    assert "integrations.All" in reasons[1]["reason"]
    assert "screen" in reasons[2]["reason"]
    assert "no userId and no email" in reasons[3]["reason"]
    assert "alias" in reasons[4]["reason"]
    assert [r.receipt_key for r in rows(outbox)] == ["msg-5"]


def test_single_ignored_event_answers_200_ignored_1(post, outbox):
    response = post(event(1, integrations={"Refiner": False}))
    assert response.status_code == 200
    assert response.json["ignored"] == 1 and response.json["accepted"] == 0
    assert response.json["ignored_reasons"][0]["message_id"] == "msg-1"
    assert rows(outbox) == []


def test_a_batchs_forgotten_events_are_ignored_each_named_by_index_and_message_id():
    from refiner_source.directions.mapping_file import MappingRules
    from refiner_source.to_refiner.admission import admit

    admitted = admit([event(1), event(2), event(3)], MappingRules())
    admitted.set_aside([entry for entry in admitted.entries if ("user", "user-2") in entry.people])
    assert admitted.ignored == [{"index": 1, "message_id": "msg-2", "reason": "forgotten"}]
    assert [entry.receipt_key for entry in admitted.entries] == ["msg-1", "msg-3"] and admitted.invalid == []


def test_a_batchs_ignored_events_are_listed_in_its_order_whatever_the_reason():
    from refiner_source.directions.mapping_file import MappingRules
    from refiner_source.to_refiner.admission import admit

    admitted = admit([event(1), event(2, integrations={"Refiner": False}), event(3), event(4)], MappingRules())
    admitted.set_aside([entry for entry in admitted.entries if ("user", "user-3") in entry.people])
    assert [(ignored["index"], ignored["reason"] == "forgotten") for ignored in admitted.ignored] == [(1, False), (2, True)]
    assert admitted.indices == [0, 3] and [entry.receipt_key for entry in admitted.entries] == ["msg-1", "msg-4"]


def test_no_ignored_reasons_when_nothing_was_ignored(post):
    assert "ignored_reasons" not in post(event(1)).json


def test_track_outside_the_mapping_files_allowlist_is_ignored(segment_settings, outbox):
    from refiner_source.directions.mapping_file import ToRefinerRules

    rules = replace(segment_settings.rules, to_refiner=ToRefinerRules(frozenset({"Signed Up"}), "pageview"))
    app = create_app(replace(segment_settings, rules=rules))
    client = app.test_client()
    batch = [
        event(1, "track", event="Clicked"),
        event(2, "track", event="Signed Up"),
        event(3, "track", event="Audience Entered", context={"personas": {"computation_key": "vip"}}),
    ]
    response = client.post(URL, json=batch, headers={"Authorization": f"Bearer {SEGMENT_SECRET}"})
    app.extensions["refiner_source"].outbox.dispose()
    assert response.status_code == 200
    assert (response.json["accepted"], response.json["ignored"]) == (2, 1)
    (reason,) = response.json["ignored_reasons"]
    assert reason["index"] == 0 and "track_events" in reason["reason"]
    assert [r.receipt_key for r in rows(outbox)] == ["msg-2", "msg-3"]


def test_refiner_sources_own_messages_posted_back_are_ignored(post, outbox):
    from datetime import UTC, datetime

    from refiner_source.directions.mapping_file import MappingRules
    from refiner_source.to_segment.events import WebhookSchema
    from refiner_source.to_segment.mapping import map_event
    from tests.conftest import survey_body

    messages = map_event(WebhookSchema().load(survey_body(1)), MappingRules(), datetime(2030, 1, 1, tzinfo=UTC))
    response = post(json.dumps(messages, default=str))
    assert response.status_code == 200
    assert response.json["ignored"] == len(messages) == 3 and response.json["accepted"] == 0
    assert rows(outbox) == []


# --- off -----------------------------------------------------------------------------------


def test_not_enabled_answers_404_while_the_secret_is_unset(client, outbox):
    response = client.post(URL, json=event(1), headers={"Authorization": f"Bearer {SEGMENT_SECRET}"})
    assert response.status_code == 404
    assert response.json["error"] == "not_enabled"
    assert "SEGMENT_SHARED_SECRET" in response.json["message"]
    assert rows(outbox) == []


def test_not_enabled_answers_404_whatever_the_body(client):
    for body in (b"", b"{not json", b"[]"):
        response = client.post(URL, data=body, content_type="application/json")
        assert response.status_code == 404 and response.json["error"] == "not_enabled"


def test_get_is_not_allowed(segment_app):
    response = segment_app.test_client().get(URL)
    assert response.status_code == 405 and response.json["error"] == "method_not_allowed"


# --- no 500 --------------------------------------------------------------------------------


def nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = {"x": value}
    return value


ODD_EVENTS = [
    event(1, traits={"deep": nested(31)}),
    event(2, traits={"deep": nested(33)}),
    event(3, traits={"list": [[[[[[[[[["deep"]]]]]]]]]]}),
    event(4, userId="a\x00b"),
    event(5, messageId="m\x00"),
    event(6, userId=12345),
    event(7, userId=1.5e308),
    event(8, userId=-0.0),
    event(9, userId=10**40),
    event(10, groupId=7, type="group"),
    event(11, traits={"": "empty key", "a.b": 1, "\ud800": "lone surrogate"}),
    event(12, traits={"email": "\ud800@example.com"}),
    event(13, messageId="\ud800"),
    event(14, userId="u" * 255, traits={"email": "e" * 300 + "@example.com"}),
    event(15, userId=None, traits={"email": "e" * 300 + "@example.com"}),
    event(16, userId="u" * 256),
    event(17, context="not an object"),
    event(18, context={"traits": "x", "personas": "y"}),
    event(19, "track", event="Audience Entered", context={"personas": {"computation_key": 5}}),
    event(20, "track", event="Audience Exited", context={"personas": {"computation_key": "k" * 10_000}}),
    event(21, traits={f"t{i}": i for i in range(1001)}),
    event(22, traits={"a": {f"t{i}": i for i in range(5000)}}),
    event(23, integrations={"Refiner": "false", "All": 0}),
    event(24, "track", event="E" * 300),
    event(25, type="x" * 300),
    event(26, anonymousId={"object": True}, userId=None, traits={"email": "a@example.com"}),
    event(27, timestamp=12),
    event(28, "page", name={"odd": "name"}),
    {},
    {"type": None, "messageId": None},
    [],
    [[]],
    None,
    "text",
]


def test_no_input_gives_a_500_single(post):
    failures = []
    for index, odd in enumerate(ODD_EVENTS):
        response = post(json.dumps(odd))
        if response.status_code >= 500 or not response.is_json:
            failures.append((index, response.status_code, response.get_data(as_text=True)[:200]))
        elif response.status_code == 200:
            assert response.json["status"] == "accepted", (index, response.json)
        else:
            assert response.json["error"], (index, response.json)
    assert failures == []


def test_lone_surrogate_in_a_trait_is_stored_and_maps_back(post, outbox):
    """Valid JSON ("\\ud800"), which no database can encode as it is: stored escaped, never a 500."""
    from refiner_source.directions.mapping_file import MappingRules
    from refiner_source.to_refiner.mapping import to_refiner

    raw = b'{"type": "identify", "messageId": "m-s", "userId": "u-s", "traits": {"name": "\\ud800 Ada", "\\udfff": 1}}'
    response = post(raw)
    assert response.status_code == 200 and response.json["accepted"] == 1
    (row,) = rows(outbox)
    (call,) = to_refiner(json.loads(row.event), MappingRules())
    assert call.body == {"id": "u-s", "name": "\ud800 Ada", "\udfff": 1}


@pytest.mark.parametrize("field", ["messageId", "userId", "type", "event"])
def test_lone_surrogate_in_an_id_answers_422(post, outbox, field):
    body = event(1, "track")
    body[field] = "x\ud800"
    response = post(json.dumps(body))
    assert response.status_code == 422 and field in response.json["fields"]
    assert rows(outbox) == []


def test_contact_too_long_or_unencodable_for_the_store_is_kept_as_a_digest(post, outbox):
    """The contact column holds 255 characters: "id:" + a 255-character userId, or a long email, does not fit."""
    long_id = "u" * 255
    long_email = "e" * 300 + "@example.com"
    batch = [
        event(1, userId=long_id),
        event(2, "track", userId=long_id),
        event(3, userId=None, traits={"email": long_email}),
        event(4, userId=None, traits={"email": "\ud800@example.com"}),
        event(5, userId="short"),
    ]
    response = post(json.dumps(batch))
    assert response.status_code == 200 and response.json["accepted"] == 5, response.json
    contacts = [r.contact for r in rows(outbox)]
    assert contacts[0] == contacts[1]  # one contact's events still go together, in order
    assert all(c.startswith("sha256:") and len(c) <= 255 for c in contacts[:4])
    assert len(set(contacts[1:4])) == 3
    assert contacts[4] == "id:short"


def test_no_input_gives_a_500_batch(post, outbox):
    response = post(json.dumps(ODD_EVENTS))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.json
    assert body["accepted"] + body["duplicate"] + body["ignored"] + len(body["invalid"]) == len(ODD_EVENTS)
    assert len(rows(outbox)) == body["accepted"]


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b"[{}" + b"," * 10 + b"]",
        b"\x00",
        b'{"type": "identify", "messageId": "m", "userId": "\\ud800"}',
    ],
)
def test_no_raw_body_gives_a_500(post, raw):
    assert post(raw).status_code < 500
    assert post(raw, signature=sign(b"not this body")).status_code == 401  # the signature check survives it too


# --- what each answer makes Segment do (docs/http.md) ------------------------------------------------


def segment_retries(status: int) -> bool:
    """Segment's Webhooks destinations retry these (for up to 4 hours) and discard any other 4xx."""
    return status in (408, 423, 429) or status >= 500


def what_segment_does_table() -> dict[int, str]:
    """docs/http.md's table "What each answer makes Segment do": status -> what Segment does."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "http.md").read_text()
    section = text.split("### What each answer makes Segment do", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            table[int(cells[0])] = cells[2]
    return table


def _answer_for(status: int, post, segment_app, client, monkeypatch):
    """A request this route answers with `status`, made as its table row says."""
    state = segment_app.extensions["refiner_source"]
    if status == 200:
        return post(event(1))
    if status == 400:
        return post(b"{not json")
    if status == 401:
        return post(event(1), token="not-the-secret")
    if status == 404:  # this app has only Refiner to Segment on
        return client.post(URL, json=event(1), headers={"Authorization": f"Bearer {SEGMENT_SECRET}"})
    if status == 413:
        return post(event(1, traits={"essay": "x" * (1 << 20)}))
    if status == 422:
        return post({"type": "identify", "userId": "u"})
    if status == 500:
        monkeypatch.setattr("refiner_source.to_refiner.admission.prepare", lambda *a: 1 / 0)
        return post(event(1))
    if status == 503:
        from refiner_source.store import StoreUnavailable

        def down(*_args, **_kwargs):
            raise StoreUnavailable("connection refused")

        monkeypatch.setattr(state.outbox, "store_grouped", down)
        return post(event(1))
    raise AssertionError(f"no way to make the route answer {status}: add one, or take the row out of docs/http.md")


def test_what_each_answer_makes_segment_do_is_documented_for_every_answer_the_route_gives():
    table = what_segment_does_table()
    assert set(table) >= {200, 400, 401, 404, 413, 422, 500, 503}
    for status, does in table.items():
        if status < 300:
            assert does.startswith("done"), (status, does)
        elif segment_retries(status):
            assert does.startswith("retries"), (status, does)
        else:
            assert does.startswith("discards"), (status, does)


@pytest.mark.parametrize("status", sorted(what_segment_does_table()))
def test_the_route_answers_each_row_of_what_segment_does_as_documented(status, post, segment_app, client, monkeypatch, outbox):
    response = _answer_for(status, post, segment_app, client, monkeypatch)
    assert response.status_code == status, response.get_data(as_text=True)
    stored = len(rows(outbox))
    assert stored == (1 if status == 200 else 0)
    if stored == 0 and not segment_retries(status):
        # Discarded by Segment: only where a retry could not have helped (never the store's fault).
        assert response.json["error"] != "store_unavailable"
