"""The app's state as every route reads it, and the one shape of an error answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Response, current_app, jsonify

from refiner_source.config import Settings
from refiner_source.privacy import Suppressed
from refiner_source.store import Store
from refiner_source.store.tally import Tally


@dataclass(frozen=True)
class AppState:
    settings: Settings
    outbox: Store
    delivery_pidfile: str | None = None  # under `refiner-source serve`: where the embedded worker's pid is
    tally: Tally | None = None  # this process's counts of webhooks, for /status and /metrics
    suppressed: Suppressed | None = None  # the people `forget` erased: their events are ignored, never stored


def state() -> AppState:
    return current_app.extensions["refiner_source"]


def error(status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), status
