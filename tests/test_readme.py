"""The README is the front door: its commands and examples must be true of this checkout."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from refiner_source.config import MappingRules, load_mapping_file
from refiner_source.to_refiner import events as segment_events
from refiner_source.to_refiner.mapping import to_refiner
from refiner_source.to_segment.events import WebhookSchema
from refiner_source.to_segment.mapping import map_event
from tests.conftest import load_fixture

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
MAPPING_DOC = (ROOT / "docs" / "mapping.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_quick_start_works_on_a_python_that_refuses_system_wide_installs():
    commands = re.findall(r"```sh\n(.*?)```", section("Quick start"), re.S)[0]
    lines = [line for line in commands.splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 2  # one runs the service, one runs the tests
    for line in lines:  # PEP 668: Debian's and Ubuntu's pip refuse to install outside a virtualenv
        assert line.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install "), line
    assert "refiner-source serve" in lines[0] and lines[1].endswith("python -m pytest")
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("where", ["README.md", "docs/mapping.md"])
def test_mapping_file_example_names_questions_of_the_example_body(tmp_path, where):
    text = section("Mapping file") if where == "README.md" else MAPPING_DOC
    toml = re.findall(r"```toml\n(.*?)```", text, re.S)[0]
    path = tmp_path / "mapping.toml"
    path.write_text(toml)
    rules = load_mapping_file(str(path))
    body = load_fixture("webhook_completed_survey.json")
    assert set(rules.traits) <= set(body["response"]["data"]), "every [traits] key is a question of the example body"
    assert rules.account_questions <= set(body["response"]["data"])
    messages = {m["type"]: m for m in map_event(WebhookSchema().load(body), rules, datetime.now(UTC))}
    assert messages["identify"]["traits"]["job_role"] == "Product Manager"
    assert messages["track"]["properties"]["nps_score"] == "8"
    assert messages["group"]["traits"]["refiner_employee_count"] == "250-1000"


def _json_objects(text: str) -> list[dict]:
    """The JSON objects of a ```json block, one after another (blank lines between them)."""
    block = re.findall(r"```json\n(.*?)```", text, re.S)[0]
    decoder, objects, at = json.JSONDecoder(), [], 0
    while block[at:].strip():
        at += len(block[at:]) - len(block[at:].lstrip())
        value, at = decoder.raw_decode(block, at)
        objects.append(value)
    return objects


@pytest.mark.parametrize("where", ["README.md", "docs/mapping.md"])
def test_what_reaches_segment_is_what_the_mapping_makes_of_the_example_body(where):
    text = section("What reaches Segment") if where == "README.md" else MAPPING_DOC.split("### Worked example")[1]
    shown = _json_objects(text)
    body = load_fixture("webhook_completed_survey.json")
    made = map_event(WebhookSchema().load(body), MappingRules(), datetime.now(UTC))
    assert [m["type"] for m in shown] == [m["type"] for m in made]
    for expected, actual in zip(shown, made, strict=True):
        assert {key: actual[key] for key in expected} == expected  # what is shown is exact; the rest is trimmed


@pytest.mark.parametrize("where", ["README.md", "docs/mapping.md"])
def test_segment_to_refiner_worked_example_is_what_the_mapping_makes(where):
    text = section("Send Segment data to Refiner") if where == "README.md" else MAPPING_DOC.split("## Segment to Refiner")[1]
    (event,) = _json_objects(text)
    path, body = re.findall(r"Refiner receives `POST (\S+)` with\n`(\{.*?\})`", text, re.S)[0]
    (call,) = to_refiner(segment_events.normalise(segment_events.load(event)), MappingRules())
    assert (call.path, call.body) == (path, json.loads(body))
