"""MLflow model-registry hook: every new model version is scanned, tagged and, if asked, purified.

    harden hook register --url https://hook.example.com/webhook --secret-env HARDEN_HOOK_SECRET
    harden hook serve --port 8765 --secret-env HARDEN_HOOK_SECRET --data clean.npz --block-alias production

`receiver` verifies MLflow's signed deliveries and queues jobs (`queue`, SQLite); `worker`
runs `harden scan` / `harden purify` on them and enforces the blocked alias. Library use::

    from harden.integrations.mlflow import HookSettings, serve
    serve("127.0.0.1", 8765, secret, Path("hook.db"), HookSettings(data="clean.npz"))
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Sequence

from harden.errors import TrackingError
from harden.integrations.mlflow.queue import JobQueue
from harden.integrations.mlflow.receiver import EVENTS, HookServer, sign
from harden.integrations.mlflow.worker import HookSettings, Worker

__all__ = ["EVENTS", "HookServer", "HookSettings", "JobQueue", "Worker", "register_webhook", "serve", "sign"]

log = logging.getLogger("harden.hook")


def serve(host: str, port: int, secret: str, queue_path: Path, settings: HookSettings, *, workers: int = 1,
          tolerance_s: float = 300.0, on_ready: Callable[[HookServer], None] | None = None) -> None:
    """Receive and work until interrupted (Ctrl-C or SIGTERM); queued jobs survive a restart."""
    queue = JobQueue(queue_path)
    reclaimed = queue.reclaim()
    if reclaimed:
        log.warning("re-queued %d job(s) left running by a stopped worker", reclaimed)
    server = HookServer(host, port, queue, secret, tolerance_s)
    stop = threading.Event()
    threads = [threading.Thread(target=Worker(queue, settings, i).run, args=(stop,), name=f"harden-hook-worker-{i}", daemon=True)
               for i in range(workers)]
    server.serve_in_thread()
    for thread in threads:
        thread.start()
    if on_ready is not None:
        on_ready(server)
    try:
        while not stop.wait(tolerance_s):
            queue.prune_deliveries(2 * tolerance_s)  # older ids would be refused as stale anyway
    finally:
        stop.set()
        server.shutdown()
        for thread in threads:
            thread.join(timeout=30)
        server.server_close()


def register_webhook(url: str, secret: str, events: Sequence[str] = EVENTS, name: str = "harden-hook",
                     description: str = "harden: scan every new model version"):
    """Create the registry webhook through MLflow's client (needs a tracking *server* with a SQL store)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().create_webhook(name=name, url=url, events=list(events), description=description, secret=secret)
    except MlflowException as exc:
        raise TrackingError(f"cannot create the webhook: {str(exc.message).splitlines()[0]}") from None
