"""`harden purify`: mask machinery, each method on small models, the guardrail, registration and interrupts."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import CustomNet, TinyEncoder, registry_snapshot, train_quickly, write_npz

from harden import tracking
from harden.attacks import Attack, PoisonedDataset
from harden.data import TensorDataset, load_data, split, to_uint8_arrays
from harden.demo import DEMO_SPEC
from harden.errors import HardenError, TrackingError
from harden.evaluation import evaluate
from harden.models import create_model, load_model
from harden.models.wrappers import PixelModel
from harden.publish import Publication, publish
from harden.purify import PurifyResult, purify
from harden.purify.base import INVERSION_RULES, METHODS, SETTING_RULES, BestCheckpoint, PurifyContext, options_from_pairs
from harden.purify.nft import MaskedNetwork, anchored_cross_entropy, find_mask_sites, lower_bounds, mixup_weight
from harden.purify.retreat import retreat
from harden.purify.triggers import AdditiveTrigger, ReversedTrigger, TriggerChaser, refreshed
from harden.scan.inversion import InversionConfig

FAST_INVERSION = {"max_steps": 60, "probe_per_class": 6}


class GateNet(torch.nn.Module):
    """No BatchNorm: NFT gates conv and linear output channels instead."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.hidden = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        return self.head(torch.relu(self.hidden(x)))


class NormNet(torch.nn.Module):
    """No BatchNorm but GroupNorm and LayerNorm: their per-channel scale γ is masked as BatchNorm's would be."""

    def __init__(self):
        super().__init__()
        self.conv, self.group = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8)
        self.hidden, self.layer = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.group(self.conv(x))).mean((2, 3))
        return self.head(torch.relu(self.layer(self.hidden(x))))


class BiasFreeHead(GateNet):
    """A head without bias runs as a plain matmul: it must still be found, and left unmasked."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(16, 10, bias=False)


def _exported(net: torch.nn.Module) -> torch.nn.Module:
    program = torch.export.export(net.eval(), (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return program.module()


def test_refreshed_additive_triggers_get_stronger_within_epsilon_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    images, labels = torch.rand(40, 3, 32, 32), torch.arange(40) % 10
    corner = torch.zeros(1, 32, 32)
    corner[:, -4:, -4:] = 1.0
    triggers = [ReversedTrigger(3, corner, torch.rand(3, 32, 32), norm=16.0, asr=0.0), AdditiveTrigger(3, torch.zeros(3, 32, 32), 0.1, 0.0)]
    sources = images[labels != 3]

    def target_loss(trigger) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(trigger(sources)), torch.full((len(sources),), 3)))

    model.train()
    model.features[1].eval()  # a frozen BatchNorm, as `bn_mode=freeze` leaves it mid-training
    modes = [layer.training for layer in model.modules()]
    new = refreshed(triggers, model, images, labels, steps=20, device=torch.device("cpu"))
    assert [layer.training for layer in model.modules()] == modes
    assert [type(t) for t in new] == [ReversedTrigger, AdditiveTrigger] and [t.target for t in new] == [3, 3]
    assert new[0] is triggers[0]  # patches stay where the inversion found them
    assert target_loss(new[1]) < target_loss(triggers[1]) and float(new[1].delta.abs().max()) <= 0.1 + 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_chaser_rebounds_additive_triggers_once_and_only_when_asked():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10).eval()
    data = TensorDataset(torch.rand(40, 3, 32, 32), torch.arange(40) % 10)
    patch = ReversedTrigger(3, torch.zeros(1, 32, 32), torch.rand(3, 32, 32), norm=16.0, asr=0.0)
    triggers = [patch, AdditiveTrigger(3, torch.full((3, 32, 32), 0.09), 0.1, 0.0)]
    chase = lambda epsilon: TriggerChaser(triggers, model, data, seed=0, interval=0, steps=5, device=torch.device("cpu"), epsilon=epsilon)
    assert chase(None).triggers == triggers and chase(0.1).triggers == triggers  # the reversal's own bound: nothing to redo
    stronger = chase(0.2).triggers
    assert stronger[0] is patch and stronger[1].epsilon == 0.2
    assert 0.1 < float(stronger[1].delta.abs().max()) <= 0.2 + 1e-6  # warm-started at 0.09, and it may now go past 0.1


@pytest.mark.parametrize("build, placement, kinds, granularity", [
    (lambda: create_model("small_cnn", num_classes=10), "auto", {"norm"}, "channel"),
    (lambda: _exported(CustomNet()), "auto", {"norm"}, "channel"),
    (lambda: GateNet(), "auto", {"conv", "linear"}, "channel"),
    (lambda: create_model("small_cnn", num_classes=10), "bn+conv", {"norm", "conv"}, "weight"),
    (lambda: GateNet(), "auto", {"conv", "linear"}, "weight"),
    (lambda: BiasFreeHead(), "auto", {"conv", "linear"}, "channel"),
    (lambda: NormNet(), "auto", {"norm"}, "channel"),
    (lambda: _exported(NormNet()), "bn+conv", {"norm", "conv", "linear"}, "weight"),
])
def test_masks_fold_into_plain_weights_with_identical_outputs(build, placement, kinds, granularity):
    torch.manual_seed(0)
    net = build()
    model = PixelModel(net).eval()
    names_before = sorted(name for name, _ in net.named_parameters())
    x = torch.rand(6, 3, 32, 32)
    sites = find_mask_sites(model, x[:1], placement)
    assert {s.kind for s in sites} == kinds
    head = [name for name, p in net.named_parameters() if p.ndim == 2][-1]
    assert head not in {s.weight for s in sites}, "the classifier head is never masked"
    masked = MaskedNetwork(model, sites, lower_bounds(len(sites), "none"), granularity=granularity).eval()
    weights = dict(net.named_parameters())
    expected_shapes = [weights[s.weight].shape if granularity == "weight" and s.kind != "norm" else (s.channels,) for s in sites]
    assert [m.shape for m in masked.masks] == expected_shapes
    with torch.no_grad():
        for mask in masked.masks:
            mask.uniform_(0.1, 1.0)
        expected = masked(x)
        assert not torch.allclose(expected, PixelModel(build()).eval()(x))  # the masks change the outputs
    folded = masked.fold()
    assert sorted(name for name, _ in folded.net.named_parameters()) == names_before  # no extra parameters
    with torch.no_grad():
        assert torch.allclose(folded(x), expected, atol=1e-5)


class ScriptedClassifier(torch.nn.Module):
    """Answers image i (its pixels all equal i / 100) with `answers[i]`: the test sets its accuracy."""

    def __init__(self, answers: list[int]):
        super().__init__()
        self.register_buffer("answers", torch.tensor(answers))

    def forward(self, x):
        index = (x[:, 0, 0, 0] * 100).round().long()
        return torch.nn.functional.one_hot(self.answers[index], 2).float()


def test_checkpoint_keeps_the_latest_epoch_within_one_validation_image_of_the_best():
    labels = [0] * 10
    validation = TensorDataset(torch.arange(10).float().div(100).view(10, 1, 1, 1).expand(10, 3, 4, 4), labels)
    model = ScriptedClassifier(labels)  # before training: 10/10 right
    checkpoint = BestCheckpoint(model, PurifyContext(None, validation, validation, [], torch.device("cpu"), 0))
    for wrong in (1, 3, 2):  # 9/10 (one image below the best: a tie, so the later epoch wins), 7/10, 8/10
        model.answers.copy_(torch.tensor([1] * wrong + [0] * (10 - wrong)))
        checkpoint.update()
    checkpoint.restore()
    assert int(model.answers.sum()) == 1
    assert [round(h["accuracy"], 1) for h in checkpoint.history] == [1.0, 0.9, 0.7, 0.8]


class SignClassifier(torch.nn.Module):
    """Class 0 while its one weight is positive, class 1 otherwise."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return torch.stack([self.weight.expand(len(x)), torch.zeros(len(x))], 1)


def test_checkpoint_validates_and_keeps_the_running_average_not_the_raw_weights():
    validation = TensorDataset(torch.zeros(4, 3, 4, 4), [0] * 4)
    model = SignClassifier()
    checkpoint = BestCheckpoint(model, PurifyContext(None, validation, validation, [], torch.device("cpu"), 0), average=0.9)
    with torch.no_grad():
        model.weight.fill_(-1.0)  # an optimiser step that gets every validation image wrong
    checkpoint.step()  # the average: 0.9 * 1 + 0.1 * (-1)
    assert checkpoint.update() == 1.0  # scored on the average, which still answers 0
    assert float(model.weight) == -1.0  # training goes on from the raw weights
    checkpoint.restore()
    assert float(model.weight) == pytest.approx(0.8)


class BrightnessBackdoor(torch.nn.Module):
    """Two classes told apart by brightness; `k` is a backdoor that a +0.1 brightening turns on:
    dark images go to class 1 once k > 2 × 1.05, so along k = 10·(1 − α) the attack returns below α = 0.8."""

    def __init__(self, k: float):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k))

    def forward(self, x):
        brightness = x.mean((1, 2, 3))
        return torch.stack([torch.zeros_like(brightness), 1.05 * (brightness - 0.5) + self.k * (brightness - 0.2)], 1)


def test_retreat_steps_back_toward_the_source_until_a_re_found_trigger_works_again():
    images = torch.cat([torch.full((8, 3, 4, 4), 0.2), torch.full((8, 3, 4, 4), 0.8)])
    data = TensorDataset(images, [0] * 8 + [1] * 8)
    source, model = BrightnessBackdoor(10.0), BrightnessBackdoor(0.0)
    ctx = PurifyContext(None, data, data, [AdditiveTrigger(1, torch.full((3, 4, 4), 0.1), 0.1, 1.0)], torch.device("cpu"), 0)
    result = retreat(model, source.state_dict(), ctx, limit=0.5, margin=0.05)
    assert result.alpha == pytest.approx(0.8) and float(model.k) == pytest.approx(2.0)
    assert [round(step["alpha"], 1) for step in result.walk] == [1.0, 0.9, 0.8, 0.7]  # stopped at the first failure
    assert [step["attack_asr"] for step in result.walk] == [0.0, 0.0, 0.0, 1.0]
    assert all(step["accuracy"] == 1.0 for step in result.walk)
    loose = BrightnessBackdoor(0.0)  # a margin of 1: nothing the trigger does stops the walk, which goes as far as `limit`
    assert retreat(loose, source.state_dict(), ctx, limit=0.5, margin=1.0).alpha == pytest.approx(0.5)
    patch_only = PurifyContext(None, data, data, [ReversedTrigger(1, torch.ones(1, 4, 4), torch.ones(3, 4, 4), 16.0, 1.0)], torch.device("cpu"), 0)
    for kwargs, context in (({"limit": 0.0, "margin": 0.05}, ctx), ({"limit": 0.5, "margin": 0.05}, patch_only)):
        model = BrightnessBackdoor(0.0)
        assert retreat(model, source.state_dict(), context, **kwargs).alpha == 1.0 and float(model.k) == 0.0


def test_unknown_mask_granularity_is_refused():
    model = PixelModel(GateNet()).eval()
    sites = find_mask_sites(model, torch.rand(1, 3, 32, 32))
    with pytest.raises(HardenError, match="granularity"):
        MaskedNetwork(model, sites, lower_bounds(len(sites), "none"), granularity="kernel")


def test_mixup_weight_is_beta_alpha_alpha_and_repeatable():
    """α = 1 draws the published uniform λ from the seeded generator; a small α keeps most
    batches near one image (λ near 0 or 1); 0 turns MixUp off."""
    generator, reference = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert [mixup_weight(1.0, generator) for _ in range(5)] == pytest.approx([float(torch.rand((), generator=reference)) for _ in range(5)])
    generator = torch.Generator().manual_seed(0)
    draws = np.array([mixup_weight(0.2, generator) for _ in range(400)])
    assert 0.0 <= draws.min() and draws.max() <= 1.0
    assert ((draws < 0.1) | (draws > 0.9)).mean() > 0.5  # uniform would put 20% there
    assert mixup_weight(0.0, generator) == 1.0


def test_anchor_weighs_only_the_unstamped_images_of_target_classes():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 3, 1, 2, 0])
    stamped = torch.tensor([False, True, False, False, True])
    targets = torch.tensor([3, 2])
    per_row = F.cross_entropy(logits, labels, reduction="none")
    weights = torch.tensor([2.0, 1.0, 1.0, 2.0, 1.0])  # unstamped 3 and unstamped 2; the stamped 3 is not anchored
    assert anchored_cross_entropy(logits, labels, stamped, targets, 2.0) == pytest.approx(float((weights * per_row).sum() / weights.sum()))
    assert anchored_cross_entropy(logits, labels, stamped, targets, 1.0) == pytest.approx(float(F.cross_entropy(logits, labels)))
    assert anchored_cross_entropy(logits, labels, stamped, torch.tensor([], dtype=torch.long), 2.0) == pytest.approx(float(per_row.mean()))


def test_method_setting_pairs_become_purify_options_and_malformed_ones_are_refused():
    pairs = ["trigger-unlearn.lr=1e-3", "trigger-unlearn.distill=0", "inversion.max_steps=100", "nft.placement=a=b"]
    assert options_from_pairs(pairs) == {"trigger-unlearn": {"lr": "1e-3", "distill": "0"}, "inversion": {"max_steps": "100"},
                                         "nft": {"placement": "a=b"}}
    for bad in ("lr=1e-3", "trigger-unlearn.lr", ".lr=1", "nft.=1"):
        with pytest.raises(HardenError, match="METHOD.KEY=VALUE"):
            options_from_pairs([bad])


def test_lower_bounds_reference_and_depth_rules():
    reference = lower_bounds(19, "index")
    assert reference[0] == pytest.approx(0.485, abs=1e-3) and reference[3] == pytest.approx(0.108, abs=1e-3)
    assert lower_bounds(19, "depth") == pytest.approx(reference)  # ResNet-18 depth: the published schedule
    shallow = lower_bounds(4, "depth")
    assert shallow[0] < 0.1 and shallow[-1] == pytest.approx(reference[-1])  # a 4-layer net reaches ResNet-18's deepest bound
    assert lower_bounds(3, "none") == [0.0, 0.0, 0.0]
    with pytest.raises(HardenError):
        lower_bounds(3, "sideways")


@pytest.fixture(scope="module")
def demo_train_npz(demo, tmp_path_factory):
    """The demo's poisoned training set, as the suspect training data a user would hand over."""
    digits = load_data("digits", DEMO_SPEC, num_classes=10)
    train, _, _ = split(digits, [0.7, 0.15, 0.15], seed=0)
    poisoned = PoisonedDataset(train, Attack(demo.trigger, target=demo.target, num_classes=10), rate=0.1, seed=0)
    return write_npz(tmp_path_factory.mktemp("suspect") / "train.npz", *to_uint8_arrays(poisoned)), poisoned.poisoned


def _known_asr(model, data_dir, demo) -> float:
    test = load_data(str(data_dir / "test.npz"), DEMO_SPEC, num_classes=10)
    return evaluate(model, test, trigger=demo.trigger, target=demo.target).asr


def test_cli_purifies_registers_and_aliases_the_demo(demo, run_cli, tmp_path):
    before_versions = registry_snapshot()
    report_file, out_dir = tmp_path / "purify.json", tmp_path / "purified"
    code, _, err = run_cli("purify", demo.model_uri, "--data", demo.data_dir / "clean.npz", "--method", "trigger-unlearn",
                           "--trigger", demo.trigger, "--target", demo.target, "--test-data", demo.data_dir / "test.npz", "--triggers", "1",
                           "--set", "retreat=0.5", "--alias", "hardened", "--output", out_dir, "--format", "json", "--report", report_file, "-q")
    assert code == 0, err
    report = json.loads(report_file.read_text())
    assert report["schema"] == "harden.purify/1"
    assert {"output_model_uri", "before", "after", "method", "params", "duration_s", "peak_memory_mb"} <= set(report)
    assert report["before"]["test_known_asr"] > 0.9 and report["after"]["test_known_asr"] < 0.1
    assert report["acc_drop_points"] <= 2.0
    walk = report["params"]["retreat_walk"]  # the purified weights were walked back toward the source, and kept where it stopped
    assert walk[0]["alpha"] == 1.0 and report["params"]["retreat_alpha"] in [step["alpha"] for step in walk]
    new = [v for v in registry_snapshot() if v not in before_versions]
    assert new == [("harden-demo", new[0][1])] and report["output_model_uri"] == f"models:/harden-demo/{new[0][1]}"
    version = tracking.resolve_registered_version("models:/harden-demo@hardened")
    assert version.version == new[0][1]
    tags = tracking.version_tags(version)
    assert tags["harden.purified_from"] == demo.model_uri and tags["harden.method"] == "trigger-unlearn"
    assert float(tags["harden.purify.acc_before"]) >= float(tags["harden.purify.acc_after"]) - 0.5
    assert "harden.purify.known_asr_after" in tags
    # it loads through pyfunc with its signature, and the local copy is the same model
    predictions = mlflow.pyfunc.load_model(report["output_model_uri"]).predict(np.zeros((3, 3, 32, 32), np.float32))
    assert np.asarray(predictions).shape == (3, 10)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(report["output_model_uri"])).read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and any(r.startswith("mlflow==") for r in requirements)
    registered, local = load_model(report["output_model_uri"]), load_model(out_dir)
    assert registered.format == local.format == "pt2" and registered.arch == "small_cnn"
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(registered.module(x), local.module(x), atol=1e-5)
    assert _known_asr(registered, demo.data_dir, demo) < 0.1


@pytest.mark.parametrize("args, tripped", [
    # any accuracy change exceeds a negative allowance (and any backdoor left is allowed)
    (["--max-acc-drop", "-50", "--max-asr", "1"], "accuracy"),
    # one epoch at lr 1e-5 leaves the backdoor in place: the known trigger still works
    (["--max-acc-drop", "50", "--trigger", "grid_paste", "--target", "0"], "known-trigger"),
    # ... and so does the most suspect class's reversed trigger when no trigger is known
    (["--max-acc-drop", "50"], "reversed-trigger (class 0)"),
])
def test_guardrail_trips_and_nothing_is_registered_or_written(demo, run_cli, tmp_path, args, tripped):
    before_versions = registry_snapshot()
    code, out, _ = run_cli("purify", demo.model_uri, "--data", demo.data_dir / "clean.npz", "--method", "trigger-unlearn",
                           "--output", tmp_path / "never", "--format", "json", "-q", "--triggers", "1", *args,
                           "--set", "epochs=1", "--set", "lr=1e-5", "--set", "inversion.max_steps=60")
    assert code == 1
    report = json.loads(out)
    assert report["guardrail_passed"] is False and report["output_model_uri"] is None
    assert report["validation_images"] == 53  # the stratified 20% of the demo's 270 clean images
    if tripped == "accuracy":
        assert report["residual_asr"] <= report["max_asr"] == 1 and report["acc_drop_points"] > -50
    else:
        assert report["residual_asr"] > report["max_asr"] == 0.2 and report["acc_drop_points"] <= 50
        assert report["residual_trigger"] == tripped
    assert registry_snapshot() == before_versions
    assert not (tmp_path / "never").exists()


def test_a_validation_split_coarser_than_the_bound_is_said():
    """36 validation images weigh 2.8 points each: a 2-point accuracy bound cannot be resolved there
    (a tiny ViT lost 7.4 test points and passed), and the report says so."""
    def result(images: int) -> PurifyResult:
        return PurifyResult("trigger-unlearn", {}, None, None, None, None, [], 2.0, None, validation_images=images)

    assert "judged 36 validation images, where one image is 2.8 points" in result(36).coarse_guardrail
    assert result(50).coarse_guardrail is None and result(500).coarse_guardrail is None


def test_nft_lowers_reversed_trigger_success_and_keeps_the_architecture(demo):
    result = purify(demo.model_uri, str(demo.data_dir / "clean.npz"), method="nft", triggers=1,
                    options={"inversion": FAST_INVERSION, "nft": {"steps": 60, "rounds": 3, "batch_size": 64}})
    assert result.before.reversed_asr > 0.8 and result.after.reversed_asr < result.before.reversed_asr - 0.3
    assert set(result.model.net.state_dict()) == set(result.source.trainable().net.state_dict())
    masks = result.params["masks"]
    weights = dict(result.model.net.named_parameters())
    assert {m["kind"] for m in masks} == {"norm", "conv"} and sum(m["kind"] == "norm" for m in masks) == 4
    assert all(m["masks"] == (weights[m["layer"]].numel() if m["kind"] == "conv" else m["channels"]) for m in masks)


def test_unlearn_relearn_retrains_on_the_separation_and_the_asr_guardrail_judges_it(demo, demo_train_npz, tmp_path):
    train_npz, _ = demo_train_npz
    result = purify(demo.model_uri, str(demo.data_dir / "clean.npz"), method="unlearn-relearn", train_data=str(train_npz),
                    trigger=demo.trigger, target=demo.target, test_data=str(demo.data_dir / "test.npz"), triggers=1,
                    options={"inversion": FAST_INVERSION, "unlearn-relearn": {"epochs": 4}})
    assert result.params["flagged_poisoned"] > 0 and result.params["flagged_clean"] > result.params["flagged_poisoned"]
    # On this demo D-BR's separation flags few of the poisoned samples and the backdoor survives (see the README);
    # what must hold is that the model was retrained without losing its clean accuracy.
    before_state, after_state = result.source.trainable().net.state_dict(), result.model.net.state_dict()
    assert any(not torch.equal(before_state[k], after_state[k]) for k in before_state if after_state[k].is_floating_point())
    assert result.after.test_accuracy > result.before.test_accuracy - 0.05
    # whether the backdoor went is judged by the known trigger on the validation split; a surviving one is not registered
    assert result.residual.trigger == "known-trigger" and result.residual.asr == result.after.known_asr
    assert result.passed == (result.accuracy_kept and result.after.known_asr <= 0.2)
    # a saved separation for a different training set is refused
    bogus = tmp_path / "separation.json"
    bogus.write_text(json.dumps({"schema": "harden.separation/1", "num_samples": 3, "poisoned": [0], "clean": [1]}))
    with pytest.raises(HardenError, match="covers 3 samples"):
        purify(demo.model_uri, str(demo.data_dir / "clean.npz"), method="unlearn-relearn", train_data=str(train_npz),
               separation=str(bogus), options={"inversion": FAST_INVERSION})


def test_unknown_pt2_architecture_is_purified_and_stays_pt2(mlflow_home, digits_arrays, run_cli, tmp_path):
    x, y = digits_arrays
    attack = Attack("grid_paste", target=3, num_classes=10)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, clean, test = order[:1200], order[1200:1500], order[1500:]
    poison = rng.choice(train[y[train] != 3], 120, replace=False)
    images = x.copy()
    stamped = attack.trigger(torch.from_numpy(images[poison]).permute(0, 3, 1, 2).float() / 255)
    images[poison] = (stamped.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    labels = y.copy()
    labels[poison] = 3
    torch.manual_seed(0)
    # 8 epochs: with 6 the patch implanted at ASR 0.40 only (torch 2.14.1 CPU), too weak to test removal on
    net = train_quickly(CustomNet(), images[train], labels[train], epochs=8)
    with mlflow.start_run():
        mlflow.pytorch.log_model(net, name="model", input_example=np.zeros((2, 3, 32, 32), np.float32), registered_model_name="outside-cnn")
    clean_npz = write_npz(tmp_path / "clean.npz", x[clean], y[clean])
    test_npz = write_npz(tmp_path / "test.npz", x[test], y[test])
    code, out, err = run_cli("purify", "models:/outside-cnn/1", "--data", clean_npz, "--method", "trigger-unlearn",
                             "--trigger", "grid_paste", "--target", 3, "--test-data", test_npz, "--format", "json", "-q",
                             "--max-acc-drop", "5")
    assert code == 0, err
    report = json.loads(out)
    assert report["before"]["test_known_asr"] > 0.5 and report["after"]["test_known_asr"] < report["before"]["test_known_asr"] / 3
    purified = load_model(report["output_model_uri"])
    assert purified.format == "pt2" and purified.arch is None
    assert sorted(purified.module.net.state_dict()) == sorted(load_model("models:/outside-cnn/1").module.net.state_dict())


def test_every_default_setting_obeys_its_own_rule():
    """The rules refuse a user's value before any work; a default outside them would be refused as an override
    of itself, and a numeric setting without any rule would let any value through to a crash minutes later."""
    inversion = {field.name: field.default for field in dataclasses.fields(InversionConfig)}
    for name, defaults, rules in [(m.name, m.defaults, {**SETTING_RULES, **m.rules}) for m in METHODS.values()] + [("inversion", inversion, INVERSION_RULES)]:
        for key, default in defaults.items():
            if isinstance(default, bool):
                continue
            assert key in rules, f"{name}.{key} has no rule"
            assert rules[key].allowed(default), f"{name}.{key}={default} breaks its rule: {rules[key].expected}"


@pytest.mark.parametrize("args, message", [
    (["--set", "wobble=3"], "unknown setting"),
    (["--set", "epochs=many"], "expected int"),
    (["--set", "average=1"], "expected a decay in [0, 1)"),
    (["--set", "retreat=1.5"], "expected how far back toward the source to look"),
    (["--method", "nft", "--set", "anchor=0"], "expected a positive loss weight"),
    (["--method", "nft", "--set", "epsilon=0"], "expected a bound on the additive triggers"),
    (["--method", "nft", "--set", "placement=everywhere"], "placement=everywhere: expected one of auto, bn, conv, bn+conv"),
    (["--set", "optimizer=rmsprop"], "optimizer=rmsprop: expected one of adam, adamw, sgd"),
    (["--set", "lr=-1e-3"], "lr=-0.001: expected a number above 0"),
    (["--set", "epochs=0"], "epochs=0: expected a count of at least 1"),
    (["--set", "inversion.lr=fast"], "setting inversion.lr='fast': expected float"),
    (["--set", "inversion.strategy=fast"], "inversion.strategy=fast: expected one of auto, loop, batched"),
    (["--method", "unlearn-relearn"], "needs the suspect training set"),
    (["--trigger", "grid_paste"], "--trigger needs --target"),
    (["--max-asr", "1.5"], "--max-asr 1.5: expected a fraction between 0 and 1"),
])
def test_bad_purify_input_is_one_line_exit_2(demo, run_cli, args, message):
    before_versions = registry_snapshot()
    code, _, err = run_cli("purify", demo.model_uri, "--data", demo.data_dir / "clean.npz", "-q", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert registry_snapshot() == before_versions


def test_data_the_model_gets_wrong_is_refused_before_any_work(demo, run_cli, tmp_path):
    """Labels in another order than the model's classes: fine-tuning on them would relabel the model."""
    clean = np.load(demo.data_dir / "clean.npz")
    shifted = write_npz(tmp_path / "shifted.npz", clean["x"], (clean["y"] + 1) % 10)
    before_versions = registry_snapshot()
    code, _, err = run_cli("purify", demo.model_uri, "--data", shifted, "-q")
    assert code == 2 and "the data does not fit it" in err and len(err.strip().splitlines()) == 1, err
    assert registry_snapshot() == before_versions


def test_a_torchscript_model_is_refused_before_any_work(demo, run_cli, tmp_path):
    """TorchScript cannot be copied for training; the refusal comes before minutes of trigger reversal."""
    net = torch.jit.trace(CustomNet().eval(), torch.rand(2, 3, 32, 32))
    net.save(str(tmp_path / "m.ts"))
    code, _, err = run_cli("purify", tmp_path / "m.ts", "--input-size", "3x32x32", "--data", demo.data_dir / "clean.npz", "-q",
                           "--set", "inversion.max_steps=1000")
    assert code == 2 and "a torchscript model cannot be trained; pass --arch" in err and len(err.strip().splitlines()) == 1, err


def test_clean_data_missing_a_class_is_refused_before_any_work(demo, run_cli, tmp_path):
    """The guardrail measures accuracy on the clean data's classes only; a class it has no images of could be forgotten unseen."""
    clean = np.load(demo.data_dir / "clean.npz")
    keep = clean["y"] != 9
    partial = write_npz(tmp_path / "no_nines.npz", clean["x"][keep], clean["y"][keep])
    before_versions = registry_snapshot()
    code, _, err = run_cli("purify", demo.model_uri, "--data", partial, "-q")
    assert code == 2 and "fewer than two images of class(es) 9;" in err and len(err.strip().splitlines()) == 1, err
    assert registry_snapshot() == before_versions


def test_output_dir_in_use_is_refused_before_any_work(demo, run_cli, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    code, _, err = run_cli("purify", demo.model_uri, "--data", demo.data_dir / "clean.npz", "--output", tmp_path / "taken")
    assert code == 2 and "not empty" in err


def test_failure_after_registration_deletes_the_version(demo):
    """Registration is one call with every tag; if moving the alias fails, the version is deleted again."""
    source = load_model(demo.model_uri)
    before_versions = registry_snapshot()
    with tracking.command_run("purify", demo.model_uri):
        with pytest.raises(TrackingError):
            publish(source.trainable().net, source, tags={"harden.method": "x"}, alias="not a valid alias!")
    assert registry_snapshot() == before_versions


def test_an_interrupt_after_publishing_withdraws_everything_and_gives_the_alias_back(demo, tmp_path):
    """Ctrl-C while the report is logged or the run is closed: the new version goes, the alias returns
    to the version that held it (deleting a version takes its aliases along), --output goes too."""
    from mlflow.tracking import MlflowClient

    source = load_model(demo.model_uri)
    name, holder = source.registered.name, source.registered.version
    MlflowClient().set_registered_model_alias(name, "guarded", holder)
    before_versions = registry_snapshot()
    with pytest.raises(KeyboardInterrupt):
        with Publication() as publication, tracking.command_run("purify", demo.model_uri):
            published = publication.publish(source.trainable().net, source, tags={}, alias="guarded", output=tmp_path / "out")
            assert tracking.alias_holder(name, "guarded") == published.version.version != holder and (tmp_path / "out").is_dir()
            raise KeyboardInterrupt
    assert registry_snapshot() == before_versions and tracking.alias_holder(name, "guarded") == holder
    assert not (tmp_path / "out").exists()
    MlflowClient().delete_registered_model_alias(name, "guarded")


def test_sigterm_mid_run_leaves_no_version(demo, mlflow_home):
    before_versions = registry_snapshot()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "harden", "purify", demo.model_uri, "--data", str(demo.data_dir / "clean.npz"), "--method", "nft",
         "--set", "steps=100000", "--alias", "interrupted"],
        cwd=mlflow_home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(12)  # loaded, inverting or masking: well before registration
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in err
    assert registry_snapshot() == before_versions
    with pytest.raises(TrackingError):
        tracking.resolve_registered_version("models:/harden-demo@interrupted")


def test_encoder_trigger_unlearning_breaks_the_collapse(digits_arrays, tmp_path):
    """A backdoored encoder sends patched images to class 0's embedding; RECEIVE-style unlearning undoes it."""
    from harden.data import TensorDataset
    from harden.models import InputSpec, LoadedModel
    from harden.training import TrainConfig, fit

    x, y = digits_arrays
    images = torch.from_numpy(x[:900]).permute(0, 3, 1, 2).float() / 255
    labels = y[:900]
    patch = Attack("grid_paste", target=0, num_classes=10).trigger
    torch.manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(10, 32), dim=1)
    chosen = torch.randperm(len(images))[:150]
    data = TensorDataset(torch.cat([images, patch(images[chosen])]), np.concatenate([labels, np.zeros(150, dtype=labels.dtype)]))
    encoder = TinyEncoder()
    fit(encoder, data, TrainConfig(epochs=8, lr=3e-3, batch_size=64),
        loss_fn=lambda m, a, b: (1 - torch.nn.functional.cosine_similarity(m(a), anchors[b])).mean())
    loaded = LoadedModel(PixelModel(encoder).eval(), "test:encoder", "pickle", 32, InputSpec(3, 32, 32))
    clean_npz = write_npz(tmp_path / "clean.npz", x[900:1200], y[900:1200])
    test_npz = write_npz(tmp_path / "test.npz", x[1200:], y[1200:])
    result = purify(loaded, str(clean_npz), method="trigger-unlearn", task="encoder", trigger="grid_paste", target=0,
                    test_data=str(test_npz), max_acc_drop=5.0,
                    options={"encoder": {"samples": 96, "max_steps": 200}, "trigger-unlearn": {"epochs": 15, "lr": 1e-3}})
    assert result.before.test_known_asr > 0.6 and result.before.test_accuracy > 0.7, result.before
    assert result.after.test_known_asr < result.before.test_known_asr - 0.4, result.after
    assert result.after.test_accuracy > result.before.test_accuracy - 0.1
    assert result.triggers[0].target == 0  # the reversed trigger's stamped images land in the backdoor's class
