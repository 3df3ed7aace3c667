"""The GitHub Action, the example workflow and the example policy stay in step with the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from harden.gate import Policy

REPO = Path(__file__).resolve().parents[2]


def test_action_calls_real_gate_flags_and_uploads_sarif_always(run_cli):
    action = yaml.safe_load((REPO / "integrations/github/action.yml").read_text())
    steps = {step.get("name") or step.get("uses"): step for step in action["runs"]["steps"]}
    script = steps["harden gate"]["run"]
    _, help_text, _ = run_cli("gate", "--help")
    flags = set(re.findall(r"(--[a-z][a-z-]+)", script.split("harden gate", 1)[1].split("rc=$?")[0]))
    assert flags and all(flag in help_text for flag in flags), flags
    assert "set +e" in script and "GITHUB_OUTPUT" in script  # the gate's code is kept, not lost to `bash -e`
    upload = steps["Upload SARIF"]
    assert upload["uses"].startswith("github/codeql-action/upload-sarif@") and upload["if"].startswith("always()")
    assert steps["Gate decision"]["if"].startswith("always()")

    workflow = yaml.safe_load((REPO / "integrations/github/example-workflow.yml").read_text())
    assert workflow["permissions"]["security-events"] == "write"
    assert workflow["jobs"]["deploy"]["needs"] == "gate"
    assert any(step.get("uses") == "./integrations/github" for step in workflow["jobs"]["gate"]["steps"])


def test_example_policy_is_valid():
    policy = Policy.load(REPO / "examples/harden-policy.yaml")
    assert policy.max_p_backdoor == 0.3 and policy.required_checks == ["artifact", "inversion"]
    assert policy.lineage_tags == {"before": "harden.purify.acc_before", "after": "harden.purify.acc_after"}
