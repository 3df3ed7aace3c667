"""`harden gate`: a deployment decision from a policy file, for CI.

A policy (`harden-policy.yaml`) states what a model must satisfy before it ships::

    version: 1
    max_p_backdoor: 0.3            # calibrated probability from `harden scan`
    required_checks: [artifact, inversion]   # must have run (not skipped, no error)
    require_artifact_safety: true  # no unsafe pickle in the artifact
    max_accuracy_drop: 0.02        # lineage: clean-accuracy lost by purification
    lineage_tags: {before: harden.purify.acc_before, after: harden.purify.acc_after}
    required_tags: {team: fraud, harden.arch: null}   # null: must exist; a string: must equal
    scan: {data: clean.npz, checks: [artifact, inversion]}   # how to scan when no cached result fits

Scan results are reused when the registered version carries them from this harden version
(`harden.scan.harden_version` + the run's `reports/scan.json`); otherwise, or with
`fresh=True`, the model is scanned (and tagged) first. Each rule is one check of a
`harden.gate/1` report, so JSON, SARIF and JUnit come from the report renderers.
Exit: 0 every rule passed, 1 a rule failed, 2 the gate could not decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from harden import __version__, tracking
from harden.errors import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK, HardenError
from harden.report import CheckOutcome, Finding, Report, Table, register_rule

PASSED, FAILED, SKIPPED, ERROR = "passed", "failed", "skipped", "error"
DEFAULT_LINEAGE_TAGS = {"before": "harden.purify.acc_before", "after": "harden.purify.acc_after"}

for _rule, _short, _full in (
    ("p-backdoor", "Backdoor probability above the policy", "The calibrated probability that the model is backdoored (harden scan) exceeds max_p_backdoor."),
    ("required-check", "A required scan check did not run", "The policy requires this scan check to run; it was skipped or errored."),
    ("artifact-safety", "Unsafe model artifact", "The model files contain pickle globals that can execute code when loaded."),
    ("accuracy-drop", "Clean accuracy lost by purification", "The lineage tags show a clean-accuracy drop above max_accuracy_drop."),
    ("required-tag", "A required model-version tag is missing or wrong", "The policy requires this tag on the registered model version."),
):
    register_rule(f"harden.gate.{_rule}", _short, _full,
                  "Fix the model or the policy (harden-policy.yaml), then re-run `harden gate`; `harden scan` and `harden purify` help.")


@dataclass
class Policy:
    """A parsed `harden-policy.yaml`; unknown keys are an error (a typo must not weaken a gate)."""

    version: int = 1
    max_p_backdoor: float | None = 0.5
    required_checks: list[str] = field(default_factory=lambda: ["artifact", "inversion"])
    require_artifact_safety: bool = True
    max_accuracy_drop: float | None = None
    lineage_tags: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LINEAGE_TAGS))
    required_tags: dict[str, str | None] = field(default_factory=dict)
    scan: dict[str, Any] = field(default_factory=dict)  # data, checks, max_steps for a fresh scan
    path: str | None = None

    @classmethod
    def load(cls, path: Path) -> "Policy":
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise HardenError(f"--policy {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise HardenError(f"--policy {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise HardenError(f"--policy {path}: expected a mapping of settings")
        known = {f.name for f in fields(cls)} - {"path"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise HardenError(f"--policy {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        policy = cls(**raw, path=str(path))
        policy.lineage_tags = {**DEFAULT_LINEAGE_TAGS, **(policy.lineage_tags or {})}
        policy._validate()
        return policy

    def _validate(self) -> None:
        where = f"--policy {self.path}"
        if self.version != 1:
            raise HardenError(f"{where}: version {self.version!r} is not supported (expected 1)")
        for name in ("max_p_backdoor", "max_accuracy_drop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1):
                raise HardenError(f"{where}: {name} must be a number between 0 and 1, got {value!r}")
        if not isinstance(self.required_checks, list) or not isinstance(self.required_tags, dict):
            raise HardenError(f"{where}: required_checks must be a list and required_tags a mapping")
        from harden.scan.base import CHECKS

        unknown = [c for c in self.required_checks if c not in CHECKS]
        if unknown:
            raise HardenError(f"{where}: unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")


@dataclass
class GateResult:
    model_uri: str
    policy: Policy
    rules: list[CheckOutcome]
    scan: dict[str, Any]  # the harden.scan/1 report the gate judged
    cached: bool

    @property
    def passed(self) -> bool:
        return all(rule.status in (PASSED, SKIPPED) for rule in self.rules)

    @property
    def exit_code(self) -> int:
        if any(rule.status == ERROR for rule in self.rules):
            return EXIT_ERROR  # could not decide outranks a failure, and is never a pass
        return EXIT_OK if self.passed else EXIT_FINDINGS

    def report(self, sarif_location: str | None = None) -> Report:
        decision = "pass" if self.exit_code == EXIT_OK else "fail" if self.exit_code == EXIT_FINDINGS else "error"
        payload = {"model_uri": self.model_uri, "decision": decision, "exit_code": self.exit_code, "policy": self.policy.path,
                   "cached_scan": self.cached, "scan_run_id": self.scan.get("run_id"), "verdict": self.scan.get("verdict"),
                   "p_backdoor": self.scan.get("p_backdoor"),
                   "rules": [{"name": r.name, "status": r.status, "message": r.message} for r in self.rules],
                   "harden_version": __version__}
        table = Table("Policy rules", ["rule", "status", "detail"], [[r.name, r.status, r.message] for r in self.rules])
        location = sarif_location or (self.policy.path if self.policy.path and not Path(self.policy.path).is_absolute() else None)
        return Report("harden.gate/1", f"harden gate {self.model_uri}: {decision}", payload, [table], checks=list(self.rules),
                      sarif_location=location)


def _outcome(name: str, ok: bool, message: str, rule: str, severity: float = 7.0, **properties: Any) -> CheckOutcome:
    if ok:
        return CheckOutcome(name, PASSED, message)
    return CheckOutcome(name, FAILED, message, findings=[Finding(f"harden.gate.{rule}", "error", message, severity, properties)])


def evaluate_policy(policy: Policy, scan_report: dict[str, Any], tags: dict[str, str] | None) -> list[CheckOutcome]:
    """Judge one scan report (harden.scan/1) and the version's tags (None: not a registered version)."""
    rules: list[CheckOutcome] = []
    p = scan_report.get("p_backdoor")
    if policy.max_p_backdoor is not None:
        if p is None:
            rules.append(_outcome("p_backdoor", False, f"p_backdoor was not computed (verdict {scan_report.get('verdict')})", "p-backdoor"))
        else:
            rules.append(_outcome("p_backdoor", p <= policy.max_p_backdoor, f"p_backdoor {p:.3f} (max {policy.max_p_backdoor})",
                                  "p-backdoor", 9.0, p_backdoor=p))
    checks = {c["name"]: c for c in scan_report.get("checks", [])}
    for name in policy.required_checks:
        check = checks.get(name)
        status = check["status"] if check else "not run"
        # A check that found something still ran: its finding is judged by the other rules.
        rules.append(_outcome(f"check:{name}", status in (PASSED, FAILED), f"{name}: {status}" + (f" ({check['message']})" if check and check.get("message") else ""),
                              "required-check", 6.0))
    if policy.require_artifact_safety:
        artifact = checks.get("artifact")
        safe = artifact is not None and artifact["status"] == PASSED and scan_report.get("verdict") != "unsafe_artifact"
        rules.append(_outcome("artifact_safety", safe, "artifact check passed" if safe else
                              f"artifact {'not checked' if artifact is None else artifact['status']}", "artifact-safety", 9.5))
    rules.append(_accuracy_drop(policy, tags))
    for key, expected in policy.required_tags.items():
        value = (tags or {}).get(key)
        ok = value is not None and (expected is None or value == str(expected))
        want = "present" if expected is None else f"= {expected!r}"
        rules.append(_outcome(f"tag:{key}", ok, f"{key} {want}, found {value!r}", "required-tag", 4.0))
    return rules


def _accuracy_drop(policy: Policy, tags: dict[str, str] | None) -> CheckOutcome:
    name = "accuracy_drop"
    if policy.max_accuracy_drop is None:
        return CheckOutcome(name, SKIPPED, "no max_accuracy_drop in the policy")
    before_key, after_key = policy.lineage_tags["before"], policy.lineage_tags["after"]
    values = [(tags or {}).get(before_key), (tags or {}).get(after_key)]
    if values == [None, None]:
        return CheckOutcome(name, SKIPPED, f"no lineage ({before_key}/{after_key} not set): the model was not purified")
    try:
        before, after = (float(v) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return CheckOutcome(name, ERROR, f"lineage tags {before_key}={values[0]!r}, {after_key}={values[1]!r} are not both numbers")
    drop = before - after
    return _outcome(name, drop <= policy.max_accuracy_drop, f"accuracy {before:.4f} -> {after:.4f}: drop {drop:.4f} (max {policy.max_accuracy_drop})",
                    "accuracy-drop", 5.0, accuracy_before=before, accuracy_after=after)


def cached_scan(tags: dict[str, str], checks: list[str] | None = None) -> dict[str, Any] | None:
    """The version's last scan report, if it was made by this harden version with every check in `checks`."""
    from harden.scan import answers

    if tags.get("harden.scan.harden_version") != __version__ or not tags.get("harden.scan.run_id"):
        return None
    report = tracking.read_run_json(tags["harden.scan.run_id"], "reports/scan.json")
    if report is None or not answers((check.get("name") for check in report.get("checks") or []), checks):
        return None
    return report


def gate(model: str, policy: Policy, *, fresh: bool = False, cached_only: bool = False, data: str | None = None,
         device: Any = "cpu", seed: int = 0) -> GateResult:
    """Judge MODEL against POLICY, scanning it first unless a current scan result is cached."""
    from harden.scan import scan_and_record

    registered = tracking.resolve_registered_version(model)
    tags = tracking.version_tags(registered) if registered else None
    settings = policy.scan or {}
    checks = settings.get("checks") or None
    report = None if fresh or tags is None else cached_scan(tags, checks)
    cached = report is not None
    if report is None:
        if cached_only:
            raise HardenError(f"{model}: no scan result from harden {__version__} with the checks the policy needs is cached on the "
                              f"version (run harden scan, or drop --cached-only)")
        data = data or settings.get("data")
        options = {"inversion": {k: settings[k] for k in ("max_steps", "probe_per_class") if k in settings}}
        params = {"data": data, "checks": ",".join(checks or []), "gate_policy": policy.path, "seed": seed}
        _, scan_report = scan_and_record(model, params, data=data, checks=checks, device=device, seed=seed, options=options)
        report = scan_report.to_dict()
        if registered:
            tags = tracking.version_tags(registered)
    uri = registered.uri if registered else model
    return GateResult(uri, policy, evaluate_policy(policy, report, tags), report, cached)
