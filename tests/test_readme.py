"""The README is the front door and docs/ the reference: their commands, examples, links and
variables must be true of this checkout."""

from __future__ import annotations

import json
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from refiner_source import create_app
from refiner_source.config import Settings, normalize_database_url
from refiner_source.directions.mapping_file import MappingRules, load_mapping_file
from refiner_source.run.cli import main
from refiner_source.store import SEGMENT, DeadLetter, Store
from refiner_source.to_refiner import events as segment_events
from refiner_source.to_refiner.mapping import to_refiner
from refiner_source.to_segment.events import WebhookSchema
from refiner_source.to_segment.intake import prepare
from refiner_source.to_segment.mapping import map_event
from tests.conftest import load_fixture

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
MAPPING_DOC = (DOCS / "mapping.md").read_text()
SETTINGS_DOC = (DOCS / "settings.md").read_text()
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


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
    assert "DATABASE_URL" not in lines[0]  # the service line runs on the embedded SQLite default
    # Both install the locks, the service's or the tests' (the same versions), as Heroku and CI do.
    assert "pip install -r requirements.txt && pip install --no-deps . &&" in lines[0]
    assert "pip install -r requirements-test.txt && pip install --no-deps -e . &&" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pip install --quiet -r requirements-test.txt\npython -m pip install --quiet --no-deps -e ." in ci
    assert "python -m pytest" in ci


def test_mapping_file_example_names_questions_of_the_example_body(tmp_path):
    toml = re.findall(r"```toml\n(.*?)```", MAPPING_DOC, re.S)[0]
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


def test_what_reaches_segment_is_what_the_mapping_makes_of_the_example_body():
    shown = _json_objects(MAPPING_DOC.split("### Worked example")[1])
    body = load_fixture("webhook_completed_survey.json")
    made = map_event(WebhookSchema().load(body), MappingRules(), datetime.now(UTC))
    assert [m["type"] for m in shown] == [m["type"] for m in made]
    for expected, actual in zip(shown, made, strict=True):
        assert {key: actual[key] for key in expected} == expected  # what is shown is exact; the rest is trimmed


@pytest.mark.parametrize("where", ["README.md", "docs/mapping.md"])
def test_segment_to_refiner_worked_example_is_what_the_mapping_makes(where):
    text = section("Point Segment at it") if where == "README.md" else MAPPING_DOC.split("## Segment to Refiner")[1]
    (event,) = _json_objects(text)
    path, body = re.findall(r"Refiner receives `POST (\S+)` with\n`(\{.*?\})`", text, re.S)[0]
    (call,) = to_refiner(segment_events.normalise(segment_events.load(event)), MappingRules())
    assert (call.path, call.body) == (path, json.loads(body))


# --- the README's curl checks answer what their comments say ------------------------------------


def _curls(text: str) -> list[tuple[list[str], dict]]:
    """Each `curl` of the text's ```sh blocks, as its arguments, with the answer its `# {...}` comment shows."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        command = block.replace("\\\n", " ")
        for match in re.finditer(r"^(curl .*?)\n# (\{.*\})$", command, re.S | re.M):
            found.append((shlex.split(match.group(1)), json.loads(match.group(2))))
    return found


def _request(args: list[str]) -> tuple[str, dict[str, str], bytes]:
    """(path with query, headers, body) of a curl command line (the options the README uses)."""
    url, headers, data, at = None, {}, b"", 1
    while at < len(args):
        arg = args[at]
        if arg == "-X":
            at += 1
        elif arg == "-H":
            name, _, value = args[at + 1].partition(":")
            headers[name.strip()] = value.strip()
            at += 1
        elif arg == "--data":
            value = args[at + 1]
            data = (ROOT / value[1:]).read_bytes() if value.startswith("@") else value.encode()
            at += 1
        else:
            url = arg
        at += 1
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else ""), headers, data


@pytest.mark.parametrize("title", ["Point Refiner at it", "Point Segment at it"])
def test_readme_curl_checks_answer_what_they_show(title, tmp_path):
    curls = _curls(section(title))
    assert curls, f"the README's {title!r} has a curl check"
    install = section("Three ways to install")  # the secrets the README's commands set, both directions on
    settings = Settings(
        segment_write_key="your-write-key",
        webhook_secrets=(re.search(r"REFINER_WEBHOOK_SECRET=(\S+)", install).group(1),),
        segment_shared_secret=re.search(r"SEGMENT_SHARED_SECRET=(\S+)", install).group(1),
        refiner_api_key="your-refiner-api-key",
        database_url=normalize_database_url(f"sqlite:///{tmp_path / 'readme.db'}"),
    )
    store = Store(settings.database_url)
    store.init_schema()  # as `refiner-source serve` does before it answers
    store.dispose()
    app = create_app(settings)
    try:
        client = app.test_client()
        for args, shown in curls:
            path, headers, data = _request(args)
            answer = client.post(path, data=data, headers=headers)
            assert answer.get_json() == shown, (path, answer.status_code)
    finally:
        app.extensions["refiner_source"].outbox.dispose()


def test_readme_segment_check_posts_the_event_it_then_shows():
    text = section("Point Segment at it")
    ((args, _),) = _curls(text)
    assert json.loads(_request(args)[2]) == _json_objects(text)[0]


def test_readme_status_example_is_what_status_prints_for_its_dead_letter(tmp_path):
    text = section("Operate it")
    (shown,) = [block for block in re.findall(r"```\n(.*?)```", text, re.S) if block.startswith("Refiner to Segment\n")]
    message_id, error = re.search(r"^  \S+  (\S+)  (.+)$", shown, re.M).groups()
    url = normalize_database_url(f"sqlite:///{tmp_path / 'status.db'}")
    store = Store(url)
    store.init_schema()
    try:  # the example body's response, its track refused by Segment: the README's situation
        store.store_many([prepare(WebhookSchema().load(load_fixture("webhook_completed_survey.json")), MappingRules())])
        (claimed,) = store.claim(SEGMENT, 1, 60, "w")
        store.settle("w", dead=[DeadLetter(claimed.id, message_id, "track", error)], destination=SEGMENT)
    finally:
        store.dispose()
    env = {"DATABASE_URL": url, "SEGMENT_WRITE_KEY": "your-write-key", "REFINER_WEBHOOK_SECRET": "a-long-random-token"}
    env |= {"SEGMENT_SHARED_SECRET": None, "REFINER_API_KEY": None}  # Segment to Refiner off, as shown
    printed = CliRunner().invoke(main, ["status"], env=env)
    assert printed.exit_code == 0, printed.output

    def when_masked(output: str) -> str:
        return re.sub(r"\(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)", "(<when>)", output).strip()

    assert when_masked(printed.output) == when_masked(shown)
    replayed = CliRunner().invoke(main, ["replay", "--to", "segment"], env=env)
    said = re.search(r"`refiner-source replay --to segment` answers `([^`]+)`", " ".join(text.split())).group(1)
    assert replayed.exit_code == 0 and replayed.output.strip() == said


# --- links, commands and variables ----------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation gone, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, counts = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", path.read_text()), re.M):
        slug = _slug(heading)
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers a repeated heading's anchor
    return found


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link)]


def test_slug_is_githubs():
    assert _slug("POST /webhooks/segment") == "post-webhookssegment"
    assert _slug("The operator's view") == "the-operators-view"
    assert _slug("`GET /`") == "get-"
    assert "healthz-and-readyz" in anchors(DOCS / "http.md")
    assert "run-the-service-sqlite-file-refiner-sourcedb-port-8000" not in anchors(ROOT / "README.md")  # a shell comment


@pytest.mark.parametrize("document", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_every_relative_link_resolves_to_a_file_and_anchor(document):
    source = ROOT / document
    links = relative_links(source)
    if document == "README.md":
        assert any(link.startswith("docs/") for link in links)
    for link in links:
        target, _, anchor = link.partition("#")
        resolved = (source.parent / target).resolve() if target else source
        assert resolved.is_file(), f"{document}: {link} names no file"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{document}: {link}: no such heading in {resolved.name}"


def test_readme_links_every_reference_document():
    linked = {link.partition("#")[0] for link in relative_links(ROOT / "README.md")}
    assert {f"docs/{p.name}" for p in DOCS.glob("*.md")} <= linked


def _code(text: str) -> str:
    return "\n".join(FENCE.findall(text) + re.findall(r"`[^`\n]+`", FENCE.sub("", text)))


def test_every_command_the_readme_names_is_in_the_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    listed = set(re.findall(r"^  ([a-z][a-z-]*) ", result.output.split("Commands:")[1], re.M))
    named = set(re.findall(r"\brefiner-source ([a-z][a-z-]*)", _code(README)))
    assert {"serve", "status", "replay", "purge-dead", "backfill", "init-db"} <= named
    assert named <= listed, f"not commands of refiner-source: {sorted(named - listed)}"


def _variables_read(path: Path) -> set[str]:
    return set(re.findall(r"""(?:\bget\(|_int\(get, )["']([A-Z][A-Z0-9_]*)["']""", path.read_text()))


CONFIG_VARIABLES = _variables_read(ROOT / "refiner_source" / "config.py")
# The tests' own variable (which database the PostgreSQL half runs on) is the README's too.
TEST_VARIABLES = _variables_read(ROOT / "tests" / "conftest.py")


def variables_named(text: str) -> set[str]:
    """Environment variables a text names: a name with an underscore, `$NAME`, `NAME=…`, or a settings table's row."""
    names = set(re.findall(r"(?<![\w-])([A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9])(?![\w-])", text))
    names |= set(re.findall(r"\$([A-Z][A-Z0-9_]*)", text))
    names |= set(re.findall(r"(?<![\w-])([A-Z][A-Z0-9_]*)=", text))
    return names | set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", text, re.M))


def test_config_reads_the_variables_it_is_known_to_read():
    assert {"SEGMENT_WRITE_KEY", "REFINER_WEBHOOK_SECRET", "PORT", "DATABASE_URL", "REFINER_TRAIT_PREFIX", "LOG_LEVEL"} <= CONFIG_VARIABLES
    assert len(CONFIG_VARIABLES) >= 15
    assert "TEST_DATABASE_URL" in TEST_VARIABLES


@pytest.mark.parametrize("document", ["README.md", "docs/settings.md"])
def test_every_variable_named_is_read_by_the_code(document):
    named = variables_named((ROOT / document).read_text())
    assert {"SEGMENT_WRITE_KEY", "REFINER_ADMIN_PASSWORD"} <= named
    unknown = named - CONFIG_VARIABLES - TEST_VARIABLES
    assert not unknown, f"{document} names variables refiner_source/config.py does not read: {sorted(unknown)}"


def test_every_variable_the_code_reads_is_in_the_settings_table():
    rows = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", SETTINGS_DOC, re.M))
    assert CONFIG_VARIABLES <= rows, f"missing from docs/settings.md: {sorted(CONFIG_VARIABLES - rows)}"


def test_app_json_defaults_are_the_documented_ones():
    app = json.loads((ROOT / "app.json").read_text())
    rows = dict(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \| ([^|]*) \|", SETTINGS_DOC, re.M))
    preset = {name: spec["value"] for name, spec in app["env"].items() if "value" in spec}
    assert preset
    for name, value in preset.items():
        assert f"`{value}`" in rows[name], f"app.json presets {name}={value!r}; docs/settings.md says {rows[name]!r}"
