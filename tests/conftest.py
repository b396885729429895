"""Fixtures: a store on SQLite and on PostgreSQL (TEST_DATABASE_URL), an app per test, the real service."""

from __future__ import annotations

import copy
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from refiner_source import create_app
from refiner_source.config import Settings, normalize_database_url
from refiner_source.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "test-secret-0123456789"


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def webhook_body() -> dict:
    return copy.deepcopy(load_fixture("webhook_completed_survey.json"))


def _postgres_base() -> str | None:
    url = os.environ.get("TEST_DATABASE_URL")
    if not url and os.environ.get("CI"):
        pytest.fail("CI must set TEST_DATABASE_URL: the PostgreSQL half of the suite may not be skipped there")
    return url


def postgres_schema_url(base: str, schema: str) -> str:
    """A URL whose connections use `schema` only, so tests never see each other's tables."""
    url = make_url(normalize_database_url(base))
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


@contextmanager
def _on_test_server(create: str, drop: str):
    """Run `create` on the test PostgreSQL server (autocommit), yield its URL, then run `drop`; skipped
    without TEST_DATABASE_URL, failed if it is set and the server does not answer."""
    base = _postgres_base()
    if not base:
        pytest.skip("PostgreSQL tests need TEST_DATABASE_URL, e.g. postgresql://postgres@127.0.0.1:5432/test")
    admin = create_engine(normalize_database_url(base), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(create))
    except Exception as exc:  # set but not answering: a failure, never a skip
        pytest.fail(f"TEST_DATABASE_URL is set but PostgreSQL does not answer: {exc}")
    try:
        yield base
    finally:
        with admin.connect() as conn:
            conn.execute(text(drop))
        admin.dispose()


@contextmanager
def postgres_schema():
    """A fresh PostgreSQL schema for one test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with _on_test_server(f'CREATE SCHEMA "{schema}"', f'DROP SCHEMA "{schema}" CASCADE') as base:
        yield postgres_schema_url(base, schema)


def dead_row_versions(conn, table: str) -> int:
    """Row versions left dead in `table`'s pages, counted exactly by pgstattuple (installed in public
    once for the database, under a lock so that parallel tests do not both create it)."""
    with conn.begin():
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('pgstattuple'))"))
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS pgstattuple SCHEMA public"))
    where = conn.execute(text("SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pgstattuple'")).scalar()
    count = conn.execute(text(f"SELECT dead_tuple_count FROM {where}.pgstattuple(CAST(:t AS regclass))"), {"t": table}).scalar()
    conn.commit()
    return count


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'refiner-source.db'}"
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def pg_url():
    with postgres_schema() as url:
        yield url


@pytest.fixture
def pg_database_url():
    """A fresh PostgreSQL database for one test. For what VACUUM is checked to remove: it removes only
    row versions that no open transaction of the same database can still see, so another test's
    transaction (the suite runs in parallel) would keep them in a shared one."""
    name = f"refiner_test_{uuid.uuid4().hex[:12]}"
    with _on_test_server(f'CREATE DATABASE "{name}"', f'DROP DATABASE "{name}" WITH (FORCE)') as base:
        yield make_url(normalize_database_url(base)).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def outbox(store_url):
    box = Store(normalize_database_url(store_url))
    box.init_schema()
    yield box
    box.dispose()


@pytest.fixture
def settings(store_url) -> Settings:
    return Settings(segment_write_key="test-write-key", webhook_secrets=(SECRET,), database_url=normalize_database_url(store_url))


@pytest.fixture
def app(settings, outbox):
    app = create_app(settings)
    yield app
    app.extensions["refiner_source"].outbox.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def post_webhook(client):
    def post(body, token: str | None = SECRET, **kwargs):
        url = "/webhooks/refiner" + (f"?token={token}" if token is not None else "")
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return client.post(url, data=data, content_type="application/json", **kwargs)

    return post


def survey_body(i: int | str, event: str = "Completed Survey", answer: str = "Product Manager") -> dict:
    """The example webhook body as response `r<i>` (contact `user-<i>`), with `event` and one answer changed."""
    body = copy.deepcopy(load_fixture("webhook_completed_survey.json"))
    body["response"]["uuid"] = f"r{i}"
    body["remote_id"] = f"user-{i}"
    body["triggered_event"] = event
    body["response"]["data"]["what_is_your_job_role"] = answer
    return body


def entry_for(i: int | str, event: str = "Completed Survey", answer: str = "Product Manager", rules=None):
    """The store's entry for survey_body(i, ...), as the webhook makes it."""
    from refiner_source.directions.mapping_file import MappingRules
    from refiner_source.to_segment.events import WebhookSchema
    from refiner_source.to_segment.intake import prepare

    return prepare(WebhookSchema().load(survey_body(i, event, answer)), rules or MappingRules())


@pytest.fixture
def segment():
    """A local HTTP server standing in for Segment's /v1/batch (tests/segment_stub.py)."""
    from tests.segment_stub import SegmentStub

    with SegmentStub() as stub:
        yield stub


@pytest.fixture
def refiner():
    """A local HTTP server standing in for Refiner's REST API (tests/refiner_stub.py); its key is `refiner.api_key`.
    Modules that need it scripted otherwise define their own."""
    from tests.refiner_stub import RefinerStub

    with RefinerStub() as stub:
        yield stub
