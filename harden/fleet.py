"""`harden scan-registry`: scan many registered versions in parallel, once per harden version.

Versions matching a registry filter are listed (paged), those already scanned by this
harden version (`harden.scan.harden_version` tag) are skipped, and the rest are scanned
by an executor: `local` (a process pool on this machine) or `ray` (a Ray cluster, local or
`ray://head:10001`; Ray is imported only here). Each task is `scan_and_record`, the same
code path as `harden scan`, so every version gets its scan run and tags. One summary
(`harden.scan-registry/1`) covers the whole fleet, cached verdicts included, and is logged
to a `scan-registry` run.

Library use::

    from harden.fleet import scan_registry
    result = scan_registry("name LIKE 'fraud-%'", data="/shared/clean.npz", executor="ray", workers=8)
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable

from harden import __version__, tracking
from harden.data.sources import is_local_path
from harden.errors import EXIT_ERROR, EXIT_FINDINGS, EXIT_NOTHING_SCANNABLE, EXIT_OK, HardenError
from harden.report import CheckOutcome, Finding, Report, Table

EXECUTORS = ("local", "ray")
FLAGGED = ("backdoor", "unsafe_artifact")


@dataclass
class VersionScan:
    """One version's outcome: scanned now, taken from the cache (tags), or an error."""

    model_uri: str
    status: str  # scanned | cached | error
    verdict: str | None = None
    p_backdoor: float | None = None
    run_id: str | None = None
    duration_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the task (all threads): the cost to plan capacity with, whatever the load
    error: str | None = None


@dataclass
class FleetResult:
    items: list[VersionScan]
    executor: str
    workers: int
    duration_s: float
    filter: str | None

    @property
    def scanned(self) -> list[VersionScan]:
        return [i for i in self.items if i.status == "scanned"]

    @property
    def throughput_per_min(self) -> float:
        return 60.0 * len(self.scanned) / self.duration_s if self.scanned and self.duration_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if any(i.status == "error" for i in self.items):
            return EXIT_ERROR
        if any(i.verdict in FLAGGED for i in self.items):
            return EXIT_FINDINGS
        # as `harden scan` exits: a version that could not be judged is not a clean one
        return EXIT_NOTHING_SCANNABLE if any(i.verdict == "inconclusive" for i in self.items) else EXIT_OK

    def report(self) -> Report:
        counts = {s: sum(i.status == s for i in self.items) for s in ("scanned", "cached", "error")}
        verdicts: dict[str, int] = {}
        for item in self.items:
            if item.verdict:
                verdicts[item.verdict] = verdicts.get(item.verdict, 0) + 1
        payload = {"filter": self.filter, "executor": self.executor, "workers": self.workers, "versions": len(self.items), **counts,
                   "verdicts": verdicts, "duration_s": round(self.duration_s, 3), "throughput_per_min": round(self.throughput_per_min, 2),
                   "items": [asdict(i) for i in self.items], "harden_version": __version__}
        rows = [[i.model_uri, i.status, i.verdict, i.p_backdoor, i.duration_s, i.error or ""] for i in self.items]
        title = (f"harden scan-registry: {len(self.items)} version(s), {counts['scanned']} scanned, {counts['cached']} cached, "
                 f"{verdicts.get('backdoor', 0) + verdicts.get('unsafe_artifact', 0)} flagged")
        return Report("harden.scan-registry/1", title, payload,
                      [Table("Versions", ["model", "status", "verdict", "p_backdoor", "seconds", "error"], rows)],
                      checks=[_check(i) for i in self.items])


def _check(item: VersionScan) -> CheckOutcome:
    """One JUnit case / SARIF result per version."""
    if item.status == "error":
        return CheckOutcome(item.model_uri, "error", item.error or "", item.duration_s)
    message = f"{item.verdict} (p_backdoor {item.p_backdoor})" + (" [cached]" if item.status == "cached" else "")
    if item.verdict in FLAGGED:
        rule = "harden.backdoor.trigger-inversion" if item.verdict == "backdoor" else "harden.artifact.unsafe-pickle"
        finding = Finding(rule, "error", f"{item.model_uri}: {message}", 9.0, {"model_uri": item.model_uri, "run_id": item.run_id})
        return CheckOutcome(item.model_uri, "failed", message, item.duration_s, [finding])
    return CheckOutcome(item.model_uri, "passed" if item.verdict == "clean" else "skipped", message, item.duration_s)


def list_versions(filter_string: str | None, max_versions: int | None = None) -> list[tuple[str, dict[str, str]]]:
    """(models:/name/version, tags) for every matching version, following the registry's pages."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client, found, token = MlflowClient(), [], None
    try:
        while True:
            page = client.search_model_versions(filter_string, max_results=1000, page_token=token)
            found += [(f"models:/{mv.name}/{mv.version}", dict(mv.tags)) for mv in page]
            token = page.token
            if not token or (max_versions and len(found) >= max_versions):
                break
    except MlflowException as exc:
        raise HardenError(f"--filter {filter_string!r}: {str(exc.message).splitlines()[0]}") from None
    found.sort(key=lambda item: (item[0].rsplit("/", 1)[0], int(item[0].rsplit("/", 1)[1])))
    return found[:max_versions] if max_versions else found


def is_current(tags: dict[str, str], checks: list[str] | None = None) -> bool:
    """Scanned by this harden version already, with every check asked for now."""
    from harden.scan import answers

    return (tags.get("harden.scan.harden_version") == __version__ and "harden.scan.verdict" in tags
            and answers(tags.get("harden.scan.checks", "").split(","), checks))


def scan_version(uri: str, tracking_uri: str, scan_kwargs: dict[str, Any]) -> VersionScan:
    """The task every executor runs (module level, so it pickles to process pools and Ray)."""
    import torch

    from harden.runtime import reproducible
    from harden.scan import scan_and_record

    start, cpu = time.perf_counter(), time.process_time()
    try:
        tracking.configure(tracking_uri)
        reproducible(torch.device(scan_kwargs["device"]))
        params = {k: v for k, v in scan_kwargs.items() if k != "options"} | {"fleet": True}
        result, report = scan_and_record(uri, params, **scan_kwargs)
        return VersionScan(uri, "scanned", result.verdict, result.p_backdoor, report.payload.get("run_id"),
                           round(time.perf_counter() - start, 3), round(time.process_time() - cpu, 3))
    except Exception as exc:  # noqa: BLE001 - one bad version must not stop the fleet
        return VersionScan(uri, "error", duration_s=round(time.perf_counter() - start, 3), error=f"{type(exc).__name__}: {exc}"[:500])


def _cached(uri: str, tags: dict[str, str]) -> VersionScan:
    p = tags.get("harden.scan.p_backdoor")
    return VersionScan(uri, "cached", tags["harden.scan.verdict"], float(p) if p else None, tags.get("harden.scan.run_id"))


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_local(uris: list[str], task_args: tuple, workers: int) -> Iterable[VersionScan]:
    """A spawn-started process pool (torch and fork do not mix); CPU threads split between workers."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_limit_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(scan_version, uri, *task_args) for uri in uris]
        for future in as_completed(futures):
            yield future.result()


def run_ray(uris: list[str], task_args: tuple, workers: int, address: str | None, gpus_per_task: float = 0.0) -> Iterable[VersionScan]:
    """One Ray task per version (1 CPU each); `address=None` starts a local Ray with `workers` CPUs."""
    try:
        import ray
    except ImportError:
        raise HardenError("--executor ray needs Ray: pip install 'ray[default]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=1)(scan_version)
        pending = [task.remote(uri, *task_args) for uri in uris]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started_here:
            ray.shutdown()


def scan_registry(
    filter_string: str | None = None,
    *,
    data: str | None = None,
    checks: list[str] | None = None,
    max_steps: int | None = None,
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
    device: str = "cpu",
    rescan: bool = False,
    max_versions: int | None = None,
    on_result: Callable[[VersionScan], None] | None = None,
) -> FleetResult:
    """Scan every matching version not yet scanned by this harden version; cached verdicts are reported too."""
    import mlflow

    if executor not in EXECUTORS:
        raise HardenError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise HardenError("--workers must be at least 1")
    if data and is_local_path(data):
        data = str(Path(data).resolve())  # workers run elsewhere (other cwd, other processes)
    start = time.perf_counter()
    versions = list_versions(filter_string, max_versions)
    items = [_cached(uri, tags) for uri, tags in versions if not rescan and is_current(tags, checks)]
    todo = [uri for uri, tags in versions if rescan or not is_current(tags, checks)]
    options = {"inversion": {"max_steps": max_steps}} if max_steps else {}
    scan_kwargs = {"data": data, "checks": checks, "device": device, "options": options}
    task_args = (mlflow.get_tracking_uri(), scan_kwargs)
    if todo:
        results = run_local(todo, task_args, workers) if executor == "local" else \
            run_ray(todo, task_args, workers, address, 1.0 if device.startswith("cuda") else 0.0)
        for item in results:
            items.append(item)
            if on_result is not None:
                on_result(item)
    items.sort(key=lambda i: (i.model_uri.rsplit("/", 1)[0], int(i.model_uri.rsplit("/", 1)[1])))
    return FleetResult(items, executor, workers, time.perf_counter() - start, filter_string)
