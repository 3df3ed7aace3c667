"""SOPHON, the fine-tuning attack suite and the watermark, on tiny models and 8x8 digits."""

from __future__ import annotations

import copy
import json

import mlflow
import pytest
import torch
import torch.nn.functional as F

from harden import tracking
from harden.data import load_data, split
from harden.models import InputSpec, create_model
from harden.sophon import InnerLoop, OuterConfig, harden_model
from harden.sophon.attack_suite import finetune_test
from harden.sophon.data import in_memory, take_per_class
from harden.sophon.heads import find_head, reinit_head, reinitialise
from harden.sophon.losses import SUPPRESSION_LOSSES, get_loss
from harden.sophon.maml import BatchStream, outer_gradient
from harden.sophon.strategies import STRATEGIES
from harden.sophon.watermark import WatermarkKey, commitment, embed, verify
from harden.training import TrainConfig, fit
from tests.conftest import registry_snapshot

SPEC = InputSpec(1, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread than on two contended ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def domains():
    original = in_memory(load_data("digits", SPEC))
    restricted = in_memory(load_data("digits-inverted", SPEC))
    return split(original, [0.7, 0.3], seed=0), split(restricted, [0.5, 0.5], seed=1)


@pytest.fixture(scope="module")
def source(domains):
    (train, _), _ = domains
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
    fit(net, train, TrainConfig(epochs=6, lr=5e-3, batch_size=64))
    return net.eval()


def tiny_config(**kw) -> OuterConfig:
    inner = InnerLoop(steps=2, batch_size=32, strategies=kw.pop("strategies", ("full", "reinit-head", "head-only")))
    return OuterConfig(inner, **{"loops": 6, "eval_every": 2, "eval_size": 128, **kw})


# ---- losses ---------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [2, 5, 13])
def test_kl_uniform_is_zero_only_at_uniform_for_any_class_count(classes):
    labels = torch.zeros(4, dtype=torch.long)
    assert float(get_loss("kl-uniform")(torch.zeros(4, classes), labels)) == pytest.approx(0.0, abs=1e-6)
    peaked = torch.zeros(4, classes)
    peaked[:, 0] = 5.0
    assert float(get_loss("kl-uniform")(peaked, labels)) > 0.5


def test_inverse_ce_matches_its_definitions():
    logits, labels = torch.randn(6, 7), torch.randint(0, 7, (6,))
    p_y = F.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    assert float(get_loss("inverse-ce")(logits, labels)) == pytest.approx(float((-torch.log(1 - p_y)).mean()), rel=1e-5)
    assert float(get_loss("inverse-ce-logit")(logits, labels)) == pytest.approx(float(F.cross_entropy(-logits, labels)), rel=1e-6)
    assert float(get_loss("neg-ce")(logits, labels)) == pytest.approx(-float(F.cross_entropy(logits, labels)), rel=1e-6)


@pytest.mark.parametrize("name", sorted(SUPPRESSION_LOSSES))
def test_minimising_each_loss_moves_predictions_off_the_true_class(name):
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (8,))
    logits = (F.one_hot(labels, 4) * 4.0).requires_grad_(True)
    before = F.softmax(logits, 1).gather(1, labels[:, None]).mean()
    get_loss(name)(logits, labels).backward()
    after = F.softmax(logits - 0.5 * logits.grad, 1).gather(1, labels[:, None]).mean()
    assert after < before


# ---- heads and strategies -------------------------------------------------------------------

def test_head_is_found_in_modules_and_in_exported_graphs(source):
    assert find_head(source)[0] is source.fc.weight
    graph = torch.export.export(copy.deepcopy(source), (torch.zeros(2, *SPEC.shape),)).module()
    weight, bias = find_head(graph)
    assert torch.equal(weight, source.fc.weight) and torch.equal(bias, source.fc.bias)
    reinit_head(graph)
    assert not torch.equal(find_head(graph)[0], source.fc.weight)
    assert torch.equal(graph.get_parameter("features.0.weight"), source.features[0].weight)


def test_reinitialise_replaces_every_weight(source):
    fresh = reinitialise(copy.deepcopy(source))
    assert all(not torch.equal(a, b) for (n, a), b in zip(fresh.named_parameters(), source.parameters()) if a.ndim > 1)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategies_choose_parameters_and_head(source, name):
    net = copy.deepcopy(source)
    moving = STRATEGIES[name].prepare(net)
    head_changed = not torch.equal(net.fc.weight, source.fc.weight)
    assert head_changed == STRATEGIES[name].reinit_head
    assert len(moving) == (2 if STRATEGIES[name].head_only else len(list(net.parameters())))


@pytest.mark.parametrize("strategy, head_routed", [("full", True), ("reinit-head", False), ("head-only", False)])
def test_outer_gradient_routes_head_gradient_only_when_the_head_is_kept(domains, source, strategy, head_routed):
    _, (restricted, _) = domains
    inner = InnerLoop(steps=2, batch_size=32, strategies=(strategy,))
    grads, loss = outer_gradient(source, BatchStream(restricted, 32), inner, lambda net, x, y: get_loss("kl-uniform")(net(x), y))
    names = [n for n, _ in source.named_parameters()]
    assert (grads[names.index("fc.weight")] is not None) == head_routed
    assert grads[names.index("features.0.weight")] is not None and loss >= 0


# ---- SOPHON loop and guard ------------------------------------------------------------------

def test_sophon_suppresses_the_restricted_domain_and_keeps_the_original(domains, source):
    (train, test), (restricted, _) = domains
    result = harden_model(copy.deepcopy(source), train, test, restricted, config=tiny_config(loops=30, eval_every=10, max_acc_drop=0.05))
    assert result.acc_after >= result.acc_before - 0.05
    kl = get_loss("kl-uniform")
    with torch.no_grad():
        x, y = in_memory(restricted).images, torch.as_tensor(restricted.labels)
        assert float(kl(result.model(x), y)) < float(kl(source(x), y))  # closer to uniform on the restricted domain
    assert [h["loop"] for h in result.outer.history] == [10, 20, 30]


@pytest.mark.parametrize("loss", sorted(SUPPRESSION_LOSSES))
def test_every_loss_drives_the_outer_loop(domains, source, loss):
    (train, test), (restricted, _) = domains
    result = harden_model(copy.deepcopy(source), train, test, restricted, loss=loss, config=tiny_config(loops=2, eval_every=1, max_acc_drop=1.0))
    assert all(torch.isfinite(torch.tensor(h["query_loss"])) for h in result.outer.history)
    assert not torch.equal(result.model.features[0].weight, source.features[0].weight)


@pytest.mark.parametrize("guard, stops", [("stop", True), ("rollback", False)])
def test_guard_restores_accuracy_when_training_destroys_it(domains, source, guard, stops):
    (train, test), (restricted, _) = domains
    config = tiny_config(loops=6, eval_every=1, lr=0.5, beta=0.0, clip=100.0, max_acc_drop=0.02, guard=guard, max_rollbacks=1)
    result = harden_model(copy.deepcopy(source), train, test, restricted, loss="neg-ce", config=config)
    assert result.outer.rollbacks >= 1 and result.outer.stopped_by_guard
    assert result.outer.acc_end >= result.outer.acc_start - 0.02
    assert (result.outer.loops_done == 1) == stops


# ---- attack suite ---------------------------------------------------------------------------

def test_finetune_test_runs_the_grid_on_model_baseline_and_scratch(domains, source):
    _, (_, attacker) = domains
    train, test = take_per_class(attacker, 5), attacker
    result = finetune_test(source, train, test, budget="quick", baseline=source, seed=0)
    assert len(result.runs) == 3 + 3 + 1  # strategies x 1 recipe, for model and baseline; scratch: full only
    assert all(len(r.accuracy) == 5 and all(0 <= a <= 1 for a in r.accuracy) for r in result.runs)
    assert result.best_attack_accuracy == max(r.best for r in result.runs if r.subject == "model")
    assert result.baseline_accuracy == result.best_attack_accuracy  # same model, same seeds
    assert json.loads(json.dumps(result.to_dict()))["best_attack"]["strategy"] in STRATEGIES


# ---- watermark ------------------------------------------------------------------------------

def test_key_derivation_is_deterministic_and_secret():
    a, b = WatermarkKey.derive("owner-key-1", 10), WatermarkKey.derive("owner-key-1", 10)
    other = WatermarkKey.derive("owner-key-2", 10)
    image = torch.zeros(1, 3, 16, 16)
    assert torch.equal(a.trigger(image), b.trigger(image)) and not torch.equal(a.trigger(image), other.trigger(image))
    salt, digest = commitment("owner-key-1")
    assert "owner-key-1" not in salt + digest and commitment("owner-key-1", salt)[1] == digest
    with pytest.raises(Exception, match="at least 8"):
        WatermarkKey.derive("short", 10)


def test_watermark_verifies_with_its_key_only(domains, source):
    (train, test), _ = domains
    result = embed(copy.deepcopy(source), train, test, "owner-key-1", num_classes=10, config=tiny_config(loops=10, eval_every=5, lr=3e-3),
                   pretrain=TrainConfig(epochs=4, lr=3e-3))
    assert result.success_after > 0.8 > result.success_before
    assert verify(result.model, test, "owner-key-1", num_classes=10).present
    assert not verify(result.model, test, "someone-else", num_classes=10).present
    assert not verify(source, test, "owner-key-1", num_classes=10).present


# ---- CLI ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_registered(mlflow_home, source):
    with mlflow.start_run():
        info = tracking.log_model(copy.deepcopy(source), SPEC.shape, {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 8},
                                                                    "num_classes": 10, "input_shape": list(SPEC.shape)})
    return tracking.register_model(info.model_uri, "sophon-tiny").version


def test_sophon_cli_registers_a_tagged_version(run_cli, tiny_registered, tmp_path):
    code, out, err = run_cli("sophon", tiny_registered.uri, "--original-data", "digits", "--restricted-data", "digits-inverted",
                             "--loops", "4", "--inner-steps", "2", "--query-at-end", "--eval-every", "2", "--check", "quick", "--max-acc-drop", "0.2",
                             "--alias", "sophon", "--format", "json", "-q")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["schema"] == "harden.sophon/1" and payload["output_model_uri"].startswith("models:/sophon-tiny/")
    version = tracking.resolve_registered_version("models:/sophon-tiny@sophon")
    tags = tracking.version_tags(version)
    assert tags["harden.method"] == "sophon" and tags["harden.hardened_from"] == tiny_registered.uri
    assert float(tags["harden.sophon.acc_before"]) == pytest.approx(payload["acc_before"], abs=1e-4)
    assert "harden.sophon.best_attack_accuracy" in tags and payload["finetune_check"]["scratch_accuracy"] is not None


def test_finetune_test_cli_reports_json_and_tags(run_cli, tiny_registered):
    code, out, err = run_cli("finetune-test", tiny_registered.uri, "--data", "digits-inverted", "--train-per-class", "5", "--budget", "quick",
                             "--strategies", "full,head-only", "--baseline", tiny_registered.uri, "--format", "json", "-q")
    payload = json.loads(out)
    assert payload["schema"] == "harden.finetune-test/1"
    assert {"best_attack_accuracy", "scratch_accuracy", "baseline_accuracy"} <= set(payload)
    assert code == (1 if payload["fine_tunable"] else 0)
    assert {r["strategy"] for r in payload["runs"]} == {"full", "head-only"}
    assert tracking.version_tags(tiny_registered)["harden.finetune_test.best_attack_accuracy"]
    artifacts = [f.path for f in mlflow.tracking.MlflowClient().list_artifacts(payload["run_id"], "images")]
    assert artifacts and artifacts[0].endswith(".png")


def test_watermark_cli_embeds_verifies_and_never_logs_the_key(run_cli, tiny_registered, monkeypatch):
    key = "cli-secret-key-42"
    monkeypatch.setenv("HARDEN_WATERMARK_KEY", key)
    code, out, err = run_cli("watermark", "embed", tiny_registered.uri, "--data", "digits", "--loops", "6", "--inner-steps", "2",
                             "--eval-every", "3", "--lr", "3e-3", "--max-acc-drop", "0.1", "--register-as", "sophon-tiny-wm", "--format", "json", "-q")
    assert code == 0, err
    marked = json.loads(out)["output_model_uri"]
    assert run_cli("watermark", "verify", marked, "--data", "digits", "-q")[0] == 0
    assert run_cli("watermark", "verify", marked, "--data", "digits", "--key", "a-wrong-key-0", "-q")[0] == 1
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    texts = [json.dumps([r.data.params, r.data.tags]) for r in runs]
    texts += [json.dumps(mv.tags) for mv in client.search_model_versions(max_results=1000)]
    for run in runs:
        for artifact in client.list_artifacts(run.info.run_id, "reports"):
            texts.append(open(client.download_artifacts(run.info.run_id, artifact.path)).read())
    assert not any(key in text for text in texts)


def test_bad_input_is_one_line_and_registers_nothing(run_cli, tiny_registered):
    before = registry_snapshot()
    code, _, err = run_cli("watermark", "embed", tiny_registered.uri, "--data", "digits", "--key", "short", "-q")
    assert code == 2 and err.count("\n") == 1 and "at least 8" in err
    code, _, err = run_cli("finetune-test", tiny_registered.uri, "--data", "digits", "--strategies", "full,nonsense", "-q")
    assert code == 2 and "nonsense" in err
    assert registry_snapshot() == before
