"""Settings from the environment, validated once, with one clear line per mistake; the rules of the
keys among them (the suppression list's key). The mapping file is refiner_source.directions.mapping_file."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from refiner_source.directions import DIRECTIONS, REFINER, SEGMENT
from refiner_source.directions.mapping_file import MappingRules, load_mapping_file, load_mapping_text
from refiner_source.errors import ConfigError

SEGMENT_REGION_HOSTS = {
    "us": "https://api.segment.io",
    "eu": "https://events.eu1.segmentapis.com",
}
DEFAULT_DATABASE_URL = "sqlite:///refiner-source.db"
MIN_SECRET_LENGTH = 16
MIN_KEY_LENGTH = 16  # REFINER_SUPPRESSION_KEY's
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    segment_write_key: str | None = None
    segment_host: str = SEGMENT_REGION_HOSTS["us"]
    webhook_secrets: tuple[str, ...] = ()
    database_url: str = "sqlite:///refiner-source.db"
    port: int = 8000
    web_concurrency: int = 2
    rules: MappingRules = field(default_factory=MappingRules)
    refiner_api_key: str | None = None
    refiner_api_url: str = "https://api.refiner.io/v1"
    log_level: str = "INFO"
    retention_days: int = 7
    segment_shared_secret: str | None = None  # with refiner_api_key: Segment to Refiner is on
    refiner_api_concurrency: int = 32
    admin_password: str | None = None  # set: /status and /metrics answer, behind HTTP Basic auth
    alert_webhook_url: str | None = None  # set: alerts go there (Slack-compatible incoming webhook)
    alert_pending_seconds: int = 900
    suppression_key: str | None = None  # the forgotten people's hashes' key (else derived: key_of)

    @property
    def to_segment_on(self) -> bool:
        """Refiner -> Segment: on when SEGMENT_WRITE_KEY and REFINER_WEBHOOK_SECRET are both set."""
        return self.direction_on(SEGMENT)

    @property
    def to_refiner_on(self) -> bool:
        """Segment -> Refiner: on when SEGMENT_SHARED_SECRET and REFINER_API_KEY are both set."""
        return self.direction_on(REFINER)

    def direction_on(self, destination: str) -> bool:
        """Whether the direction to `destination` is on, by the registry's rule (refiner_source.directions)."""
        return DIRECTIONS[destination].on(self)


def load_settings(environ: Mapping[str, str] | None = None, *, require: tuple[str, ...] = (), directions: bool = False) -> Settings:
    """Read every setting from `environ` (default: os.environ); raise ConfigError on the first bad one.

    `require` names the variables the caller cannot run without (backfill needs the API key;
    `status` needs none). `directions`: the caller runs the directions that are on (serve, worker,
    the web app), so at least one must be, and neither may be half set.
    """
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        value = env.get(name)
        return value.strip() if value is not None and value.strip() else None

    for name in require:
        if get(name) is None:
            raise ConfigError(f"{name} is not set: {_REQUIRED_HINTS.get(name, 'it is required')}")
    if directions:
        check_directions({name for direction in DIRECTIONS.values() for name in direction.variables if get(name) is not None})

    region = (get("SEGMENT_REGION") or "us").lower()
    if region not in SEGMENT_REGION_HOSTS:
        raise ConfigError(f"SEGMENT_REGION must be one of {', '.join(SEGMENT_REGION_HOSTS)}, got {region!r}")
    segment_host = get("SEGMENT_HOST") or SEGMENT_REGION_HOSTS[region]
    _check_http_url("SEGMENT_HOST", segment_host, "https://api.segment.io")
    host_parts = urlsplit(segment_host)
    if host_parts.path not in ("", "/") or "?" in segment_host or "#" in segment_host:
        # The Segment library appends /v1/batch itself: a path here would be sent to, and retried, forever.
        bare = f"{host_parts.scheme}://{host_parts.netloc}"
        raise ConfigError(f"SEGMENT_HOST must be a host without a path (/v1/batch is added to it), such as {bare}, got {segment_host!r}")

    secret = get("REFINER_WEBHOOK_SECRET")
    secrets = tuple(s.strip() for s in secret.split(",") if s.strip()) if secret else ()
    if secret is not None and not secrets:
        raise ConfigError("REFINER_WEBHOOK_SECRET holds no token: give one, or several separated by commas")
    if any(len(s) < MIN_SECRET_LENGTH for s in secrets):
        raise ConfigError(
            f"REFINER_WEBHOOK_SECRET must be at least {MIN_SECRET_LENGTH} characters (each, when comma-separated); "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )

    shared_secret = get("SEGMENT_SHARED_SECRET")
    if shared_secret is not None:
        if len(shared_secret) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"SEGMENT_SHARED_SECRET must be at least {MIN_SECRET_LENGTH} characters; "
                "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if get("REFINER_API_KEY") is None:
            raise ConfigError(
                "REFINER_API_KEY is not set: SEGMENT_SHARED_SECRET turns on Segment to Refiner, which calls Refiner's REST API "
                "with your project's API key (Refiner: Settings > Integrations > API)"
            )

    admin_password = get("REFINER_ADMIN_PASSWORD")
    if admin_password is not None and len(admin_password) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"REFINER_ADMIN_PASSWORD must be at least {MIN_SECRET_LENGTH} characters; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    alert_url = get("ALERT_WEBHOOK_URL")
    if alert_url is not None:
        _check_http_url("ALERT_WEBHOOK_URL", alert_url, "https://hooks.slack.com/services/T000/B000/XXXX")

    refiner_api_url = (get("REFINER_API_URL") or "https://api.refiner.io/v1").rstrip("/")
    _check_http_url("REFINER_API_URL", refiner_api_url, "https://api.refiner.io/v1")

    log_level = (get("LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")

    prefix = env.get("REFINER_TRAIT_PREFIX", "refiner_")
    mapping_file, mapping_text = get("REFINER_MAPPING_FILE"), get("REFINER_MAPPING")
    if mapping_file and mapping_text:
        raise ConfigError("REFINER_MAPPING and REFINER_MAPPING_FILE are both set: keep one (the TOML itself, or a file holding it)")
    if mapping_text:
        rules = load_mapping_text(mapping_text, prefix)
    else:
        rules = load_mapping_file(mapping_file, prefix) if mapping_file else MappingRules(prefix=prefix)

    return Settings(
        segment_write_key=get("SEGMENT_WRITE_KEY"),
        segment_host=segment_host.rstrip("/"),
        webhook_secrets=secrets,
        database_url=normalize_database_url(get("DATABASE_URL") or DEFAULT_DATABASE_URL),
        port=_int(get, "PORT", 8000, 1, 65535),
        web_concurrency=_int(get, "WEB_CONCURRENCY", 2, 1, 64),
        rules=rules,
        refiner_api_key=get("REFINER_API_KEY"),
        refiner_api_url=refiner_api_url,
        log_level=log_level,
        retention_days=_int(get, "REFINER_RETENTION_DAYS", 7, 1, 3650),
        segment_shared_secret=shared_secret,
        refiner_api_concurrency=_int(get, "REFINER_API_CONCURRENCY", 32, 1, 64),
        admin_password=admin_password,
        alert_webhook_url=alert_url,
        alert_pending_seconds=_int(get, "ALERT_PENDING_SECONDS", 900, 1, 7 * 86400),
        suppression_key=check_key(get("REFINER_SUPPRESSION_KEY")),
    )


def check_key(value: str | None) -> str | None:
    """REFINER_SUPPRESSION_KEY as config reads it: unset, or at least MIN_KEY_LENGTH characters."""
    if value is not None and len(value) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"REFINER_SUPPRESSION_KEY must be at least {MIN_KEY_LENGTH} characters; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return value


def key_of(settings: Settings) -> bytes | None:
    """The suppression list's HMAC key: REFINER_SUPPRESSION_KEY, else one derived from the first of
    REFINER_WEBHOOK_SECRET's tokens, SEGMENT_SHARED_SECRET, REFINER_API_KEY that is set; None when none is."""
    if settings.suppression_key:
        secret = settings.suppression_key
    else:
        first_token = settings.webhook_secrets[0] if settings.webhook_secrets else None
        secret = next((c for c in (first_token, settings.segment_shared_secret, settings.refiner_api_key) if c), None)
        if secret is None:
            return None
    # Derived, not the secret itself: the list's key is not a token the webhook accepts.
    return hmac.new(secret.encode("utf-8"), b"refiner-source suppression list", hashlib.sha256).digest()


def check_directions(present: set[str]) -> None:
    """Raise ConfigError, in one line, unless at least one direction's pair of variables is set and
    no pair is half set. REFINER_API_KEY alone is no half pair: backfill uses it without Segment -> Refiner."""
    to_segment, to_refiner = DIRECTIONS[SEGMENT].variables, DIRECTIONS[REFINER].variables
    half = [pair for pair in (to_segment,) if 0 < len(present & set(pair)) < 2]
    if half:
        (pair,) = half
        (missing,) = [name for name in pair if name not in present]
        (given,) = [name for name in pair if name in present]
        raise ConfigError(
            f"{missing} is not set: {DIRECTIONS[SEGMENT].arrow} needs it beside {given} ({_REQUIRED_HINTS[missing]}); "
            f"for {DIRECTIONS[REFINER].arrow} alone, unset {given} and set {' and '.join(to_refiner)}"
        )
    if not (set(to_segment) <= present or set(to_refiner) <= present):
        needs = [
            f"{direction.arrow} needs {' and '.join(name for name in direction.variables if name not in present)}"
            for direction in DIRECTIONS.values()
        ]
        raise ConfigError(f"no direction is on, so there is nothing to do: {'; '.join(needs)} (set one pair, or both)")


_REQUIRED_HINTS = {
    "SEGMENT_WRITE_KEY": "set it to the write key of your Segment source (Connections > Sources > Settings > API Keys)",
    "REFINER_WEBHOOK_SECRET": "set it to a long random token and put the same token in Refiner's webhook URL as ?token=...",
    "REFINER_API_KEY": "set it to your Refiner project's REST API key, which backfill reads responses with",
    "SEGMENT_SHARED_SECRET": "set it to the shared secret of Segment's Webhooks destination",
}


def _int(get, name: str, default: int, low: int, high: int) -> int:
    raw = get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _check_http_url(name: str, value: str, example: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL such as {example}, got {value!r}")


def normalize_database_url(url: str) -> str:
    """Accept what Heroku and users write and return a SQLAlchemy URL for the drivers we ship."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"DATABASE_URL must look like sqlite:///path.db or postgres://user@host/db, got {url!r}")
    scheme = scheme.lower()
    if scheme in ("postgres", "postgresql", "postgresql+psycopg"):
        return "postgresql+psycopg://" + rest
    if scheme == "sqlite":
        if rest in ("", "/", "/:memory:") or rest.startswith("/:memory:"):
            raise ConfigError(
                "DATABASE_URL: an in-memory SQLite database would lose everything; give a file, such as sqlite:///refiner-source.db"
            )
        if not rest.startswith("/"):
            raise ConfigError(
                f"DATABASE_URL {url!r} names no file: SQLite URLs have three slashes before a relative path "
                f"(sqlite:///{rest}) and four before an absolute one (sqlite:////var/data/refiner-source.db)"
            )
        return "sqlite://" + rest
    raise ConfigError(f"DATABASE_URL must start with sqlite:// or postgres:// (or postgresql://), got {scheme}://")


def settings_from(overrides: Mapping[str, Any] | Settings | None) -> Settings:
    """The settings create_app() runs with: the environment, or a test's Settings or overrides."""
    if isinstance(overrides, Settings):
        return overrides
    settings = load_settings(directions=True) if overrides is None else Settings()
    if overrides:
        settings = Settings(**{**settings.__dict__, **overrides})
    return settings
