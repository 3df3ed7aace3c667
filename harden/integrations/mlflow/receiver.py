"""The webhook receiver: verify, de-duplicate, queue, answer, all within milliseconds.

MLflow 3 signs each delivery (mlflow/webhooks/delivery.py, `_generate_hmac_signature`):
`X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, "<delivery id>.<timestamp>.<raw body>")>`
with `X-MLflow-Delivery-Id` (uuid4) and `X-MLflow-Timestamp` (unix seconds). The receiver
checks the signature over the raw bytes (never re-serialised) in constant time, refuses
timestamps outside the tolerance and delivery ids it has already accepted, and only then
parses the body. Scans never run here: the event becomes a job in the SQLite queue and
the answer is 202.

Status codes: 202 queued, 200 accepted but nothing to do (own writes, other events),
400 malformed or stale, 401 bad signature, 409 replayed delivery id, 404/405/413. A bad
payload never gets a 5xx (MLflow retries those); only a failure to store the job does,
precisely so that MLflow retries it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from harden.integrations.mlflow.queue import JobQueue, scan_key

log = logging.getLogger("harden.hook")

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
MAX_BODY_BYTES = 1 << 20
# Versions harden registered itself (purified, hardened): scanning them would loop.
OWN_VERSION_TAGS = ("harden.purified_from", "harden.hardened_from")
EVENTS = ("model_version.created", "model_version_alias.created")


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's v1 signature (used by tests and by anyone replaying a delivery by hand)."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


class Rejected(Exception):
    def __init__(self, status: HTTPStatus, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Accepted:
    status: HTTPStatus
    outcome: str  # queued | ignored: <why>
    jobs: list[str]


def verify(secret: str, headers: Any, body: bytes, tolerance_s: float, now: float | None = None) -> tuple[str, str]:
    """(delivery id, timestamp) of an authentic, fresh delivery; raises `Rejected` otherwise."""
    delivery_id, timestamp, signature = (headers.get(h) for h in (DELIVERY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not (delivery_id and timestamp and signature):
        raise Rejected(HTTPStatus.UNAUTHORIZED, f"missing {DELIVERY_ID_HEADER}, {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}")
    expected = sign(secret, delivery_id, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate.strip()) for candidate in signature.split(" ")):
        raise Rejected(HTTPStatus.UNAUTHORIZED, "signature does not match")
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        raise Rejected(HTTPStatus.BAD_REQUEST, "timestamp is not unix seconds") from None
    if abs(age) > tolerance_s:
        raise Rejected(HTTPStatus.BAD_REQUEST, f"timestamp is {age:.0f} s off (tolerance {tolerance_s:.0f} s)")
    return delivery_id, timestamp


def plan_jobs(payload: Any, delivery_id: str) -> tuple[str, list[dict[str, str | None]], str]:
    """(event, jobs, outcome) for a parsed body; raises `Rejected` for a malformed one."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise Rejected(HTTPStatus.BAD_REQUEST, "body is not an MLflow webhook payload")
    event = f"{payload.get('entity')}.{payload.get('action')}"
    data = payload["data"]
    if event == "model_version_tag.set" and str(data.get("key", "")).startswith("harden."):
        return event, [], "ignored: harden's own tag write"
    if event not in EVENTS:
        return event, [], "ignored: event not handled"
    name, version = data.get("name"), data.get("version")
    if not isinstance(name, str) or not name or not str(version or "").isdigit():
        raise Rejected(HTTPStatus.BAD_REQUEST, f"{event}: data needs a name and a numeric version")
    version = str(version)
    tags = data.get("tags") if isinstance(data.get("tags"), dict) else {}
    if event == "model_version.created" and any(tag in tags for tag in OWN_VERSION_TAGS):
        return event, [], "ignored: a version harden registered"
    jobs: list[dict[str, str | None]] = [{"key": scan_key(name, version), "kind": "scan", "name": name, "version": version}]
    if event == "model_version_alias.created":
        alias = data.get("alias")
        if not isinstance(alias, str) or not alias:
            raise Rejected(HTTPStatus.BAD_REQUEST, f"{event}: data needs an alias")
        jobs.append({"key": f"alias:{delivery_id}", "kind": "alias", "name": name, "version": version,
                     "alias": alias})
    return event, jobs, "queued"


def receive(queue: JobQueue, secret: str, headers: Any, body: bytes, tolerance_s: float) -> Accepted:
    """Everything between the socket and the answer (the HTTP handler only moves bytes)."""
    delivery_id, _ = verify(secret, headers, body, tolerance_s)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Rejected(HTTPStatus.BAD_REQUEST, "body is not JSON") from None
    event, jobs, outcome = plan_jobs(payload, delivery_id)
    if not queue.accept(delivery_id, event, jobs, outcome):
        raise Rejected(HTTPStatus.CONFLICT, f"delivery {delivery_id} was already received")
    status = HTTPStatus.ACCEPTED if jobs else HTTPStatus.OK
    log.info("%s %s: %s", event, delivery_id, outcome)
    return Accepted(status, outcome, [job["key"] for job in jobs])  # type: ignore[misc]


class _Handler(BaseHTTPRequestHandler):
    server: "HookServer"
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") not in ("", "/webhook"):
            return self._answer(HTTPStatus.NOT_FOUND, {"error": "POST webhooks to /webhook"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._answer(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
        if length > MAX_BODY_BYTES:
            return self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"}, close=True)
        body = self.rfile.read(length)
        try:
            accepted = receive(self.server.queue, self.server.secret, self.headers, body, self.server.tolerance_s)
        except Rejected as exc:
            log.warning("rejected delivery %s: %s", self.headers.get(DELIVERY_ID_HEADER), exc.reason)
            return self._answer(exc.status, {"error": exc.reason})
        except Exception as exc:  # noqa: BLE001 - storage failed: 503 so that MLflow retries
            log.exception("could not queue a delivery")
            return self._answer(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"could not queue: {type(exc).__name__}"})
        self._answer(accepted.status, {"status": accepted.outcome, "jobs": accepted.jobs})

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/") == "/healthz":
            return self._answer(HTTPStatus.OK, {"status": "ok", **self.server.queue.counts()})
        self._answer(HTTPStatus.NOT_FOUND, {"error": "GET /healthz"})

    def _answer(self, status: HTTPStatus, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s " + format, self.address_string(), *args)


class HookServer(ThreadingHTTPServer):
    """A threaded HTTP server bound to the queue; `serve_in_thread` for embedding."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, queue: JobQueue, secret: str, tolerance_s: float = 300.0):
        super().__init__((host, port), _Handler)
        self.queue, self.secret, self.tolerance_s = queue, secret, tolerance_s

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/webhook"

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="harden-hook-http", daemon=True)
        thread.start()
        return thread
