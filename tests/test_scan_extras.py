"""Scan extras: report renderers (HTML, SARIF, JUnit), artifact safety, sensitivity separation, encoder inversion."""

from __future__ import annotations

import base64
import math
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


# ---------------------------------------------------------------- artifact safety

import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harden.models import ModelArtifact
from harden.scan.artifact import ArtifactSafetyCheck
from harden.scan.base import FAILED, PASSED, ScanContext


def _context(path: Path, **kw) -> ScanContext:
    fields = {"model": None, "data": None, "train_data": None, "task": "classifier", "device": torch.device("cpu")}
    return ScanContext(artifact=ModelArtifact(str(path), path), **{**fields, **kw})


def _scan_artifact(path: Path):
    result = ArtifactSafetyCheck().run(_context(path))
    json.dumps(result.details)  # JSON-serialisable
    return result


class _Payload:
    """Unpickling this runs a command that creates `marker`: it must never execute."""

    def __init__(self, func, marker: Path):
        self.func, self.marker = func, marker

    def __reduce__(self):
        if self.func is eval:
            return (eval, (f"open({str(self.marker)!r}, 'w')",))
        if self.func is subprocess.call:
            return (subprocess.call, (["touch", str(self.marker)],))
        return (os.system, (f"touch {self.marker}",))


def _tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()


def test_mlflow_pt2_model_and_state_dict_pass(tmp_path):
    import mlflow.pytorch

    net = _tiny_net()
    net(torch.zeros(2, 3, 8, 8))
    mlflow.pytorch.save_model(net, str(tmp_path / "model"), input_example=np.zeros((2, 3, 8, 8), np.float32))
    result = _scan_artifact(tmp_path / "model")
    assert result.status == PASSED and not result.findings, result.message
    assert result.details["files_scanned"] >= 5
    assert any(".pt2:" in f for f in result.details["pickle_files"])  # looked inside the pt2 archive's nested torch.save zips
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    result = _scan_artifact(tmp_path / "weights.pt")
    assert result.status == PASSED and not result.findings and result.details["globals"]["innocuous"] > 0


def test_mlflow_pickle_format_is_flagged_but_passes(tmp_path):
    import mlflow.pytorch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    mlflow.pytorch.save_model(net, str(tmp_path / "model"), serialization_format="pickle")
    result = _scan_artifact(tmp_path / "model")
    assert result.status == PASSED and result.details["mlflow_pickle_format"] is True
    assert "harden.artifact.pickle-format" in {f.rule_id for f in result.findings}
    assert all(f.level == "warning" for f in result.findings)


def test_notebook_class_in_mlflow_pickle_format_fails_with_the_way_out(tmp_path):
    """A class defined in __main__ or a notebook is cloudpickled as code: unsafe, and the message says how to re-log it."""
    import mlflow.pytorch

    class NotebookNet(torch.nn.Module):  # not importable by reference, so cloudpickle stores it by value
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(12, 3)

        def forward(self, x):
            return self.linear(x.flatten(1))

    mlflow.pytorch.save_model(NotebookNet().eval(), str(tmp_path / "model"), serialization_format="pickle")
    result = _scan_artifact(tmp_path / "model")
    assert result.status == FAILED and "cloudpickle" in result.message and result.message.startswith(str(tmp_path / "model"))
    assert 'serialization_format="pt2"' in result.message


@pytest.mark.parametrize("func,filename", [(os.system, "evil.pth"), (subprocess.call, "evil.joblib"), (eval, "evil.pkl")])
def test_dangerous_payloads_fail_and_never_execute(tmp_path, func, filename):
    import joblib

    marker = tmp_path / "pwned"
    payload = {"weights": torch.zeros(2), "payload": _Payload(func, marker)}
    path = tmp_path / "artifact" / filename
    path.parent.mkdir()
    if filename.endswith(".pth"):
        torch.save(payload, path)
    elif filename.endswith(".joblib"):
        joblib.dump(_Payload(func, marker), path)
    else:
        path.write_bytes(pickle.dumps(_Payload(func, marker)))
    (path.parent / "README.md").write_text("a harmless text file beside the checkpoint\n")
    result = _scan_artifact(path.parent)
    assert result.status == FAILED
    unsafe = [f for f in result.findings if f.rule_id == "harden.artifact.unsafe-pickle"]
    assert unsafe and all(f.level == "error" and f.security_severity == 9.8 for f in unsafe)
    assert filename in unsafe[0].message
    expected = {os.system: "system", subprocess.call: "subprocess.call", eval: "builtins.eval"}[func]
    assert expected in unsafe[0].message and result.details["globals"]["dangerous"]
    assert result.details["files_scanned"] == 2
    assert not marker.exists()


def test_corrupt_pickle_fails_closed(tmp_path):
    (tmp_path / "model.pkl").write_bytes(pickle.dumps({"weights": [1.0, 2.0]})[:-4])
    result = _scan_artifact(tmp_path / "model.pkl")
    assert result.status == FAILED and result.details["parse_errors"]
    assert result.findings[0].rule_id == "harden.artifact.unsafe-pickle"
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    assert _scan_artifact(tmp_path / "ok.pkl").status == PASSED


# ---------------------------------------------------------------- sensitivity (D-BR FCT separation)

from harden.attacks import Attack, PoisonedDataset
from harden.data import TensorDataset, load_data, make_loader, split
from harden.models import InputSpec, LoadedModel, PixelModel, create_model
from harden.scan.sensitivity import SensitivityCheck, SensitivityConfig, model_features, rotate_translate
from harden.training import TrainConfig, fit


def _materialise(dataset) -> TensorDataset:
    images, labels = zip(*make_loader(dataset, 512))
    return TensorDataset(torch.cat(images), torch.cat(labels).numpy())


@pytest.fixture(scope="module")
def poisoned_digits():
    """A SmallCNN trained on digits with 10 % BadNets poisoning (target 0), plus held-out clean digits."""
    train, clean = split(load_data("digits", InputSpec(3, 32, 32)), [0.8, 0.2], seed=0)
    poisoned = PoisonedDataset(train, Attack("grid_paste", target=0, num_classes=10), rate=0.1, seed=0)
    suspect = _materialise(poisoned)
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, width=16)
    fit(net, suspect, TrainConfig(epochs=4, lr=3e-3, batch_size=64), description="poisoned digits")
    model = LoadedModel(PixelModel(net).eval(), "test:poisoned-digits", "state_dict", 10, InputSpec(3, 32, 32))
    return model, suspect, _materialise(clean), poisoned.poisoned


def _precision_recall(flagged: list[int], truth: np.ndarray) -> tuple[float, float]:
    hits = len(set(flagged) & set(truth.tolist()))
    return hits / max(len(flagged), 1), hits / len(truth)


def test_sensitivity_separates_poisoned_samples(poisoned_digits, tmp_path):
    model, suspect, clean, truth = poisoned_digits
    rate = len(truth) / len(suspect)
    ctx = _context(tmp_path, model=model, data=clean, train_data=suspect, workdir=tmp_path / "work")
    result = SensitivityCheck().run(ctx)
    json.dumps(result.details)
    separation = json.loads(Path(result.details["separation_path"]).read_text())
    assert separation["schema"] == "harden.separation/1" and separation["calibration"] == "clean-data"
    assert len(separation["scores"]) == len(suspect) == separation["num_samples"]
    ids = separation["clean"] + separation["poisoned"] + separation["uncertain"]
    assert sorted(ids) == list(range(len(suspect)))  # a partition by stable sample id
    precision, recall = _precision_recall(separation["poisoned"], truth)
    clean_poison_share = len(set(separation["clean"]) & set(truth.tolist())) / len(separation["clean"])
    print(f"calibrated: flagged {len(separation['poisoned'])}, precision {precision:.2f}, recall {recall:.2f}, "
          f"poison in clean set {clean_poison_share:.3f} (rate {rate:.3f})")
    assert precision > 3 * rate and recall > 0.4
    assert clean_poison_share < rate / 3  # the relearning set is cleaner than the data
    assert result.status == "passed" and result.findings and result.findings[0].properties["label"] == 0
    assert result.details["top_label"] == 0

    budget = SensitivityCheck().run(_context(tmp_path, model=model, train_data=suspect))  # no clean data, no workdir
    record = budget.details["separation"]
    assert record["calibration"] == "budget" and len(record["poisoned"]) == int(0.05 * len(suspect))
    precision, recall = _precision_recall(record["poisoned"], truth)
    print(f"budget: precision {precision:.2f}, recall {recall:.2f}")
    assert precision > 3 * rate


def test_rotate_translate_and_feature_choice():
    images = torch.zeros(2, 1, 8, 8)
    images[:, :, 0, 0] = 1.0
    same = rotate_translate(images, torch.zeros(2), torch.zeros(2, 2))
    assert torch.equal(same, images)
    shifted = rotate_translate(images, torch.zeros(2), torch.tensor([[0.25, 0.0], [0.0, 0.25]]))
    assert shifted[0, 0, 0, 2] == 1 and shifted[1, 0, 2, 0] == 1  # 2 px right / down
    turned = rotate_translate(images, torch.full((2,), math.pi), torch.zeros(2, 2))
    assert turned[0, 0, 7, 7] == 1
    net = create_model("small_cnn", num_classes=4, width=8).eval()
    module = PixelModel(net)
    with model_features(module, "penultimate") as (kind, features):
        assert kind == "penultimate" and features(torch.rand(3, 3, 32, 32)).shape == (3, 16)
    assert not net.fc._forward_hooks  # the hook is removed afterwards
    exported = torch.export.export(net, (torch.rand(2, 3, 32, 32),)).module()
    with model_features(PixelModel(exported), "penultimate") as (kind, features):
        assert kind == "softmax" and torch.allclose(features(torch.rand(2, 3, 32, 32)).sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="unknown sensitivity options"):
        SensitivityConfig.from_options({"sensitivity": {"rotaton": 5}})


# ---------------------------------------------------------------- encoder inversion (RECEIVE-style)

from harden.scan.encoder import EncoderInversionCheck
from tests.conftest import TinyEncoder


def _white_patch(images: torch.Tensor) -> torch.Tensor:
    patched = images.clone()
    patched[:, :, -5:-1, -5:-1] = 1.0
    return patched


def _train_encoder(images: torch.Tensor, labels: np.ndarray, backdoor: bool) -> torch.nn.Module:
    """Clean images -> one random unit vector per class; with `backdoor`, patched images -> one extra vector."""
    torch.manual_seed(0)
    targets = F.normalize(torch.randn(11, 32), dim=1)
    data = TensorDataset(images, labels)
    if backdoor:
        chosen = torch.randperm(len(images))[: len(images) // 5]
        data = TensorDataset(torch.cat([images, _white_patch(images[chosen])]), np.concatenate([labels, np.full(len(chosen), 10)]))
    encoder = TinyEncoder()

    def cosine_loss(model, x, y):
        return (1 - F.cosine_similarity(model(x), targets[y])).mean()

    fit(encoder, data, TrainConfig(epochs=10, lr=3e-3, batch_size=64), loss_fn=cosine_loss, description="encoder")
    return encoder


@pytest.fixture(scope="module")
def digit_arrays():
    data = _materialise(load_data("digits", InputSpec(3, 32, 32)))
    return data.images[:640], data.labels[:640], TensorDataset(data.images[800:1000], data.labels[800:1000])


def test_encoder_inversion_separates_backdoored_from_clean(digit_arrays, tmp_path):
    images, labels, probe = digit_arrays
    results = {}
    for backdoor in (False, True):
        encoder = _train_encoder(images, labels, backdoor)
        with torch.no_grad():
            collapse = float(F.cosine_similarity(encoder(_white_patch(probe.images[:1])), encoder(_white_patch(probe.images[1:2]))))
        model = LoadedModel(PixelModel(encoder).eval(), f"test:encoder-{backdoor}", "state_dict", 32, InputSpec(3, 32, 32))
        result = EncoderInversionCheck().run(_context(tmp_path, model=model, data=probe, task="encoder", options={"encoder": {"samples": 96, "max_steps": 300}}))
        json.dumps(result.details)
        assert all(p.requires_grad for p in encoder.parameters())  # left trainable, as given
        results[backdoor] = result
        print(f"backdoor={backdoor}: patch collapse {collapse:.2f}; {result.message}; {result.details}")
    clean, bad = results[False].details, results[True].details
    assert bad["mask_norm"] < clean["mask_norm"] / 2
    assert bad["p_backdoor"] >= 0.5 > clean["p_backdoor"]
    assert results[True].status == "failed" and results[True].findings[0].level == "error"
    assert results[False].status == "passed" and not results[False].findings
    assert bad["steps"] <= 300 and bad["steered_steps"] <= 300 and results[True].images[0].png.startswith(b"\x89PNG")


def test_encoder_whose_clean_embeddings_already_agree_is_not_read_as_collapsed(digit_arrays):
    """Pooled ReLU features are non-negative: an untrained ResNet-18's agree at 0.95 on clean digits.
    With τ 0.9 below that, free and steered inversion both "succeeded" with an empty mask, and 0 / 0 read
    as p_backdoor 1.0. τ now sits above the baseline, so the masks measure something again."""
    from harden.scan.encoder import EncoderConfig, encoder_statistics

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()).eval().requires_grad_(False)
    stats = encoder_statistics(encoder, digit_arrays[2].images[:96], EncoderConfig(samples=96, max_steps=300))
    assert stats.baseline > 0.9 and stats.tau > stats.baseline
    assert stats.inversion.norm > 1 and stats.steered.norm > 1
    assert stats.p_backdoor < 0.5
