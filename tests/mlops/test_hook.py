"""The registry hook against a real `mlflow server`, a real receiver and real scans."""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from harden import __version__
from harden.integrations.mlflow import HookServer, JobQueue, sign
from tests.mlops.conftest import SECRET, SECRET_ENV, register_copy, wait_for


def post(url: str, payload: dict | bytes, *, secret: str = SECRET, delivery_id: str | None = None, timestamp: int | None = None,
         signature: str | None = None) -> tuple[int, dict, float]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()) if timestamp is None else timestamp)
    headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts,
               "X-MLflow-Signature": signature or sign(secret, delivery_id, ts, body)}
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=10) as response:
            return response.status, json.loads(response.read()), time.perf_counter() - start
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), time.perf_counter() - start


def created(name: str, version: str, tags: dict | None = None) -> dict:
    return {"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00",
            "data": {"name": name, "version": version, "source": "models:/m-1", "run_id": "r", "tags": tags or {}, "description": None}}


@pytest.fixture
def receiver(tmp_path):
    """The receiver alone (no worker), in this process, on a free port."""
    queue = JobQueue(tmp_path / "queue.db")
    server = HookServer("127.0.0.1", 0, queue, SECRET, tolerance_s=300)
    server.serve_in_thread()
    yield server
    server.shutdown()
    server.server_close()


def test_receiver_verifies_signature_timestamp_and_delivery_id(receiver):
    url, queue = receiver.url, receiver.queue
    latencies = []
    for version in range(1, 21):
        status, body, elapsed = post(url, created("fraud-cnn", str(version)))
        assert status == 202 and body["jobs"] == [f"scan:fraud-cnn/{version}"]
        latencies.append(elapsed)
    assert statistics.median(latencies) < 0.1 and sorted(latencies)[-2] < 0.1  # 2xx within 100 ms

    def refused(expected: int, **kwargs) -> None:
        before = queue.counts()
        status, body, _ = post(url, kwargs.pop("payload", created("fraud-cnn", "99")), **kwargs)
        assert status == expected, body
        assert queue.counts() == before  # nothing queued, nothing recorded

    refused(401, secret="forged-secret")
    refused(401, signature="sha256=" + "0" * 64)  # the 3.3-era format is not accepted
    refused(400, timestamp=int(time.time()) - 3600)  # correctly signed, but stale
    refused(400, payload=b"{not json")  # a bad payload is a 4xx, never a 5xx
    refused(400, payload={"entity": "model_version", "action": "created", "data": {"name": "x", "version": "one"}})

    replayed = str(uuid.uuid4())
    assert post(url, created("fraud-cnn", "50"), delivery_id=replayed)[0] == 202
    refused(409, payload=created("fraud-cnn", "50"), delivery_id=replayed)

    own_tag = {"entity": "model_version_tag", "action": "set", "timestamp": "t",
               "data": {"name": "fraud-cnn", "version": "1", "key": "harden.scan.verdict", "value": "clean"}}
    assert post(url, own_tag)[:2] == (200, {"status": "ignored: harden's own tag write", "jobs": []})
    status, body, _ = post(url, created("fraud-cnn", "51", {"harden.purified_from": "models:/fraud-cnn/50"}))
    assert (status, body["status"]) == (200, "ignored: a version harden registered")
    # the same version named twice is still one job
    assert post(url, created("fraud-cnn", "50"))[0] == 202
    counts = queue.counts()
    assert counts["pending"] == 21 and counts["deliveries"] == 24


def test_backdoored_version_is_tagged_alias_blocked_and_survives_a_worker_kill(demo, mlflow_server, start_hook, run_cli, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    client = mlflow_server.client()
    hook = start_hook(tmp_path / "queue.db", "--data", str(demo.data_dir / "clean.npz"), "--block-alias", "production")
    code, out, err = run_cli("hook", "register", "--url", hook.url, "--secret-env", SECRET_ENV, "--name", "harden-e2e",
                             "--tracking-uri", mlflow_server.url, "--format", "json")  # conftest restores the session's store
    assert code == 0, err
    webhook = json.loads(out)
    assert set(webhook["events"]) == {"model_version.created", "model_version_alias.created"}
    forged = client.create_webhook("harden-forged", hook.url, ["model_version.created"], secret="not-the-secret")
    try:
        # MLflow signs with the wrong secret: refused. With the right one: accepted (a test payload).
        assert client.test_webhook(forged.webhook_id).response_status == 401
        assert client.test_webhook(webhook["webhook_id"]).response_status == 202
        client.delete_webhook(forged.webhook_id)
        time.sleep(1.2)  # the server caches webhook lists for 1 s

        mv = register_copy(mlflow_server, demo, "hook-e2e", alias="production")  # promoted right away
        queue = JobQueue(hook.queue_path)
        key = f"scan:hook-e2e/{mv.version}"
        job = wait_for(lambda: next((j for j in queue.jobs() if j.key == key and j.child_pid), None), 120, "the scan to start")
        time.sleep(2)
        hook.kill()  # mid-scan
        wait_for(lambda: not _alive(job.child_pid), 10, "the scan subprocess to die with its worker")
        assert queue.get(job.id).state == "running"
        assert "harden.scan.verdict" not in client.get_model_version("hook-e2e", mv.version).tags

        port = int(hook.url.rsplit(":", 1)[1].split("/")[0])  # same URL: the webhook stays valid
        start_hook(hook.queue_path, "--data", str(demo.data_dir / "clean.npz"), "--block-alias", "production", port=port)
        done = wait_for(lambda: all(j.state in ("done", "failed") for j in queue.jobs() if j.name == "hook-e2e") and queue.jobs(), 600, "jobs")
        jobs = {j.kind: j for j in queue.jobs() if j.name == "hook-e2e"}
        assert done and jobs["scan"].state == "done" and jobs["scan"].attempts == 2
        tags = client.get_model_version("hook-e2e", mv.version).tags
        assert tags["harden.scan.verdict"] == "backdoor" and tags["harden.scan.harden_version"] == __version__
        assert float(tags["harden.scan.p_backdoor"]) >= 0.5
        # --block-alias: the flagged version lost `production` (no earlier clean holder, so it is removed)
        assert jobs["alias"].state == "done" and jobs["alias"].result["action"].startswith("removed")
        assert "production" not in client.get_registered_model("hook-e2e").aliases
        assert tags["harden.hook.alias_blocked"] == "production"
        # the example payload of test_webhook named a model that does not exist: done, nothing tagged
        assert next(j for j in queue.jobs() if j.name != "hook-e2e").result == {"skipped": "the version no longer exists"}
    finally:
        client.delete_webhook(webhook["webhook_id"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_burst_of_200_events_loses_none_and_scans_each_version_once(demo, mlflow_server, start_hook, tmp_path):
    import sqlite3

    client = mlflow_server.client()
    hook = start_hook(tmp_path / "queue.db", "--checks", "artifact", "--workers", "2")
    events = ["model_version.created", "model_version_alias.created", "model_version_tag.set"]
    webhook = client.create_webhook("harden-burst", hook.url, events, secret=SECRET)
    try:
        time.sleep(1.2)  # the server caches webhook lists for 1 s
        versions = [register_copy(mlflow_server, demo, "hook-burst").version for _ in range(4)]
        for i in range(98):  # promotions and user tags, as fast as the client can send them
            client.set_registered_model_alias("hook-burst", "staging", versions[i % 4])
            client.set_model_version_tag("hook-burst", versions[i % 4], "team", f"t{i}")
        queue = JobQueue(hook.queue_path)

        def outcomes() -> dict[str, int]:
            with sqlite3.connect(hook.queue_path) as conn:
                return dict(conn.execute("SELECT outcome, COUNT(*) FROM deliveries GROUP BY outcome").fetchall())

        def settled() -> bool:
            by_outcome = outcomes()
            mine = sum(n for outcome, n in by_outcome.items() if outcome != "ignored: harden's own tag write")
            return mine >= 200 and by_outcome.get("ignored: harden's own tag write", 0) >= 16 and \
                all(j.state in ("done", "failed") for j in queue.jobs())

        wait_for(settled, 600, "200 deliveries and every job")
        by_outcome = outcomes()
        assert by_outcome["queued"] == 4 + 98 and by_outcome["ignored: event not handled"] == 98  # none lost, none doubled
        assert by_outcome["ignored: harden's own tag write"] == 20  # 5 scan tags per version, each one event
        scans = [j for j in queue.jobs() if j.kind == "scan"]
        assert sorted(j.version for j in scans) == sorted(versions)
        assert all(j.state == "done" and j.attempts == 1 for j in scans)
        assert all(j.state == "done" for j in queue.jobs() if j.kind == "alias")
        experiment = client.get_experiment_by_name("harden")
        for version in versions:
            runs = client.search_runs([experiment.experiment_id], "tags.`harden.command` = 'scan' and "
                                      f"tags.`harden.source_model_uri` = 'models:/hook-burst/{version}'")
            assert len(runs) == 1  # each version scanned exactly once
            tags = client.get_model_version("hook-burst", version).tags
            assert tags["harden.scan.run_id"] == runs[0].info.run_id and tags["harden.scan.verdict"] == "inconclusive"
    finally:
        client.delete_webhook(webhook.webhook_id)


@pytest.mark.parametrize("args, message", [
    (["--purify-set", "epochz=3"], "unknown setting(s) epochz"),
    (["--purify-method", "nft", "--purify-set", "steps=many"], "expected int"),
    (["--purify-set", "inversion.max_stepz=9"], "unknown inversion setting(s) max_stepz"),
])
def test_serve_refuses_bad_purify_settings_before_listening(run_cli, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    code, _, err = run_cli("hook", "serve", "--port", "0", "--secret-env", SECRET_ENV, "--queue", tmp_path / "q.db",
                           "--data", "clean.npz", "--on-backdoor", "purify", *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "q.db").exists()
