"""Scan extras: report renderers (HTML, SARIF, JUnit), artifact safety, sensitivity separation, encoder inversion."""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET

from PIL import Image as PILImage

from harden.report import RENDERERS, CheckOutcome, Finding, Image, Report, Table


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _scan_report(location: str | None = None) -> Report:
    unsafe = Finding("harden.artifact.unsafe-pickle", "error", "data/model.pth: os.system <script>", 9.8, {"file": "data/model.pth"})
    suspect = Finding("harden.backdoor.trigger-inversion", "warning", "class 0 looks like a target", 7.5, {"class": 0})
    checks = [
        CheckOutcome("artifact", "failed", "unsafe pickle", 0.25, [unsafe]),
        CheckOutcome("inversion", "passed", "ok & fine", 3.5, [suspect]),
        CheckOutcome("sensitivity", "skipped", "needs --train-data"),
        CheckOutcome("encoder", "error", "crashed <b>"),
    ]
    return Report("harden.scan/1", "Scan <of> model", {"model_uri": "models:/m/3", "verdict": "backdoor", "p_backdoor": 0.93},
                  tables=[Table("Per class", ["class", "norm"], [[0, 12.5], ["<x>", None]])], checks=checks,
                  images=[Image("trigger class 0", _png((255, 0, 0)))], sarif_location=location)


def test_sarif_has_one_result_per_finding_and_rules_per_rule_id():
    sarif = json.loads(RENDERERS["sarif"](_scan_report("deploy/model.yaml")))
    assert sarif["version"] == "2.1.0" and "sarif" in sarif["$schema"]
    run = sarif["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "harden" and driver["version"]
    rules = {rule["id"]: rule for rule in driver["rules"]}
    assert set(rules) == {"harden.artifact.unsafe-pickle", "harden.backdoor.trigger-inversion"}
    assert rules["harden.artifact.unsafe-pickle"]["properties"]["security-severity"] == "9.8"
    for rule in rules.values():
        assert "security" in rule["properties"]["tags"]
        assert rule["shortDescription"]["text"] and rule["fullDescription"]["text"] and rule["help"]["text"]
    results = run["results"]
    assert [r["ruleId"] for r in results] == ["harden.artifact.unsafe-pickle", "harden.backdoor.trigger-inversion"]
    assert [r["level"] for r in results] == ["error", "warning"]
    assert all("models:/m/3" in r["message"]["text"] for r in results)
    location = results[0]["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "deploy/model.yaml" and location["region"]["startLine"] == 1
    fingerprints = [r["partialFingerprints"]["hardenFinding/v1"] for r in results]
    assert len(set(fingerprints)) == 2
    assert run["invocations"][0]["executionSuccessful"] is False  # one check errored
    # fingerprints are stable across runs even when messages carry changing numbers
    again = json.loads(RENDERERS["sarif"](_scan_report("deploy/model.yaml")))
    assert [r["partialFingerprints"] for r in again["runs"][0]["results"]] == [r["partialFingerprints"] for r in results]


def test_sarif_location_defaults():
    report = _scan_report()
    assert json.loads(RENDERERS["sarif"](report))["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "harden-policy.yaml"
    report.payload["model_uri"] = "models/classifier.pt2"  # a file in the repository: point at it
    assert json.loads(RENDERERS["sarif"](report))["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "models/classifier.pt2"


def test_junit_maps_check_statuses():
    root = ET.fromstring(RENDERERS["junit"](_scan_report()))
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite.get("name") == "harden"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("4", "1", "1", "1")
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert set(cases) == {f"{n}[models:/m/3]" for n in ("artifact", "inversion", "sensitivity", "encoder")}
    assert all(case.get("classname") == "harden.scan" for case in cases.values())
    failure = cases["artifact[models:/m/3]"].find("failure")
    assert failure.get("type") == "harden.artifact.unsafe-pickle" and "os.system <script>" in failure.text
    assert cases["encoder[models:/m/3]"].find("error").get("message") == "crashed <b>"
    assert cases["sensitivity[models:/m/3]"].find("skipped") is not None
    assert cases["inversion[models:/m/3]"].find("failure") is None
    assert float(suite.get("time")) == 3.75


def test_html_is_self_contained_and_escaped():
    page = RENDERERS["html"](_scan_report())
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    encoded = base64.b64encode(_png((255, 0, 0))).decode()
    assert f"data:image/png;base64,{encoded}" in page
    assert "<script>" not in page and "&lt;script&gt;" in page  # finding text escaped
    assert "Scan &lt;of&gt; model" in page and "crashed &lt;b&gt;" in page and "&lt;x&gt;" in page
    assert 'class="status failed"' in page and 'class="status skipped"' in page
    assert "src=\"http" not in page and "<link" not in page  # nothing fetched from outside
