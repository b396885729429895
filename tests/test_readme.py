"""The README is the front door: its commands and examples must be true of this checkout."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from refiner_source.config import load_mapping_file
from refiner_source.to_segment.events import WebhookSchema
from refiner_source.to_segment.mapping import map_event
from tests.conftest import load_fixture

README = (Path(__file__).parent.parent / "README.md").read_text()


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
    assert "python -m pytest" in (Path(__file__).parent.parent / ".ci" / "run").read_text()


def test_mapping_file_example_names_questions_of_the_example_body(tmp_path):
    toml = re.findall(r"```toml\n(.*?)```", section("Mapping file"), re.S)[0]
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
