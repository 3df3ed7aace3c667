"""`harden gate` on the demo model: a fresh scan once, then cached results; SARIF and JUnit on disk."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import mlflow

from harden import __version__
from tests.mlops.conftest import REPO, child_env

STRICT = """
version: 1
max_p_backdoor: 0.3
required_checks: [artifact, inversion]
require_artifact_safety: true
max_accuracy_drop: 0.02
required_tags: {harden.arch: small_cnn, owner: null}
scan: {checks: [artifact, inversion]}
"""


def test_gate_fails_a_backdoored_model_then_reuses_the_scan(demo, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the policy path is relative, as in a repository
    (tmp_path / "harden-policy.yaml").write_text(STRICT)
    uri = f"models:/harden-demo/{demo.version.version}"
    client = mlflow.MlflowClient()
    client.set_model_version_tag("harden-demo", demo.version.version, "harden.purify.acc_before", "0.99")
    client.set_model_version_tag("harden-demo", demo.version.version, "harden.purify.acc_after", "0.95")
    code, out, err = run_cli("gate", uri, "--data", demo.data_dir / "clean.npz", "--fresh", "--format", "json",
                             "--sarif", "harden.sarif", "--junit", "harden.xml", "-q")
    assert code == 1, err
    report = json.loads(out)
    assert report["schema"] == "harden.gate/1" and report["decision"] == "fail" and report["cached_scan"] is False
    status = {r["name"]: r["status"] for r in report["rules"]}
    assert status == {"p_backdoor": "failed", "check:artifact": "passed", "check:inversion": "passed", "artifact_safety": "passed",
                      "accuracy_drop": "failed", "tag:harden.arch": "passed", "tag:owner": "failed"}
    tags = client.get_model_version("harden-demo", demo.version.version).tags
    assert tags["harden.scan.run_id"] == report["scan_run_id"] and tags["harden.scan.harden_version"] == __version__

    sarif = json.loads((tmp_path / "harden.sarif").read_text())
    results = sarif["runs"][0]["results"]
    assert {r["ruleId"] for r in results} == {"harden.gate.p-backdoor", "harden.gate.accuracy-drop", "harden.gate.required-tag"}
    assert all(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "harden-policy.yaml" for r in results)
    junit = ET.parse(tmp_path / "harden.xml").getroot()
    assert (junit.get("tests"), junit.get("failures"), junit.get("errors")) == ("7", "3", "0")

    # A lenient policy passes on the cached scan (no second scan run is opened).
    (tmp_path / "lenient.yaml").write_text("max_p_backdoor: 1.0\nmax_accuracy_drop: 0.05\nrequired_tags: {harden.arch: null}\n")
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    code, out, err = run_cli("gate", uri, "--policy", "lenient.yaml", "--cached-only", "--format", "json", "-q")
    assert code == 0, err
    assert json.loads(out)["cached_scan"] is True and json.loads(out)["decision"] == "pass"
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before

    # examples/pre_deploy.py: the same gate from a deployment script, promoting only on a pass
    script = [sys.executable, str(REPO / "examples/pre_deploy.py"), uri, "--cached-only", "--promote", "champion"]
    assert subprocess.run([*script, "--policy", "harden-policy.yaml"], env=child_env(), capture_output=True).returncode == 1
    assert "champion" not in client.get_registered_model("harden-demo").aliases
    done = subprocess.run([*script, "--policy", "lenient.yaml"], env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert str(client.get_model_version_by_alias("harden-demo", "champion").version) == demo.version.version
    client.delete_registered_model_alias("harden-demo", "champion")


def test_gate_bad_input_is_one_line_exit_2(demo, run_cli, tmp_path):
    cases = {"typo.yaml": "max_p_backdor: 0.1\n", "range.yaml": "max_p_backdoor: 5\n", "checks.yaml": "required_checks: [magic]\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        code, out, err = run_cli("gate", "models:/harden-demo/1", "--policy", tmp_path / name)
        assert code == 2 and err.count("\n") == 1 and err.startswith("harden: error: --policy"), (name, err)
    code, _, err = run_cli("gate", "models:/harden-demo/1", "--policy", tmp_path / "missing.yaml")
    assert code == 2 and "No such file" in err
    # no scan cached from this harden version on a fresh version and --cached-only: cannot decide
    client = mlflow.MlflowClient()
    source = client.get_model_version("harden-demo", demo.version.version)
    mv = client.create_model_version("harden-demo", source.source, run_id=source.run_id,
                                     model_id=source.source.removeprefix("models:/"))
    (tmp_path / "ok.yaml").write_text("max_p_backdoor: 0.5\n")
    code, _, err = run_cli("gate", f"models:/harden-demo/{mv.version}", "--policy", tmp_path / "ok.yaml", "--cached-only")
    assert code == 2 and "no scan result" in err
    # a cached scan of the file safety alone does not answer for a backdoor
    assert run_cli("scan", f"models:/harden-demo/{mv.version}", "--checks", "artifact", "-q")[0] == 3
    code, _, err = run_cli("gate", f"models:/harden-demo/{mv.version}", "--policy", tmp_path / "ok.yaml", "--cached-only")
    assert code == 2 and "with the checks the policy needs" in err
    client.delete_model_version("harden-demo", mv.version)
