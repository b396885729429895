"""Settings, their defaults, and one clear line for a bad one."""

from __future__ import annotations

import pytest

from refiner_source.config import load_settings
from refiner_source.directions.mapping_file import load_mapping_file
from refiner_source.errors import ConfigError

BASE = {"SEGMENT_WRITE_KEY": "wk", "REFINER_WEBHOOK_SECRET": "s3cret-token-value"}


def test_defaults():
    s = load_settings(BASE)
    assert s.segment_host == "https://api.segment.io"
    assert s.database_url == "sqlite:///refiner-source.db"
    assert (s.port, s.web_concurrency, s.log_level) == (8000, 2, "INFO")
    assert s.rules.prefix == "refiner_"
    assert s.refiner_api_url == "https://api.refiner.io/v1"
    assert s.webhook_secrets == ("s3cret-token-value",)


def test_segment_region_eu_means_eu_host():
    assert load_settings({**BASE, "SEGMENT_REGION": "eu"}).segment_host == "https://events.eu1.segmentapis.com"


def test_segment_host_wins_over_region():
    assert load_settings({**BASE, "SEGMENT_REGION": "eu", "SEGMENT_HOST": "http://127.0.0.1:9/"}).segment_host == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgres://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_database_url_accepts_heroku_postgres_scheme(url, expected):
    assert load_settings({**BASE, "DATABASE_URL": url}).database_url == expected


def test_comma_separated_secrets():
    assert load_settings({**BASE, "REFINER_WEBHOOK_SECRET": "old-one-0123456789, new-one-0123456789"}).webhook_secrets == (
        "old-one-0123456789",
        "new-one-0123456789",
    )


@pytest.mark.parametrize(
    "env, named",
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
        ({"SEGMENT_REGION": "mars"}, "SEGMENT_REGION"),
        ({"SEGMENT_HOST": "api.segment.io"}, "SEGMENT_HOST"),
        ({"SEGMENT_HOST": "https://api.segment.io/v1/batch"}, "SEGMENT_HOST"),
        ({"SEGMENT_HOST": "https://api.segment.io?x=1"}, "SEGMENT_HOST"),
        ({"SEGMENT_HOST": "https://api.segment.io?"}, "SEGMENT_HOST"),
        ({"SEGMENT_HOST": "https://api.segment.io#"}, "SEGMENT_HOST"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"DATABASE_URL": "refiner.db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite://"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:///:memory:"}, "DATABASE_URL"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"REFINER_MAPPING_FILE": "/nonexistent/mapping.toml"}, "REFINER_MAPPING_FILE"),
    ],
)
def test_malformed_setting_is_named_in_one_line(env, named):
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, **env})
    assert str(info.value).startswith(named) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["SEGMENT_WRITE_KEY", "REFINER_WEBHOOK_SECRET"])
def test_missing_required_setting_is_named(name):
    env = {k: v for k, v in BASE.items() if k != name}
    with pytest.raises(ConfigError, match=f"^{name} is not set"):
        load_settings(env, require=("SEGMENT_WRITE_KEY", "REFINER_WEBHOOK_SECRET"))


def test_mapping_file_is_read(tmp_path):
    path = tmp_path / "mapping.toml"
    path.write_text(
        'account_questions = ["employee_count"]\n'
        '[traits]\n"What is your job role?" = "job_role"\n'
        '[events]\n"Completed Survey" = "NPS Answered"\n"Saw Survey" = false\n'
    )
    rules = load_settings({**BASE, "REFINER_MAPPING_FILE": str(path), "REFINER_TRAIT_PREFIX": "rf_"}).rules
    assert rules.prefix == "rf_"
    assert rules.account_questions == {"employee_count"}
    assert rules.traits == {"What is your job role?": "job_role"}
    assert rules.events == {"Completed Survey": "NPS Answered", "Saw Survey": None, "Dismissed Survey": "Survey Dismissed"}


@pytest.mark.parametrize(
    "text, says",
    [
        ("account_questions = 3", "account_questions"),
        ("[traits]\nx = 1", "[traits]"),
        ("[traits]\nx = 'survey_id'", "clashes"),
        ("[events]\n'Completed Survey' = true", "[events]"),
        ("[events]\n'Opened App' = 'X'", "not a Refiner event"),
        ("colour = 'red'", "unknown key"),
        ("[traits", "not valid TOML"),
    ],
)
def test_malformed_mapping_file_is_explained(tmp_path, text, says):
    path = tmp_path / "mapping.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="REFINER_MAPPING_FILE") as info:
        load_mapping_file(str(path))
    assert says in str(info.value)


# --- Segment to Refiner --------------------------------------------------------------------

SEGMENT_ON = {**BASE, "SEGMENT_SHARED_SECRET": "segment-shared-secret-0123", "REFINER_API_KEY": "refiner-key"}


def test_segment_to_refiner_is_off_by_default():
    s = load_settings(BASE)
    assert s.segment_shared_secret is None
    assert s.refiner_api_concurrency == 32
    assert s.rules.to_refiner.track_events is None and s.rules.to_refiner.page_event == "pageview"


def test_segment_shared_secret_turns_segment_to_refiner_on():
    s = load_settings(SEGMENT_ON)
    assert s.segment_shared_secret == "segment-shared-secret-0123"
    assert s.refiner_api_key == "refiner-key"


def test_segment_shared_secret_without_refiner_api_key_names_refiner_api_key():
    env = {k: v for k, v in SEGMENT_ON.items() if k != "REFINER_API_KEY"}
    for without_key in (env, {**env, "REFINER_API_KEY": "   "}):
        with pytest.raises(ConfigError) as info:
            load_settings(without_key)
        assert str(info.value).startswith("REFINER_API_KEY") and "\n" not in str(info.value)


def test_refiner_api_key_alone_does_not_turn_segment_to_refiner_on():
    assert load_settings({**BASE, "REFINER_API_KEY": "refiner-key"}).segment_shared_secret is None


def test_blank_segment_shared_secret_is_unset():
    assert load_settings({**BASE, "SEGMENT_SHARED_SECRET": "  "}).segment_shared_secret is None


@pytest.mark.parametrize("secret", ["short", "x" * 15, "  " + "x" * 15 + "  "])
def test_short_segment_shared_secret_is_refused(secret):
    with pytest.raises(ConfigError) as info:
        load_settings({**SEGMENT_ON, "SEGMENT_SHARED_SECRET": secret})
    message = str(info.value)
    assert message.startswith("SEGMENT_SHARED_SECRET") and "16" in message and "\n" not in message
    assert secret.strip() not in message  # the secret itself is never echoed


def test_segment_shared_secret_of_16_characters_is_enough():
    assert load_settings({**SEGMENT_ON, "SEGMENT_SHARED_SECRET": "x" * 16}).segment_shared_secret == "x" * 16


def test_refiner_suppression_key_is_read_as_given():
    assert load_settings({**BASE, "REFINER_SUPPRESSION_KEY": "k" * 16}).suppression_key == "k" * 16
    assert load_settings(BASE).suppression_key is None


@pytest.mark.parametrize("key", ["short", "k" * 15])
def test_refiner_suppression_key_under_16_characters_is_refused_and_never_echoed(key):
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "REFINER_SUPPRESSION_KEY": key})
    message = str(info.value)
    assert message.startswith("REFINER_SUPPRESSION_KEY must be at least 16 characters") and "\n" not in message
    assert key not in message and message.endswith("; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")


@pytest.mark.parametrize("value, expected", [("1", 1), ("4", 4), ("64", 64), (" 8 ", 8)])
def test_refiner_api_concurrency_within_bounds(value, expected):
    assert load_settings({**SEGMENT_ON, "REFINER_API_CONCURRENCY": value}).refiner_api_concurrency == expected


@pytest.mark.parametrize("value", ["0", "65", "-1", "four", "2.5"])
def test_refiner_api_concurrency_out_of_bounds_is_named(value):
    with pytest.raises(ConfigError) as info:
        load_settings({**SEGMENT_ON, "REFINER_API_CONCURRENCY": value})
    assert str(info.value).startswith("REFINER_API_CONCURRENCY") and "\n" not in str(info.value)


def mapping(tmp_path, text: str):
    path = tmp_path / "mapping.toml"
    path.write_text(text)
    return load_mapping_file(str(path)).to_refiner


def test_to_refiner_section_is_read(tmp_path):
    rules = mapping(tmp_path, '[to_refiner]\ntrack_events = ["Signed Up", "Plan Upgraded"]\npage_event = "Viewed Page"\n')
    assert rules.track_events == {"Signed Up", "Plan Upgraded"}
    assert rules.page_event == "Viewed Page"


def test_to_refiner_section_through_the_environment(tmp_path):
    path = tmp_path / "mapping.toml"
    path.write_text('[to_refiner]\ntrack_events = ["Signed Up"]\npage_event = false\n')
    rules = load_settings({**SEGMENT_ON, "REFINER_MAPPING_FILE": str(path)}).rules.to_refiner
    assert rules.track_events == {"Signed Up"} and rules.page_event is None


def test_to_refiner_page_event_false_drops_page_calls(tmp_path):
    assert mapping(tmp_path, "[to_refiner]\npage_event = false\n").page_event is None


def test_to_refiner_defaults_when_section_or_keys_are_absent(tmp_path):
    for text in ("", "[to_refiner]\n", 'account_questions = ["x"]\n'):
        rules = mapping(tmp_path, text)
        assert rules.track_events is None and rules.page_event == "pageview", text


def test_to_refiner_empty_track_events_is_an_empty_allowlist_not_every_track(tmp_path):
    assert mapping(tmp_path, "[to_refiner]\ntrack_events = []\n").track_events == frozenset()


def test_to_refiner_section_leaves_the_other_sections_alone(tmp_path):
    path = tmp_path / "mapping.toml"
    path.write_text('[events]\n"Saw Survey" = false\n[to_refiner]\ntrack_events = ["Signed Up"]\n')
    rules = load_mapping_file(str(path))
    assert rules.events["Saw Survey"] is None and rules.events["Completed Survey"] == "Survey Completed"
    assert rules.to_refiner.track_events == {"Signed Up"}


@pytest.mark.parametrize(
    "text, says",
    [
        ("to_refiner = 3", "[to_refiner]"),
        ('to_refiner = "pageview"', "[to_refiner]"),
        ("[to_refiner]\ntrack_events = 'Signed Up'", "track_events"),
        ("[to_refiner]\ntrack_events = [1, 2]", "track_events"),
        ("[to_refiner]\ntrack_events = ['']", "track_events"),
        ("[to_refiner]\ntrack_events = ['  ']", "track_events"),
        ("[to_refiner]\npage_event = true", "page_event"),
        ("[to_refiner]\npage_event = ''", "page_event"),
        ("[to_refiner]\npage_event = 7", "page_event"),
        ("[to_refiner]\npage_events = 'pageview'", "unknown key"),
        ("[to_refiner]\ntrack_event = ['Signed Up']", "unknown key"),
    ],
)
def test_malformed_to_refiner_section_is_explained(tmp_path, text, says):
    with pytest.raises(ConfigError, match="REFINER_MAPPING_FILE") as info:
        mapping(tmp_path, text)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_malformed_to_refiner_section_stops_start_up_naming_the_file(tmp_path):
    path = tmp_path / "mapping.toml"
    path.write_text("[to_refiner]\npage_event = true\n")
    with pytest.raises(ConfigError) as info:
        load_settings({**SEGMENT_ON, "REFINER_MAPPING_FILE": str(path)})
    assert str(info.value).startswith("REFINER_MAPPING_FILE")


def test_segment_host_with_a_path_is_refused_naming_the_host_to_use_instead():
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "SEGMENT_HOST": "https://api.segment.io/v1/batch"})
    assert "such as https://api.segment.io," in str(info.value) and "/v1/batch is added" in str(info.value)
    assert (
        load_settings({**BASE, "SEGMENT_HOST": "https://events.eu1.segmentapis.com/"}).segment_host == "https://events.eu1.segmentapis.com"
    )
    assert load_settings({**BASE, "SEGMENT_HOST": "http://127.0.0.1:8080"}).segment_host == "http://127.0.0.1:8080"


def test_refiner_mapping_is_the_mapping_files_toml_as_a_variable():
    text = '[traits]\n"what_is_your_job_role" = "job_role"\n[types]\n"How likely are you to recommend us?" = "number"\n'
    rules = load_settings({**BASE, "REFINER_MAPPING": text}).rules
    assert rules.traits == {"what_is_your_job_role": "job_role"} and rules.types == {"How likely are you to recommend us?": "number"}


def test_refiner_mapping_is_checked_as_the_file_is_and_errors_name_it():
    for text, words in (("[traits\n", "is not valid TOML"), ("colour = 1\n", "unknown key(s) colour"), ('[types]\nq = "int"\n', "'int'")):
        with pytest.raises(ConfigError) as info:
            load_settings({**BASE, "REFINER_MAPPING": text})
        assert str(info.value).startswith("REFINER_MAPPING") and not str(info.value).startswith("REFINER_MAPPING_FILE")
        assert words in str(info.value) and "\n" not in str(info.value)


def test_refiner_mapping_and_refiner_mapping_file_both_set_is_refused_in_one_line(tmp_path):
    path = tmp_path / "mapping.toml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "REFINER_MAPPING": "[traits]\n", "REFINER_MAPPING_FILE": str(path)})
    assert "REFINER_MAPPING and REFINER_MAPPING_FILE are both set" in str(info.value) and "\n" not in str(info.value)
