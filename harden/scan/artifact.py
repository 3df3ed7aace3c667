"""Artifact safety: scan every file of the model for unsafe pickle data before it is loaded.

Runs on the fetched files only (`ctx.artifact.path`), never on a loaded model, so a
malicious checkpoint is caught before any unpickling. Fails closed (see
`harden.models.safety`): a dangerous global or pickle data that cannot be parsed
fails the check with an error finding, and the orchestrator must not load the model.

Findings:
- `harden.artifact.unsafe-pickle` (error, 9.8): one per file with dangerous globals
  or unparseable pickle data; the check fails.
- `harden.artifact.suspicious-pickle-global` (warning, 5.0): globals picklescan knows
  neither as safe nor as dangerous (e.g. a custom `nn.Module` class); loading them
  needs `--allow-pickle` and trust in the publisher. The check still passes.
- `harden.artifact.pickle-format` (warning, 5.0): an MLflow model saved with
  `serialization_format="pickle"`. MLflow loads it with a full unpickler, so loading
  it runs whatever code the file names; a warning, not a failure, because the format
  is legitimate and the globals were checked, but it needs trust and can be avoided
  by re-logging it as pt2. The check still passes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import yaml

from harden.models.safety import PickleGlobal, PickleScan, scan_pickles
from harden.report import Finding, register_rule
from harden.scan.base import FAILED, PASSED, Check, CheckResult, ScanContext, register_check

UNSAFE, SUSPICIOUS, PICKLE_FORMAT = "harden.artifact.unsafe-pickle", "harden.artifact.suspicious-pickle-global", "harden.artifact.pickle-format"

register_rule(
    UNSAFE, "Unsafe pickle data in the model artifact",
    "A file of the model artifact imports a dangerous Python global when unpickled (it can run arbitrary code), "
    "or holds pickle data that cannot be parsed and so cannot be shown to be safe.",
    "Do not load this model. Obtain it again from a trusted source; prefer pickle-free formats (MLflow pt2, safetensors).",
)
register_rule(
    SUSPICIOUS, "Pickle global of unknown safety in the model artifact",
    "A file of the model artifact imports a global that is neither known to be safe nor known to be dangerous, "
    "such as a custom model class; unpickling it runs that class's code.",
    "Review the named globals; load with --allow-pickle only if you trust the publisher, or re-save the model as pt2.",
)
register_rule(
    PICKLE_FORMAT, "MLflow model saved with pickle serialisation",
    "The MLflow model stores its weights and code with pickle; loading it runs the code it names, so it needs trust.",
    "Re-log the model with mlflow.pytorch.log_model(..., serialization_format='pt2') (the default in MLflow 3).",
)


def _is_mlflow_pickle_model(path: Path) -> bool:
    """An MLflow pytorch model whose data is `model.pth` (pickle) rather than `model.pt2`."""
    if not (path / "MLmodel").is_file():
        return False
    try:
        flavor = ((yaml.safe_load((path / "MLmodel").read_text()) or {}).get("flavors") or {}).get("pytorch") or {}
    except (OSError, yaml.YAMLError):
        return False
    data = path / (flavor.get("model_data") or "data")
    return (data / "model.pth").is_file() and not (data / "model.pt2").is_file()


def _by_file(found: list[PickleGlobal]) -> dict[str, list[str]]:
    files: dict[str, list[str]] = defaultdict(list)
    for g in found:
        files[g.file].append(str(g))
    return {file: sorted(set(names)) for file, names in files.items()}


def _findings(scan: PickleScan, pickle_model: bool) -> list[Finding]:
    findings = [
        Finding(UNSAFE, "error", f"{file}: dangerous pickle globals {', '.join(names)}", 9.8, {"file": file, "globals": names})
        for file, names in _by_file(scan.dangerous).items()
    ]
    findings += [Finding(UNSAFE, "error", f"{error} (treated as unsafe)", 9.8, {"file": error.split(": ", 1)[0]}) for error in scan.errors]
    findings += [
        Finding(SUSPICIOUS, "warning", f"{file}: pickle globals of unknown safety {', '.join(names)}", 5.0, {"file": file, "globals": names})
        for file, names in _by_file(scan.suspicious).items()
    ]
    if pickle_model:
        findings.append(Finding(PICKLE_FORMAT, "warning", "MLflow model saved with pickle serialisation: loading it runs code; re-log it as pt2", 5.0))
    return findings


@register_check
class ArtifactSafetyCheck(Check):
    name = "artifact"
    description = "unsafe pickle globals and opcodes in every file of the model artifact, before loading"
    needs_model = False
    needs_data = False

    def run(self, ctx: ScanContext) -> CheckResult:
        start = time.perf_counter()
        path = Path(ctx.artifact.path)
        scan = scan_pickles(path)
        pickle_model = path.is_dir() and _is_mlflow_pickle_model(path)
        findings = _findings(scan, pickle_model)
        if scan.unsafe:
            status, message = FAILED, scan.summary(ctx.artifact.uri)
        else:
            status = PASSED
            caution = f"; {len(findings)} warning(s)" if findings else ""
            message = f"no unsafe pickle data in {scan.files_scanned} file(s) ({len(scan.pickle_files)} holding pickle data){caution}"
        details = {
            "files_scanned": scan.files_scanned,
            "pickle_files": scan.pickle_files,
            "globals": {
                "dangerous": _by_file(scan.dangerous),
                "suspicious": _by_file(scan.suspicious),
                "innocuous": len(scan.globals) - len(scan.dangerous) - len(scan.suspicious),
            },
            "parse_errors": scan.errors,
            "mlflow_pickle_format": pickle_model,
        }
        return CheckResult(self.name, status, message, time.perf_counter() - start, findings, details)
