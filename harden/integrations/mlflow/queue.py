"""The hook's persistent job queue: one SQLite file, so a restart or a crash loses nothing.

Three tables:
- `deliveries`: every accepted webhook delivery id (replay protection, and proof that
  none was lost); pruned once older than the timestamp tolerance, when a replay would
  be refused as stale anyway.
- `jobs`: `scan` jobs, one per model version (the unique key makes a version run once
  however many events name it), and `alias` jobs, one per alias event, run only after
  the scan of their version finished.
- `alias_holders`: the last clean version seen holding each alias, where a blocked alias
  is moved back to.

A worker *leases* a job (owner + expiry, renewed while it runs). A job whose lease ran out,
or whose owner process on this host is gone, goes back to `pending`, so killing a worker
mid-job and starting another completes the job.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    received_at REAL NOT NULL,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    alias TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    child_pid INTEGER,
    created_at REAL NOT NULL,
    finished_at REAL,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE TABLE IF NOT EXISTS alias_holders (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version TEXT NOT NULL,
    PRIMARY KEY (name, alias)
);
"""


@dataclass
class Job:
    id: int
    key: str
    kind: str  # scan | alias
    name: str
    version: str
    alias: str | None
    state: str
    attempts: int
    owner: str | None
    child_pid: int | None
    result: dict[str, Any] | None
    error: str | None

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def scan_key(name: str, version: str) -> str:
    return f"scan:{name}/{version}"


def worker_id(index: int = 0) -> str:
    """host:pid/index, so that a restarted worker can tell a dead owner on its own host."""
    return f"{socket.gethostname()}:{os.getpid()}/{index}"


def _owner_dead(owner: str | None) -> bool:
    host, _, pid = (owner or "").split("/")[0].rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's worker: only its lease expiry tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) != os.getpid() and _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


class JobQueue:
    """The queue file; every method opens its own connection, so threads and processes may share it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def accept(self, delivery_id: str, event: str, jobs: list[dict[str, str | None]], outcome: str) -> bool:
        """Record a delivery and its jobs in one transaction; False when the delivery id was seen before."""
        now = time.time()
        with self._transaction() as conn:
            try:
                conn.execute("INSERT INTO deliveries VALUES (?, ?, ?, ?)", (delivery_id, now, event, outcome))
            except sqlite3.IntegrityError:
                return False
            for job in jobs:
                conn.execute("INSERT OR IGNORE INTO jobs (key, kind, name, version, alias, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                             (job["key"], job["kind"], job["name"], job["version"], job.get("alias"), now))
        return True

    def prune_deliveries(self, older_than_s: float) -> int:
        with self._transaction() as conn:
            return conn.execute("DELETE FROM deliveries WHERE received_at < ?", (time.time() - older_than_s,)).rowcount

    def reclaim(self) -> int:
        """Put jobs of dead or expired workers back to pending; returns how many."""
        now = time.time()
        with self._transaction() as conn:
            stale = [row["id"] for row in conn.execute("SELECT id, owner, lease_until FROM jobs WHERE state = ?", (RUNNING,))
                     if row["lease_until"] < now or _owner_dead(row["owner"])]
            conn.executemany("UPDATE jobs SET state = ?, owner = NULL, lease_until = NULL WHERE id = ?", [(PENDING, i) for i in stale])
        return len(stale)

    def claim(self, owner: str, lease_s: float) -> Job | None:
        """Lease the oldest runnable job: scans first come first; an alias job waits for its version's scan."""
        with self._transaction() as conn:
            row = conn.execute(
                """SELECT * FROM jobs j WHERE state = ? AND (kind = 'scan' OR NOT EXISTS (
                       SELECT 1 FROM jobs s WHERE s.key = 'scan:' || j.name || '/' || j.version AND s.state IN (?, ?)))
                   ORDER BY id LIMIT 1""", (PENDING, PENDING, RUNNING)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE jobs SET state = ?, owner = ?, lease_until = ?, attempts = attempts + 1, child_pid = NULL WHERE id = ?",
                         (RUNNING, owner, time.time() + lease_s, row["id"]))
        return self.get(row["id"])

    def renew(self, job_id: int, owner: str, lease_s: float, child_pid: int | None = None) -> bool:
        """Extend a lease; False when the job was taken away (the worker must stop)."""
        with self._transaction() as conn:
            return conn.execute("UPDATE jobs SET lease_until = ?, child_pid = COALESCE(?, child_pid) WHERE id = ? AND owner = ? AND state = ?",
                                (time.time() + lease_s, child_pid, job_id, owner, RUNNING)).rowcount == 1

    def release(self, job_id: int, owner: str) -> None:
        """Give a job back unfinished (worker shutting down); it does not count as an attempt."""
        with self._transaction() as conn:
            conn.execute("UPDATE jobs SET state = ?, owner = NULL, lease_until = NULL, attempts = attempts - 1 WHERE id = ? AND owner = ?",
                         (PENDING, job_id, owner))

    def finish(self, job_id: int, owner: str, state: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE jobs SET state = ?, result = ?, error = ?, finished_at = ?, owner = NULL, lease_until = NULL "
                         "WHERE id = ? AND owner = ?",
                         (state, json.dumps(result) if result is not None else None, error, time.time(), job_id, owner))

    def get(self, job_id: int) -> Job:
        with self._connect() as conn:
            return _job(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def jobs(self) -> list[Job]:
        with self._connect() as conn:
            return [_job(row) for row in conn.execute("SELECT * FROM jobs ORDER BY id")]

    def counts(self) -> dict[str, int]:
        """Jobs per state plus accepted deliveries: what `GET /healthz` reports."""
        with self._connect() as conn:
            counts = {state: 0 for state in (PENDING, RUNNING, DONE, FAILED)}
            counts.update({row[0]: row[1] for row in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")})
            counts["deliveries"] = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
            return counts

    def alias_holder(self, name: str, alias: str) -> str | None:
        with self._connect() as conn:
            row = conn.execute("SELECT version FROM alias_holders WHERE name = ? AND alias = ?", (name, alias)).fetchone()
            return row[0] if row else None

    def set_alias_holder(self, name: str, alias: str, version: str) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO alias_holders VALUES (?, ?, ?)", (name, alias, version))


def _job(row: sqlite3.Row) -> Job:
    return Job(row["id"], row["key"], row["kind"], row["name"], row["version"], row["alias"], row["state"], row["attempts"],
               row["owner"], row["child_pid"], json.loads(row["result"]) if row["result"] else None, row["error"])
