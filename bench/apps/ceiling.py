"""The ceiling: a Flask endpoint that only parses the JSON. Nothing can ingest faster under gunicorn."""

from flask import Flask, jsonify, request


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/webhooks/refiner")
    def receive():
        body = request.get_json(force=True)
        return jsonify({"status": "accepted", "response_id": body["response"]["uuid"]}), 202

    return app
