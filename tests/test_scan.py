"""`harden scan`: the trigger-inversion check, the verdict, outputs and registry tags."""

from __future__ import annotations

import json
from dataclasses import replace

import mlflow
import numpy as np
import pytest
import torch

from harden.errors import TrackingError
from harden.models import InputSpec, create_model
from harden.purify import load_separation
from harden.scan import VERDICTS, combine, scan
from harden.scan.base import ERROR, FAILED, PASSED, SKIPPED, CheckResult
from harden.scan.inversion import InversionConfig, _ClassState, _passes, invert_triggers, mad_anomaly
from harden.scan.verdict import FEATURES, Calibration
from harden.training import TrainConfig, fit


@pytest.fixture(scope="module")
def demo_scan(demo, run_cli, tmp_path_factory):
    """One real CLI scan of the demo model: SARIF to --output, JSON and HTML from the MLflow run."""
    out = tmp_path_factory.mktemp("scan")
    code, _, err = run_cli("scan", "models:/harden-demo@candidate", "--data", demo.data_dir / "clean.npz", "--format", "sarif",
                           "--output", out / "scan.sarif", "--sarif-location", "deploy/model.yaml", "-q")
    version = mlflow.tracking.MlflowClient().get_model_version("harden-demo", demo.version.version)
    mlflow.artifacts.download_artifacts(run_id=version.tags["harden.scan.run_id"], artifact_path="reports", dst_path=str(out))
    report = json.loads((out / "reports" / "scan.json").read_text())
    return code, report, err, json.loads((out / "scan.sarif").read_text()), (out / "reports" / "scan.html").read_text()


def test_demo_model_is_flagged_with_its_true_target(demo, demo_scan):
    code, report, err, _, _ = demo_scan
    assert code == 1, err
    assert report["schema"] == "harden.scan/1"
    assert report["verdict"] == "backdoor" and report["p_backdoor"] >= 0.5
    assert report["suspect_classes"][0] == demo.target
    per_class = {c["target"]: c for c in report["per_class"]}
    assert len(per_class) == 10
    assert per_class[demo.target]["norm"] == min(c["norm"] for c in per_class.values())
    assert per_class[demo.target]["asr"] >= 0.9
    assert {"verdict", "p_backdoor", "suspect_classes", "per_class", "checks", "model_uri", "duration_s", "peak_memory_mb", "harden_version"} <= set(report)


def test_scan_sets_version_tags_and_logs_artifacts(demo, demo_scan):
    _, report, _, _, _ = demo_scan
    version = mlflow.tracking.MlflowClient().get_model_version("harden-demo", demo.version.version)
    assert version.tags["harden.scan.verdict"] == "backdoor"
    assert float(version.tags["harden.scan.p_backdoor"]) == pytest.approx(report["p_backdoor"], abs=1e-4)
    run_id = version.tags["harden.scan.run_id"]
    assert run_id == report["run_id"]
    run = mlflow.get_run(run_id)
    assert run.data.tags["harden.command"] == "scan" and run.data.metrics["p_backdoor"] == pytest.approx(report["p_backdoor"])
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_id)}
    assert {"reports", "images", "scan"} <= artifacts
    images = [a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_id, "images")]
    assert any("anomaly-chart" in p for p in images) and any("reversed-trigger" in p for p in images)


def test_scan_sarif_and_html_outputs(demo, demo_scan):
    _, report, _, sarif, html = demo_scan
    assert sarif["version"] == "2.1.0"
    results = sarif["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == ["harden.backdoor.trigger-inversion"]
    location = results[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert location == "deploy/model.yaml"
    rules = {r["id"]: r for r in sarif["runs"][0]["tool"]["driver"]["rules"]}
    assert float(rules["harden.backdoor.trigger-inversion"]["properties"]["security-severity"]) >= 7
    assert html.count("data:image/png;base64,") >= 2  # anomaly chart and the suspect class's trigger
    assert "reversed trigger toward class 0" in html


@pytest.fixture(scope="module")
def clean_model_file(tmp_path_factory, demo):
    """A clean small CNN trained on the same digits split as the demo, saved as safetensors."""
    from safetensors.torch import save_file

    from harden.data import load_data, split
    from harden.models import InputSpec

    train, _, _ = split(load_data("digits", InputSpec(3, 32, 32), num_classes=10), [0.7, 0.15, 0.15], seed=0)
    torch.manual_seed(1)
    model = create_model("small_cnn", num_classes=10)
    fit(model, train, TrainConfig(epochs=8, lr=2e-3, seed=1))
    path = tmp_path_factory.mktemp("clean") / "clean.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_clean_model_is_not_flagged(clean_model_file, demo, run_cli):
    code, out, err = run_cli("scan", clean_model_file, "--arch", "small_cnn", "--data", demo.data_dir / "clean.npz", "--format", "json", "-q")
    report = json.loads(out)
    assert code == 0, (report["p_backdoor"], err)
    assert report["verdict"] == "clean" and report["suspect_classes"] == []


def test_unknown_architecture_pt2_scans(demo, custom_pt2):
    _, info = custom_pt2
    result = scan(info.model_uri, data=str(demo.data_dir / "clean.npz"), checks=["inversion"],
                  options={"inversion": {"probe_per_class": 4, "max_steps": 30, "warmup_steps": 10}})
    assert result.verdict in VERDICTS and result.checks[0].status in (PASSED, FAILED)
    assert len(result.per_class) == 10 and all(c["steps"] > 0 for c in result.per_class)


def test_data_the_model_gets_wrong_gives_no_verdict(demo, custom_pt2, run_cli, tmp_path):
    """Labels in another order: the model gets nearly every probe image wrong, and inverting it would
    only measure the classes it confuses, so the check is skipped and nothing is flagged."""
    x, y = np.load(demo.data_dir / "clean.npz")["x"], np.load(demo.data_dir / "clean.npz")["y"]
    np.savez(tmp_path / "shifted.npz", x=x, y=(y + 1) % 10)
    code, out, _ = run_cli("scan", custom_pt2[1].model_uri, "--data", tmp_path / "shifted.npz", "--checks", "inversion", "--format", "json", "-q")
    report = json.loads(out)
    assert code == 3 and report["verdict"] == "inconclusive" and report["per_class"] == []
    check = report["checks"][0]
    assert check["status"] == SKIPPED and "does not fit it" in check["message"] and check["details"]["probe_accuracy"] < 0.5


def test_clean_data_of_too_few_classes_gives_no_verdict(demo, custom_pt2, run_cli, tmp_path):
    """Images of one class only: no class has source images of the others to reach it, and the statistics
    the calibration reads would be made up (this data used to score p_backdoor 0.97)."""
    clean = np.load(demo.data_dir / "clean.npz")
    keep = clean["y"] == 3
    np.savez(tmp_path / "threes.npz", x=clean["x"][keep], y=clean["y"][keep])
    code, out, _ = run_cli("scan", custom_pt2[1].model_uri, "--data", tmp_path / "threes.npz", "--checks", "inversion", "--format", "json", "-q")
    report = json.loads(out)
    assert code == 3 and report["verdict"] == "inconclusive" and report["p_backdoor"] is None
    check = report["checks"][0]
    assert check["status"] == SKIPPED and "1 of the model's 10 classes" in check["message"] and check["details"]["probe_classes"] == 1


class _OneLogitNet(torch.nn.Module):
    """A binary classifier with one logit (digit 1 against digit 0), made from the custom CNN."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = self.net(x)
        return logits[:, 1:2] - logits[:, 0:1]


def test_binary_classifier_is_inverted_but_gets_no_calibrated_verdict(custom_pt2, digits_arrays, run_cli, tmp_path):
    """Two classes make both MAD anomaly indices constants: the report keeps the inversion, the verdict is inconclusive."""
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(_OneLogitNet(custom_pt2[0]).eval(), name="binary", input_example=np.zeros((2, 3, 32, 32), np.float32))
    x, y = digits_arrays
    zeros_and_ones = np.flatnonzero(y[900:] < 2)[:16] + 900  # images the custom CNN was not trained on
    np.savez(tmp_path / "binary.npz", x=x[zeros_and_ones], y=y[zeros_and_ones])
    code, out, _ = run_cli("scan", info.model_uri, "--data", tmp_path / "binary.npz", "--checks", "inversion", "--probe-per-class", 4,
                           "--max-steps", 30, "--format", "json", "-q")
    report = json.loads(out)
    assert code == 3 and report["verdict"] == "inconclusive" and report["p_backdoor"] is None
    assert report["checks"][0]["status"] == SKIPPED and "2-class model" in report["checks"][0]["message"]
    assert [c["target"] for c in report["per_class"]] == [0, 1]


def test_nothing_scannable_exits_3(demo, run_cli):
    code, out, _ = run_cli("scan", demo.model_uri, "--checks", "inversion", "--format", "json", "-q")
    assert code == 3
    report = json.loads(out)
    assert report["verdict"] == "inconclusive" and report["checks"][0]["status"] == SKIPPED


def test_unknown_check_is_a_usage_error(run_cli):
    code, _, err = run_cli("scan", "models:/x/1", "--checks", "magic")
    assert code == 4 and "unknown check" in err


def test_verdict_combination_rules():
    unsafe = CheckResult("artifact", FAILED, "bad")
    backdoor = CheckResult("inversion", FAILED, "", details={"p_backdoor": 0.9, "suspect_classes": [3]})
    clean = CheckResult("inversion", PASSED, "", details={"p_backdoor": 0.1})
    broken = CheckResult("inversion", ERROR, "boom")
    assert combine([unsafe, backdoor]) == ("unsafe_artifact", None, [])
    assert combine([backdoor]) == ("backdoor", 0.9, [3])
    assert combine([clean]) == ("clean", 0.1, [])
    assert combine([broken])[0] == "inconclusive"


def test_shipped_calibration_uses_the_current_features_and_is_monotone():
    """calibration.json must be refitted whenever FEATURES change; a smallest trigger that is more of an
    outlier (anomaly index, gap to the next class), larger margin anomalies and a class reached far more
    easily than the typical class by a warp or a stripe pattern must all raise p_backdoor;
    the absolute trigger size and a structured trigger's success must not matter (a fragile clean model
    reaches some class with a small pattern too)."""
    calibration = Calibration.load()
    assert tuple(calibration.features) == FEATURES and len(calibration.coef) == len(FEATURES)
    typical = {"norm_gap": 0.5, "anomaly_index": 1.0, "min_norm_fraction": 0.01, "top_asr": 1.0, "margin_anomaly": 3.0,
               "target_margin_anomaly": 1.0, "warp_asr": 0.05, "stripe_asr": 0.3, "target_separable_asr": 0.6,
               "warp_loss_ratio": 0.3, "stripe_loss_ratio": 0.8}
    p = calibration.probability(typical)
    assert 0 < p < 1
    assert calibration.probability({**typical, "anomaly_index": 4.0}) > p
    assert calibration.probability({**typical, "norm_gap": 2.0}) > p
    assert calibration.probability({**typical, "min_norm_fraction": 0.002}) == p
    assert calibration.probability({**typical, "target_margin_anomaly": 15.0}) > p
    assert calibration.probability({**typical, "warp_asr": 1.0, "stripe_asr": 1.0, "target_separable_asr": 1.0}) == p
    assert calibration.probability({**typical, "warp_loss_ratio": 5.0}) > p
    assert calibration.probability({**typical, "stripe_loss_ratio": 3.0}) > p


def test_mad_anomaly_flags_the_low_outlier():
    norms = np.array([50.0, 52.0, 48.0, 51.0, 49.0, 5.0])
    index = mad_anomaly(norms)
    assert index.argmax() == 5 and index[5] > 2 and (index[:5] < 2).all()


class PatchBackdoor(torch.nn.Module):
    """Classes are bands of the image mean (changing one needs a large mask); a bright top-left
    pixel is a hard-wired backdoor to class 2 (one pixel suffices)."""

    def forward(self, x):
        mean = x.mean((1, 2, 3))
        logits = torch.stack([-((4 * mean - (k + 0.5)) ** 2) * 10 for k in range(4)], 1)
        bump = 40 * x[:, :, 0, 0].mean(1)  # clean images keep this pixel black
        return logits + torch.nn.functional.one_hot(torch.tensor(2), 4).float() * bump[:, None]


def _banded_images() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    labels = torch.arange(40) % 4
    images = ((labels.float() + 0.5) / 4).view(-1, 1, 1, 1).expand(-1, 3, 8, 8) + 0.02 * torch.randn(40, 3, 8, 8)
    images[:, :, 0, 0] = 0.0
    return images.clamp(0, 1), labels


def test_inversion_finds_a_planted_one_pixel_trigger():
    config = InversionConfig(probe_per_class=10, max_steps=150, warmup_steps=20, keep_fraction=1.0, margin_steps=10)
    result = invert_triggers(PatchBackdoor(), *_banded_images(), 4, config)
    norms = [c.norm for c in result.classes]
    assert int(np.argmin(norms)) == 2 and norms[2] < 0.25 * sorted(norms)[1], norms
    assert result.classes[2].asr >= 0.9
    assert max(c.margin for c in result.classes) > 0


def test_pool_check_keeps_the_smallest_trigger_that_generalises_and_its_own_norm():
    """Minibatch successes are kept as candidates; only the final choice is checked on the pool,
    smallest first, and the reported norm is that of the mask actually kept."""
    state = _ClassState(0, (3, 8, 8), InversionConfig(), torch.Generator().manual_seed(0), "cpu")
    for norm in (9.0, 7.0, 5.0, 3.0):
        state.candidates.append((norm, torch.full((1, 8, 8), norm / 64), torch.zeros(3, 8, 8)))
    checked = []
    passes_from_five_up = lambda mask, pattern: checked.append(float(mask.sum())) or float(mask.sum() >= 5.0 - 1e-4)  # noqa: E731
    norm, mask, _ = state.settle(passes_from_five_up, success_asr=0.95)
    assert norm == 5.0 and checked == pytest.approx([3.0, 5.0])
    assert state.settle(None, success_asr=0.95)[0] == 3.0  # plain Neural Cleanse trusts the minibatch
    assert state.settle(lambda mask, pattern: 0.0, success_asr=0.95) is None

    result = invert_triggers(PatchBackdoor(), *_banded_images(), 4, InversionConfig(max_steps=80, warmup_steps=20, margin_steps=5))
    for trigger in (c for c in result.classes if c.succeeded):
        assert trigger.norm == pytest.approx(float(trigger.mask.sum()), rel=1e-4)


def test_plain_neural_cleanse_baseline_does_fixed_work_without_harden_additions():
    """The benchmark's baseline: every class the same number of steps, no margins computed."""
    result = invert_triggers(PatchBackdoor(), *_banded_images(), 4, InversionConfig.plain_neural_cleanse(60))
    assert result.total_steps == 4 * 60 and all(c.steps == 60 for c in result.classes)
    assert all(c.margin == 0.0 for c in result.classes)
    assert int(np.argmin([c.norm for c in result.classes])) == 2


def test_classes_share_forward_passes_within_the_pixel_budget_and_give_the_same_triggers():
    """auto groups classes per pass while the images fit `batch_pixels` (large images fall back to one
    class per pass); grouping changes the speed, not the triggers: each class keeps its own loss and Adam."""
    classes = list(range(10))
    auto = InversionConfig()
    assert [len(p) for p in _passes(classes, 16, 32 * 32, auto)] == [10]  # the zoo's 32x32 digits: one pass
    assert [len(p) for p in _passes(classes, 16, 64 * 64, auto)] == [4, 4, 2]
    assert [len(p) for p in _passes(classes, 8, 224 * 224, auto)] == [1] * 10
    assert [len(p) for p in _passes(classes, 8, 224 * 224, replace(auto, strategy="batched"))] == [10]
    assert [len(p) for p in _passes(classes, 16, 32 * 32, replace(auto, strategy="loop"))] == [1] * 10

    base = InversionConfig(max_steps=60, warmup_steps=20, margin_steps=5)
    runs = {strategy: invert_triggers(PatchBackdoor(), *_banded_images(), 4, replace(base, strategy=strategy))
            for strategy in ("loop", "auto")}
    assert [c.steps for c in runs["loop"].classes] == [c.steps for c in runs["auto"].classes]
    assert [c.norm for c in runs["loop"].classes] == pytest.approx([c.norm for c in runs["auto"].classes], rel=1e-3)


def test_sensitivity_separation_is_logged_for_purify(demo, run_cli, tmp_path):
    """--train-data runs the D-BR sensitivity test on the demo's own (poisoned) training set;
    the separation lands in the scan's MLflow run for purify. (Budget thresholds: no --data.)"""
    from harden.attacks import Attack, PoisonedDataset
    from harden.data import load_data, split, to_uint8_arrays

    train, _, _ = split(load_data("digits", InputSpec(3, 32, 32), num_classes=10), [0.7, 0.15, 0.15], seed=0)
    poisoned = PoisonedDataset(train, Attack(demo.trigger, target=demo.target, num_classes=10), rate=0.1, seed=0)  # as run_demo did
    x, y = to_uint8_arrays(poisoned)
    np.savez(tmp_path / "suspect.npz", x=x, y=y)
    code, out, err = run_cli("scan", demo.model_uri, "--train-data", tmp_path / "suspect.npz",
                             "--checks", "sensitivity", "--format", "json", "-q")
    report = json.loads(out)
    check = report["checks"][0]
    assert check["name"] == "sensitivity" and check["status"] in (PASSED, FAILED), err
    assert check["details"]["separation_path"] == f"runs:/{report['run_id']}/scan/separation.json"
    separation = json.loads(mlflow.artifacts.load_text(check["details"]["separation_path"]))
    assert separation["schema"] == "harden.separation/1" and separation["num_samples"] == len(y)
    # what `harden purify --separation runs:/...` reads back
    assert load_separation(check["details"]["separation_path"], None, poisoned, None, "cpu", 0) == separation
    with pytest.raises(TrackingError, match="separation runs:/.*/scan/missing.json not found"):
        load_separation(f"runs:/{report['run_id']}/scan/missing.json", None, poisoned, None, "cpu", 0)
    flagged = set(separation["poisoned"])
    truth = set(poisoned.poisoned.tolist())
    share = len(truth) / len(y)  # 9% of the training set is poisoned
    assert flagged and len(flagged & truth) / len(flagged) > 3 * share, (len(flagged), len(flagged & truth))
