"""`--on-backdoor purify`: a flagged version is purified by `harden purify` and the result registered."""

from __future__ import annotations

import sqlite3
import time

from harden.integrations.mlflow import JobQueue
from tests.mlops.conftest import SECRET, register_copy, wait_for


def test_on_backdoor_purify_registers_a_purified_version(demo, mlflow_server, start_hook, tmp_path):
    client = mlflow_server.client()
    hook = start_hook(tmp_path / "queue.db", "--data", str(demo.data_dir / "clean.npz"), "--on-backdoor", "purify",
                      "--purify-set", "epochs=6",
                      "--purify-set", "inversion.max_steps=60", "--purify-set", "inversion.probe_per_class=6")
    webhook = client.create_webhook("harden-purify", hook.url, ["model_version.created"], secret=SECRET)
    try:
        time.sleep(1.2)
        mv = register_copy(mlflow_server, demo, "hook-purify")
        queue = JobQueue(hook.queue_path)
        wait_for(lambda: queue.jobs() and all(j.state in ("done", "failed") for j in queue.jobs()), 1200, "scan and purify")
        (job,) = queue.jobs()  # the purified version's own created event made no job
        assert job.state == "done" and job.result["verdict"] == "backdoor", job
        source_tags = client.get_model_version("hook-purify", mv.version).tags
        new_uri = job.result["purified_as"]
        assert new_uri and source_tags["harden.hook.purified_as"] == new_uri
        new = client.get_model_version("hook-purify", new_uri.rsplit("/", 1)[1]).tags
        assert new["harden.purified_from"] == f"models:/hook-purify/{mv.version}"
        assert {"harden.purify.acc_before", "harden.purify.acc_after"} <= set(new)
        assert new["harden.method"] == "trigger-unlearn"
        with sqlite3.connect(hook.queue_path) as conn:
            outcomes = dict(conn.execute("SELECT outcome, COUNT(*) FROM deliveries GROUP BY outcome").fetchall())
        assert outcomes == {"queued": 1, "ignored: a version harden registered": 1}
    finally:
        client.delete_webhook(webhook.webhook_id)
