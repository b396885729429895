"""SPEC section 1: settings, their defaults, and one clear line for a bad one."""

from __future__ import annotations

import pytest

from refiner_source.config import ConfigError, load_mapping_file, load_settings

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
