"""The hook's worker: takes jobs from the queue and runs harden on them as subprocesses.

Each scan or purification is a `python -m harden ...` child process: a crash, a leak or
a kill stays inside one job, and the CLI's contract (JSON report, exit codes, version
tags) is the interface. While a child runs the worker renews its lease; the child is
killed if the worker dies (Linux: parent-death signal), and the job is picked up again
by the next worker. A scan job is idempotent: a version already tagged by this harden
version is not scanned twice.

Tags the worker writes (besides the scan's `harden.scan.*`):
- `harden.hook.alias_blocked` = alias, on a flagged version the `--block-alias` was taken from;
- `harden.hook.purified_as` = the purified version's URI (`--on-backdoor purify`; purify's own
  lineage tags `harden.purified_from`, `harden.purify.acc_before/after` go on the new version);
- `harden.hook.error` = why a job failed after its last attempt.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harden import __version__, tracking
from harden.integrations.mlflow.queue import DONE, FAILED, PENDING, Job, JobQueue, worker_id
from harden.purify import DEFAULT_METHOD

log = logging.getLogger("harden.hook")

FLAGGED = ("backdoor", "unsafe_artifact")
ON_BACKDOOR = ("tag", "purify")


@dataclass
class HookSettings:
    """What the worker does with a version; the defaults only scan and tag."""

    data: str | None = None  # the defender's clean data (scan --data, purify --data)
    checks: str | None = None  # scan --checks (default: all that apply)
    on_backdoor: str = "tag"  # tag | purify
    purify_method: str = DEFAULT_METHOD
    purify_settings: dict[str, str] = field(default_factory=dict)  # purify --set KEY=VALUE
    purify_register_as: str | None = None  # default: the flagged version's own registered model
    block_alias: str | None = None
    tracking_uri: str | None = None
    lease_s: float = 30.0
    max_attempts: int = 3
    job_timeout_s: float = 3600.0
    poll_s: float = 0.5


class JobFailed(Exception):
    """A job step failed; retried until `max_attempts`."""


class LeaseLost(Exception):
    """Another worker took the job over (our lease expired): stop without touching it."""


def _parent_death_signal() -> Any:
    """preexec_fn that makes a child die with the worker (Linux prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only makes one call
    return lambda: libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


class Worker:
    def __init__(self, queue: JobQueue, settings: HookSettings, index: int = 0):
        self.queue, self.settings = queue, settings
        self.owner = worker_id(index)
        self._preexec = _parent_death_signal()

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set; an unfinished job is handed back for the next worker."""
        while not stop.is_set():
            self.queue.reclaim()
            job = self.queue.claim(self.owner, self.settings.lease_s)
            if job is None:
                stop.wait(self.settings.poll_s)
                continue
            self.process(job, stop)

    def process(self, job: Job, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info("job %s (%s), attempt %d", job.key, job.model_uri, job.attempts)
        try:
            result = self._scan(job, stop) if job.kind == "scan" else self._alias(job)
        except LeaseLost:
            log.warning("job %s was taken over by another worker", job.key)
        except InterruptedError:
            self.queue.release(job.id, self.owner)
        except Exception as exc:  # noqa: BLE001 - a failing job must not stop the worker
            self._failed(job, f"{type(exc).__name__}: {exc}" if not isinstance(exc, JobFailed) else str(exc))
        else:
            self.queue.finish(job.id, self.owner, DONE, result)
            log.info("job %s done: %s", job.key, result)

    def _failed(self, job: Job, error: str) -> None:
        final = job.attempts >= self.settings.max_attempts
        log.error("job %s failed (attempt %d/%d): %s", job.key, job.attempts, self.settings.max_attempts, error)
        self.queue.finish(job.id, self.owner, FAILED if final else PENDING, error=error)
        if final and job.kind == "scan":
            self._client().set_model_version_tag(job.name, job.version, "harden.hook.error", error[:500])

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.settings.tracking_uri, self.settings.tracking_uri)

    def _tags(self, job: Job) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self._client().get_model_version(job.name, job.version).tags)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _scan(self, job: Job, stop: threading.Event) -> dict[str, Any]:
        tags = self._tags(job)
        if tags is None:
            return {"skipped": "the version no longer exists"}
        if tags.get("harden.scan.harden_version") == __version__ and "harden.scan.verdict" in tags:
            result: dict[str, Any] = {"verdict": tags["harden.scan.verdict"], "run_id": tags.get("harden.scan.run_id"), "cached": True}
        else:
            args = ["scan", job.model_uri, "--format", "json"]
            args += ["--data", self.settings.data] if self.settings.data else []
            args += ["--checks", self.settings.checks] if self.settings.checks else []
            report = self._harden(job, args, stop, ok_codes=(0, 1, 3))
            result = {"verdict": report["verdict"], "p_backdoor": report.get("p_backdoor"), "run_id": report.get("run_id")}
        if result["verdict"] == "backdoor" and self.settings.on_backdoor == "purify" and "harden.hook.purified_as" not in tags:
            result["purified_as"] = self._purify(job, stop)
        return result

    def _purify(self, job: Job, stop: threading.Event) -> str | None:
        """`harden purify` on the flagged version; the new version carries `harden.purified_from`, so its
        own `model_version.created` event is ignored. None when one of purify's guardrails refused
        the result (exit 1, nothing registered): deterministic, so not retried."""
        if not self.settings.data:
            raise JobFailed("--on-backdoor purify needs --data")
        name = self.settings.purify_register_as or job.name
        report = self._harden(job, ["purify", job.model_uri, "--data", self.settings.data, "--method", self.settings.purify_method,
                                    "--register-as", name, "--format", "json",
                                    *(arg for key, value in self.settings.purify_settings.items() for arg in ("--set", f"{key}={value}"))],
                            stop, ok_codes=(0, 1), report_flag="--report")
        uri = report.get("output_model_uri")
        if uri:
            self._client().set_model_version_tag(job.name, job.version, "harden.hook.purified_as", str(uri))
        return uri

    def _alias(self, job: Job) -> dict[str, Any]:
        """After the version's scan: take a --block-alias away from a flagged version, remember clean holders."""
        client, alias = self._client(), str(job.alias)
        if tracking.alias_holder(job.name, alias, client) != job.version:
            return {"alias": alias, "action": "none: the alias has moved on"}
        verdict = (self._tags(job) or {}).get("harden.scan.verdict")
        if verdict not in FLAGGED:
            if verdict == "clean":
                self.queue.set_alias_holder(job.name, alias, job.version)
            return {"alias": alias, "verdict": verdict, "action": "none"}
        if alias != self.settings.block_alias:
            return {"alias": alias, "verdict": verdict, "action": "none: alias not blocked"}
        previous = self.queue.alias_holder(job.name, alias)
        if previous and previous != job.version:
            client.set_registered_model_alias(job.name, alias, previous)
            action = f"moved back to version {previous}"
        else:
            client.delete_registered_model_alias(job.name, alias)
            action = "removed (no earlier clean holder known)"
        client.set_model_version_tag(job.name, job.version, "harden.hook.alias_blocked", alias)
        log.warning("%s is flagged (%s): alias %r %s", job.model_uri, verdict, alias, action)
        return {"alias": alias, "verdict": verdict, "action": action}

    def _harden(self, job: Job, args: list[str], stop: threading.Event, ok_codes: tuple[int, ...],
                report_flag: str = "--output") -> dict[str, Any]:
        """Run `python -m harden ARGS <report_flag> report.json -q` with the lease renewed; the parsed report.

        (`scan` writes its report with --output; `purify` uses --output for the model and --report for the report.)"""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.settings.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.settings.tracking_uri
        with tempfile.TemporaryDirectory(prefix="harden-hook-") as tmp:
            output, errors = Path(tmp) / "report.json", Path(tmp) / "stderr.log"
            command = [sys.executable, "-m", "harden", *args, report_flag, str(output), "-q"]
            with errors.open("wb") as stderr:
                child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                         preexec_fn=self._preexec)  # noqa: PLW1509 - one prctl call, see _parent_death_signal
            try:
                self._supervise(job, child, stop)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            if child.returncode not in ok_codes or not output.exists():
                tail = errors.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise JobFailed(f"harden {args[0]} exited {child.returncode}: {tail[0][:300]}")
            return json.loads(output.read_text())

    def _supervise(self, job: Job, child: subprocess.Popen, stop: threading.Event) -> None:
        waited, heartbeat = 0.0, max(min(self.settings.lease_s / 3, 5.0), 0.2)
        if not self.queue.renew(job.id, self.owner, self.settings.lease_s, child.pid):
            raise LeaseLost()
        while True:
            try:
                child.wait(timeout=heartbeat)
                return
            except subprocess.TimeoutExpired:
                waited += heartbeat
            if stop.is_set():
                raise InterruptedError()
            if waited > self.settings.job_timeout_s:
                raise JobFailed(f"timed out after {self.settings.job_timeout_s:.0f} s")
            if not self.queue.renew(job.id, self.owner, self.settings.lease_s):
                raise LeaseLost()
