"""`harden scan`: artifact safety, trigger inversion, encoder inversion and the sensitivity
test, combined into one verdict a CI gate can trust.

Library use::

    from harden.scan import scan
    result = scan("models:/harden-demo@candidate", data="harden-demo-data/clean.npz")
    print(result.verdict, result.p_backdoor, result.suspect_classes)
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from harden import __version__
from harden.data import load_data
from harden.errors import EXIT_ERROR, EXIT_FINDINGS, EXIT_NOTHING_SCANNABLE, EXIT_OK, HardenError
from harden.models import ModelArtifact, fetch_model, load_model
from harden.models.normalisation import NormalisationChoice, choose_normalisation
from harden.report import Image, Report, Table
from harden.runtime import measure
from harden.scan import artifact as _artifact  # noqa: F401  (each import registers a check, in run order)
from harden.scan import classifier as _classifier  # noqa: F401
from harden.scan import encoder as _encoder  # noqa: F401
from harden.scan import sensitivity as _sensitivity  # noqa: F401
from harden.scan.base import CHECKS, ERROR, FAILED, SKIPPED, CheckResult, ScanContext

VERDICTS = ("clean", "backdoor", "unsafe_artifact", "inconclusive")
TASKS = ("classifier", "encoder")


@dataclass
class ScanResult:
    verdict: str
    p_backdoor: float | None
    suspect_classes: list[int]
    per_class: list[dict]
    checks: list[CheckResult]
    model_uri: str
    duration_s: float = 0.0
    peak_memory_mb: float = 0.0
    workdir: Path | None = None
    registered: Any = None
    input_normalisation: NormalisationChoice | None = None  # chosen by harden (models.normalisation)

    @property
    def exit_code(self) -> int:
        """0 clean, 1 backdoor or unsafe artifact, 2 a check failed to run, 3 nothing scannable."""
        if self.verdict in ("backdoor", "unsafe_artifact"):
            return EXIT_FINDINGS
        if self.verdict == "clean":
            return EXIT_OK
        return EXIT_ERROR if any(c.status == ERROR for c in self.checks) else EXIT_NOTHING_SCANNABLE

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "p_backdoor": self.p_backdoor,
            "suspect_classes": self.suspect_classes,
            "per_class": self.per_class,
            "checks": [
                {"name": c.name, "status": c.status, "message": c.message, "duration_s": c.duration_s,
                 "findings": [vars(f) for f in c.findings], "details": c.details}
                for c in self.checks
            ],
            "model_uri": self.model_uri,
            "duration_s": self.duration_s,
            "peak_memory_mb": self.peak_memory_mb,
            "input_normalisation": vars(self.input_normalisation) if self.input_normalisation else None,
            "harden_version": __version__,
        }

    def version_tags(self, run_id: str) -> dict[str, str]:
        """The summary a registered version carries; `harden_version` lets fleet scans skip it next time."""
        return {
            "harden.scan.verdict": self.verdict,
            "harden.scan.p_backdoor": "" if self.p_backdoor is None else f"{self.p_backdoor:.4f}",
            "harden.scan.run_id": run_id,
            "harden.scan.harden_version": __version__,
            "harden.scan.checks": ",".join(check.name for check in self.checks),
        }

    def report(self, sarif_location: str | None = None) -> Report:
        per_class_rows = [[c["target"], c["norm"], c["asr"], c["anomaly_index"], c["margin"], c["warp_asr"], c["stripe_asr"],
                           "yes" if c["target"] in self.suspect_classes else ""] for c in self.per_class]
        check_rows = [[c.name, c.status, c.duration_s, c.message] for c in self.checks]
        p = "-" if self.p_backdoor is None else f"{self.p_backdoor:.3f}"
        tables = [Table("Checks", ["check", "status", "seconds", "result"], check_rows)]
        if self.input_normalisation:
            tables.append(self.input_normalisation.table())
        if per_class_rows:
            tables.append(Table("Per class (trigger inversion)", ["class", "mask L1", "reversed ASR", "anomaly index", "max margin", "warp ASR", "stripe ASR", "suspect"], per_class_rows))
        images: list[Image] = [image for check in self.checks for image in getattr(check, "images", [])]
        return Report("harden.scan/1", f"harden scan {self.model_uri}: {self.verdict} (p_backdoor {p})", self.to_dict(), tables,
                      checks=list(self.checks), images=images, sarif_location=sarif_location)


def combine(checks: list[CheckResult]) -> tuple[str, float | None, list[int]]:
    """One verdict: unsafe artifacts first, then the calibrated probability of a backdoor."""
    by_name = {c.name: c for c in checks}
    artifact = by_name.get("artifact")
    if artifact is not None and artifact.status == FAILED:
        return "unsafe_artifact", None, []
    scored = [c for c in checks if "p_backdoor" in c.details and c.status not in (ERROR, SKIPPED)]
    if not scored:
        return "inconclusive", None, []
    p_backdoor = max(float(c.details["p_backdoor"]) for c in scored)
    suspects = next((c.details.get("suspect_classes", []) for c in scored if c.details.get("suspect_classes")), [])
    errors = any(c.status == ERROR for c in checks)
    if p_backdoor >= 0.5:
        return "backdoor", p_backdoor, list(suspects)
    return ("inconclusive" if errors else "clean"), p_backdoor, []


def _run_check(name: str, ctx: ScanContext) -> CheckResult:
    check = CHECKS[name]()
    missing = check.missing_inputs(ctx)
    if missing:
        return CheckResult(name, SKIPPED, missing)
    start = time.perf_counter()
    try:
        result = check.run(ctx)
    except HardenError:
        raise
    except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
        return CheckResult(name, ERROR, f"{type(exc).__name__}: {exc}", round(time.perf_counter() - start, 3))
    result.duration_s = round(time.perf_counter() - start, 3)
    return result


def default_checks(task: str) -> list[str]:
    return [name for name, cls in CHECKS.items() if task in cls.tasks]


def answers(scanned: Iterable[str], checks: list[str] | None, task: str = "classifier") -> bool:
    """Whether an earlier scan that ran the checks `scanned` answers a request for `checks` (None: the
    task's defaults that need no --train-data, which fleet scans and gates do not pass). A cached
    `--checks artifact` scan says nothing about a backdoor."""
    needed = checks or [name for name in default_checks(task) if not CHECKS[name].needs_train_data]
    return set(needed) <= set(scanned)


def scan(
    model: "str | ModelArtifact",
    *,
    data: str | None = None,
    train_data: str | None = None,
    task: str = "classifier",
    checks: list[str] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    options: dict[str, Any] | None = None,
    load_options: dict[str, Any] | None = None,
    resize: bool = False,
    workdir: Path | None = None,
) -> ScanResult:
    """Run the checks on MODEL. The artifact is scanned before anything is loaded."""
    if task not in TASKS:
        raise HardenError(f"--task {task!r}: expected classifier or encoder")
    names = checks or default_checks(task)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise HardenError(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    device = torch.device(device)
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="harden-scan-"))  # library callers keep the files
    with measure(device) as cost:
        artifact = model if isinstance(model, ModelArtifact) else fetch_model(model)
        ctx = ScanContext(artifact, None, None, None, task, device, seed, options or {}, workdir)
        normalisation = None
        results = [_run_check(n, ctx) for n in names if n == "artifact"]
        if not (results and results[0].status == FAILED):  # an unsafe artifact is never loaded
            behavioural = [n for n in names if n != "artifact"]
            if behavioural:
                ctx.model = load_model(artifact, device=device, embedding=task == "encoder", **(load_options or {}))
                spec, classes = ctx.model.input_spec, ctx.model.num_classes if task == "classifier" else None
                ctx.data = load_data(data, spec, num_classes=classes, resize=resize) if data else None
                ctx.train_data = load_data(train_data, spec, num_classes=classes, resize=resize) if train_data else None
                if task == "classifier" and ctx.data is not None:
                    normalisation = choose_normalisation(ctx.model, ctx.data, device, seed)
            results += [_run_check(n, ctx) for n in behavioural]
        else:
            results += [CheckResult(n, SKIPPED, "artifact is unsafe: the model was not loaded") for n in names if n != "artifact"]
    verdict, p_backdoor, suspects = combine(results)
    inversion = next((r for r in results if r.name == "inversion" and r.details.get("per_class")), None)
    registered = artifact.registered
    uri = registered.uri if registered else artifact.uri
    return ScanResult(verdict, p_backdoor, suspects, inversion.details["per_class"] if inversion else [], results, uri,
                      cost.duration_s, cost.peak_memory_mb, workdir, registered, normalisation)


def scan_and_record(model: "str | ModelArtifact", params: dict[str, Any], sarif_location: str | None = None,
                    **scan_kwargs: Any) -> tuple[ScanResult, Report]:
    """`scan` inside one MLflow run: metrics, reports and images logged, the version tagged.

    What `harden scan` does after parsing its options; fleet scans call it per version.
    The model is resolved before the run opens, so a wrong URI writes nothing.
    """
    import mlflow

    from harden import tracking

    artifact = model if isinstance(model, ModelArtifact) else fetch_model(model)
    source_uri = artifact.registered.uri if artifact.registered else artifact.uri
    with tracking.command_run("scan", source_uri, params) as run, tempfile.TemporaryDirectory(prefix="harden-scan-") as workdir:
        result = scan(artifact, workdir=Path(workdir), **scan_kwargs)
        if any(Path(workdir).iterdir()):
            # Files checks leave (the sensitivity separation) live on in the run, where purify finds them.
            mlflow.log_artifacts(workdir, "scan")
            for check in result.checks:
                if "separation_path" in check.details:
                    check.details["separation_path"] = f"runs:/{run.info.run_id}/scan/{Path(check.details['separation_path']).name}"
        report = result.report(sarif_location)
        report.payload["run_id"] = run.info.run_id
        metrics = {"p_backdoor": result.p_backdoor, "duration_s": result.duration_s, "peak_memory_mb": result.peak_memory_mb}
        if result.per_class:
            metrics["max_anomaly_index"] = max(c["anomaly_index"] for c in result.per_class)
            mlflow.log_table({k: [c[k] for c in result.per_class] for k in ("target", "norm", "asr", "anomaly_index", "margin", "warp_asr", "stripe_asr")},
                             "scan/per_class.json")
        tracking.log_metrics(metrics)
        tracking.log_report(report, "scan")
        if result.registered is not None:
            tracking.set_version_tags(result.registered, result.version_tags(run.info.run_id))
    return result, report
