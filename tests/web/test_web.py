"""The shared HTTP face: tokens and signatures as plain functions, and the order in which each webhook checks a request."""

from __future__ import annotations

import hashlib
import hmac
import io
from dataclasses import replace

import pytest

from refiner_source import create_app
from refiner_source.web.auth import presented_token, signature_ok, token_ok
from tests.conftest import SECRET

SEGMENT_SECRET = "segment-shared-secret-0123456789"
ROUTES = {"/webhooks/refiner": 1 << 20, "/webhooks/segment": 256 << 20}


def declared(size: int) -> dict:
    """A request body that says it is `size` bytes long: a route that refuses it by its length reads none of it."""
    return {"input_stream": io.BytesIO(b"x" * 64), "content_type": "application/json", "environ_overrides": {"CONTENT_LENGTH": str(size)}}


def test_presented_token_is_the_query_one_first_else_a_bearer_one():
    assert presented_token("q", "Bearer h") == "q"
    assert presented_token(None, "Bearer h") == "h"
    assert presented_token("", "bearer  h ") == "h"
    for authorization in (None, "", "Basic h", "Bearer", "Bearer   ", "Token h"):
        assert presented_token(None, authorization) is None, authorization


def test_token_ok_takes_any_of_the_secrets_and_nothing_else():
    assert token_ok("b" * 16, ("a" * 16, "b" * 16))
    assert not token_ok("b" * 15, ("a" * 16, "b" * 16))
    assert not token_ok("", ())
    assert not token_ok("\udcff", ("x",))  # a lone surrogate from a mangled query string is refused, not raised


def test_signature_ok_is_the_hex_hmac_sha1_of_the_body_in_either_case():
    raw = b'{"type": "identify"}'
    signed = hmac.new(SEGMENT_SECRET.encode(), raw, hashlib.sha1).hexdigest()
    assert signature_ok(raw, signed, SEGMENT_SECRET) and signature_ok(raw, f" {signed.upper()} ", SEGMENT_SECRET)
    assert not signature_ok(raw, signed, SEGMENT_SECRET + "x")
    assert not signature_ok(raw + b" ", signed, SEGMENT_SECRET)
    assert not signature_ok(raw, "é" * 40, SEGMENT_SECRET)


@pytest.fixture
def both_on(settings, outbox):
    app = create_app(replace(settings, segment_shared_secret=SEGMENT_SECRET, refiner_api_key="refiner-api-key"))
    yield app.test_client()
    app.extensions["refiner_source"].tally.flush()
    app.extensions["refiner_source"].outbox.dispose()


def test_the_refiner_webhook_checks_the_token_then_the_size_then_the_json(both_on):
    # The token needs no body: an unauthenticated sender is refused before anything is read.
    path, limit = "/webhooks/refiner", ROUTES["/webhooks/refiner"]
    refused = both_on.post(f"{path}?token=wrong", data=b"x" * (limit + 1), content_type="application/json")
    assert refused.status_code == 401
    too_big = both_on.post(f"{path}?token={SECRET}", data=b"x" * (limit + 1), content_type="application/json")
    assert too_big.status_code == 413 and too_big.json["error"] == "body_too_large" and str(limit) in too_big.json["message"]
    unparsed = both_on.post(f"{path}?token={SECRET}", data=b"{not json", content_type="application/json")
    assert unparsed.status_code == 400 and unparsed.json["error"] == "invalid_json"


def test_the_segment_webhook_checks_the_size_then_the_signature_then_the_json(both_on):
    # A signature is of the body: the body is read (up to its limit) before it can be checked.
    path, limit = "/webhooks/segment", ROUTES["/webhooks/segment"]
    too_big = both_on.post(f"{path}?token=wrong", **declared(limit + 1))
    assert too_big.status_code == 413 and too_big.json["error"] == "body_too_large" and str(limit) in too_big.json["message"]
    refused = both_on.post(f"{path}?token=wrong", data=b"{not json", content_type="application/json")
    assert refused.status_code == 401
    unparsed = both_on.post(f"{path}?token={SEGMENT_SECRET}", data=b"{not json", content_type="application/json")
    assert unparsed.status_code == 400 and unparsed.json["error"] == "invalid_json"


@pytest.mark.parametrize("path, off", [("/webhooks/refiner", {"segment_write_key": None}), ("/webhooks/segment", {})])
def test_a_webhook_that_is_off_answers_404_before_looking_at_anything(settings, outbox, path, off):
    app = create_app(replace(settings, **off))
    try:
        response = app.test_client().post(f"{path}?token=wrong", **declared(ROUTES["/webhooks/segment"] + 1))
        assert response.status_code == 404 and response.json["error"] == "not_enabled"
    finally:
        app.extensions["refiner_source"].tally.flush()
        app.extensions["refiner_source"].outbox.dispose()


def test_the_root_says_what_this_is_which_directions_are_on_and_where_to_look(settings, outbox):
    from refiner_source import __version__

    app = create_app(settings)  # Refiner to Segment only
    try:
        answer = app.test_client().get("/")
        assert answer.status_code == 200
        body = answer.json
        assert body["service"] == "refiner-source" and body["version"] == __version__
        assert body["directions"]["segment"]["on"] is True and body["directions"]["segment"]["webhook"] == "/webhooks/refiner"
        assert body["directions"]["refiner"]["on"] is False and body["directions"]["refiner"]["webhook"] == "/webhooks/segment"
        assert body["links"]["status"] == "/status" and body["links"]["openapi"] == "/openapi.json"
        text = answer.get_data(as_text=True)
        assert settings.segment_write_key not in text and SECRET not in text and settings.database_url not in text
    finally:
        app.extensions["refiner_source"].tally.flush()
        app.extensions["refiner_source"].outbox.dispose()


def test_a_refused_body_is_rejected_in_the_log_as_in_the_counts(both_on, caplog, webhook_body):
    import logging

    caplog.set_level(logging.INFO)
    del webhook_body["response"]["uuid"]  # the wrong shape: a 422
    assert both_on.post(f"/webhooks/refiner?token={SECRET}", json=webhook_body).status_code == 422
    signed = {"type": "identify", "messageId": 5}  # not a Segment event: a 422
    assert both_on.post(f"/webhooks/segment?token={SEGMENT_SECRET}", json=signed).status_code == 422
    nested: dict = {}
    for _ in range(100):
        nested = {"a": nested}
    assert both_on.post(f"/webhooks/refiner?token={SECRET}", json={**webhook_body, "deep": nested}).status_code == 422
    outcomes = [getattr(r, "outcome", None) for r in caplog.records if r.getMessage() == "rejected"]
    assert outcomes == ["rejected", "rejected", "rejected"], outcomes
    reasons = {getattr(r, "reason", None) for r in caplog.records if r.getMessage() == "rejected"}
    assert reasons == {"invalid_payload", "invalid_event", "too_deep"}
