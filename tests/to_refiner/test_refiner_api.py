"""RefinerApi.send against Refiner's REST API (responses mocks the HTTP): what is taken, retried or refused."""

from __future__ import annotations

import json

import pytest
import requests
import responses

from refiner_source.delivery.answers import Rejected, RetryLater
from refiner_source.to_refiner.api import RefinerApi
from refiner_source.to_refiner.mapping import IDENTIFY_USER, TRACK_EVENT, RefinerCall

BASE = "https://refiner.test/v1"
KEY = "refiner-api-key-123"
IDENTIFY = RefinerCall(IDENTIFY_USER, {"id": "u-1", "email": "ada@example.com", "plan": "pro", "account": {"id": "acct-1"}})
TRACK = RefinerCall(TRACK_EVENT, {"id": "u-1", "event": "Signed Up"})


@pytest.fixture
def api() -> RefinerApi:
    return RefinerApi(BASE + "/", KEY, timeout=5)  # a trailing slash on REFINER_API_URL is harmless


def failure(api: RefinerApi, call: RefinerCall = TRACK) -> Exception:
    with pytest.raises((RetryLater, Rejected)) as info:
        api.send(call)
    return info.value


@responses.activate
def test_posts_json_body_with_bearer_key_to_base_url_and_path(api):
    responses.post(BASE + "/identify-user", json={"message": "ok"})
    responses.post(BASE + "/track-event", json={"message": "ok"})
    assert api.send(IDENTIFY) is None
    assert api.send(TRACK) is None
    first, second = responses.calls
    assert first.request.method == "POST" and first.request.url == BASE + "/identify-user"
    assert first.request.headers["Authorization"] == f"Bearer {KEY}"
    assert first.request.headers["Content-Type"] == "application/json"
    assert json.loads(first.request.body) == IDENTIFY.body
    assert second.request.url == BASE + "/track-event" and json.loads(second.request.body) == TRACK.body
    assert second.request.headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("status", [200, 201, 202, 204])
@responses.activate
def test_2xx_returns(api, status):
    responses.post(BASE + "/track-event", status=status, body="" if status == 204 else '{"message":"ok"}')
    assert api.send(TRACK) is None
    assert len(responses.calls) == 1  # one request: send() never retries by itself


@responses.activate
def test_429_with_retry_after_gives_retry_later_with_that_delay(api):
    responses.post(BASE + "/track-event", status=429, json={"message": "Too many requests"}, headers={"Retry-After": "17"})
    exc = failure(api)
    assert isinstance(exc, RetryLater)
    assert exc.delay == 17 and exc.status == 429 and exc.key_problem is False
    assert len(responses.calls) == 1


@pytest.mark.parametrize("status", [408, 423, 429, 500, 502, 503])
@responses.activate
def test_408_423_429_and_5xx_give_retry_later_without_delay_when_none_is_given(api, status):
    responses.post(BASE + "/track-event", status=status, body="busy")
    exc = failure(api)
    assert isinstance(exc, RetryLater)
    assert exc.status == status and exc.delay is None and exc.key_problem is False


@responses.activate
def test_503_with_retry_after_gives_that_delay(api):
    responses.post(BASE + "/track-event", status=503, body="down", headers={"Retry-After": "5"})
    exc = failure(api)
    assert isinstance(exc, RetryLater) and exc.delay == 5 and exc.status == 503


@pytest.mark.parametrize("status", [401, 403])
@responses.activate
def test_401_and_403_give_retry_later_with_key_problem(api, status):
    responses.post(BASE + "/identify-user", status=status, json={"message": "Unauthenticated."})
    exc = failure(api, IDENTIFY)
    assert isinstance(exc, RetryLater) and not isinstance(exc, Rejected)
    assert exc.key_problem is True and exc.status == status
    assert KEY not in str(exc)  # the key is never in what gets logged


@responses.activate
def test_404_is_refiner_api_url_naming_no_endpoint_retried_as_a_key_problem(api):
    # Both calls create the user they name, so a 404 is the URL setting (a path without /v1, say):
    # retried while the operator fixes it, never a dead letter for every event.
    responses.post(BASE + "/identify-user", status=404, body="Not Found")
    exc = failure(api, IDENTIFY)
    assert isinstance(exc, RetryLater) and exc.key_problem is True and exc.status == 404


@pytest.mark.parametrize("status", [400, 405, 409, 413, 422])
@responses.activate
def test_other_4xx_are_rejected_carrying_refiners_answer(api, status):
    answer = '{"message":"The email must be a valid email address.","errors":{"email":["invalid"]}}'
    responses.post(BASE + "/identify-user", status=status, body=answer, content_type="application/json")
    exc = failure(api, IDENTIFY)
    assert isinstance(exc, Rejected)
    assert exc.status == status
    assert "The email must be a valid email address." in exc.detail and str(status) in exc.detail
    assert "The email must be a valid email address." in str(exc)


@responses.activate
def test_rejected_detail_is_bounded(api):
    responses.post(BASE + "/track-event", status=400, body="x" * 100_000)
    exc = failure(api)
    assert isinstance(exc, Rejected) and "xxx" in exc.detail and len(exc.detail) < 1000


@pytest.mark.parametrize(
    "error", [requests.ConnectionError("connection refused"), requests.Timeout("read timed out"), requests.exceptions.SSLError("bad cert")]
)
@responses.activate
def test_network_error_gives_retry_later_with_status_none(api, error):
    responses.post(BASE + "/track-event", body=error)
    exc = failure(api)
    assert isinstance(exc, RetryLater)
    assert exc.status is None and exc.delay is None and exc.key_problem is False
    assert type(error).__name__ in exc.reason


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@responses.activate
def test_3xx_is_not_followed_and_is_retry_later(api, status):
    responses.post(BASE + "/track-event", status=status, headers={"Location": "https://elsewhere.test/track-event"})
    elsewhere = responses.post("https://elsewhere.test/track-event", json={"message": "ok"})
    exc = failure(api)
    assert isinstance(exc, RetryLater) and exc.status == status
    assert elsewhere.call_count == 0 and len(responses.calls) == 1


@responses.activate
def test_each_thread_uses_its_own_session_with_the_key():
    import threading

    api = RefinerApi(BASE, KEY)
    responses.post(BASE + "/track-event", json={})
    sessions = []

    def send():
        api.send(TRACK)
        sessions.append(api.sessions.session())

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(s) for s in sessions}) == 3
    assert all(call.request.headers["Authorization"] == f"Bearer {KEY}" for call in responses.calls) and len(responses.calls) == 3
