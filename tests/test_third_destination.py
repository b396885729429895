"""A third destination is one package and one line of the registry: a stand-in (tests/standin/)
registered here is delivered, previewed, erased from and counted like the two real ones, with no
other code of the project told about it."""

from __future__ import annotations

import json

import pytest

from refiner_source.config import Settings
from refiner_source.destinations import delivery_loops, preview
from refiner_source.directions import DIRECTIONS, Direction, by_path
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.erasure import erase
from refiner_source.privacy import pairs
from refiner_source.store import Entry
from refiner_source.web.body import body_limit
from tests.standin import delivery as standin

STANDIN = Direction(
    "Refiner to a stand-in",
    "standin-source",
    "Stand-in",
    ("STANDIN_KEY", "STANDIN_SECRET"),
    "Refiner -> Stand-in",
    body_limit=4096,
    package="tests.standin",
    on=lambda settings: True,
)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(DIRECTIONS, standin.NAME, STANDIN)  # the one line
    standin.SENT.clear()


def entry(n: int, user: str) -> Entry:
    return Entry(f"k{n}", f"e{n}", "call", json.dumps({"user": user, "n": n}), destination=standin.NAME)


def test_a_registered_destination_is_delivered_previewed_and_erased_from(registered, outbox):
    settings = Settings()  # both real directions off: only the stand-in runs
    assert settings.direction_on(standin.NAME) and not settings.to_segment_on and not settings.to_refiner_on

    assert outbox.store_many([entry(1, "u-1"), entry(2, "u-2")]) == 2
    erased = erase(outbox, settings, frozenset(pairs(user="u-2")), suppress=False)
    assert erased[standin.NAME].events == 1  # its people module says whose event is whose

    (loop,) = delivery_loops(settings, outbox)
    assert loop.destination == standin.NAME
    loop.run_once()
    assert standin.SENT == [{"user": "u-1", "n": 1}]
    assert outbox.stats(standin.NAME).delivered == 1 and outbox.stats(standin.NAME).pending == 0

    assert preview(standin.NAME, json.dumps({"n": 3}), None, 0.0, MappingRules()) == [{"call": {"n": 3}}]


def test_a_registered_destination_has_its_webhook_path_and_body_limit(registered):
    assert STANDIN.path == "/webhooks/standin-source"
    assert by_path("/webhooks/standin-source") is STANDIN
    assert body_limit("/webhooks/standin-source") == 4096
    assert by_path("/webhooks/nothing") is None


def test_the_registry_names_each_directions_package_and_webhook():
    assert {d: (DIRECTIONS[d].package, DIRECTIONS[d].path) for d in DIRECTIONS} == {
        "segment": ("refiner_source.to_segment", "/webhooks/refiner"),
        "refiner": ("refiner_source.to_refiner", "/webhooks/segment"),
    }
