"""The naive bridge: what one writes first. segment-analytics-python's default asynchronous client,
called from the request; messages wait in its in-memory queue (10,000 at most) and are lost with
the process, or dropped when the queue is full."""

import os

from flask import Flask, jsonify, request
from segment.analytics.client import Client


def create_app() -> Flask:
    app = Flask(__name__)
    client = Client(os.environ["SEGMENT_WRITE_KEY"], host=os.environ.get("SEGMENT_HOST"), gzip=True)  # created after the fork

    @app.post("/webhooks/refiner")
    def receive():
        body = request.get_json(force=True)
        response = body["response"]
        user = {"user_id": body.get("remote_id"), "anonymous_id": None if body.get("remote_id") else body.get("uuid")}
        traits = {f"refiner_{k}": v for k, v in (response.get("data") or {}).items() if v is not None}
        message_id = f"refiner-{response['uuid']}"
        client.identify(traits=traits, message_id=message_id + "-identify", **user)
        account = body.get("account") or {}
        if account.get("remote_id"):
            client.group(group_id=account["remote_id"], traits=account.get("attributes") or {}, message_id=message_id + "-group", **user)
        properties = {"survey_id": (body.get("form") or {}).get("uuid"), "response_id": response["uuid"], **traits}
        client.track(event="Survey Completed", properties=properties, message_id=message_id + "-track", **user)
        return jsonify({"status": "accepted", "response_id": response["uuid"]}), 202

    return app
