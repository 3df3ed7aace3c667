"""Under torchrun (2 CPU processes, gloo): `fit`, `harden purify` and `harden sophon` give the single-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from harden import distributed
from tests.conftest import registry_snapshot

HERE = Path(__file__).parent


def test_single_process_context_is_trivial():
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)


def test_torchrun_two_cpu_processes_match_one_process(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        import ddp_fit
    finally:
        sys.path.remove(str(HERE))
    model, history = ddp_fit.train()
    out = tmp_path / "weights"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "ddp_fit.py"), str(out)], env=env, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name], rtol=0, atol=0)  # ranks agree exactly
        torch.testing.assert_close(ranks[0]["state"][name], tensor, rtol=1e-4, atol=1e-5)
    assert ranks[0]["history"] == ranks[1]["history"]
    torch.testing.assert_close(torch.tensor(ranks[0]["history"]), torch.tensor(history), rtol=1e-5, atol=1e-6)
    assert history[-1] < history[0]  # it trained
    kept = ddp_fit.train_keeping_the_best().state_dict()
    for name, tensor in kept.items():  # the checkpoint rank 0 kept is the one every rank ends on
        torch.testing.assert_close(ranks[1]["kept"][name], ranks[0]["kept"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["kept"][name], tensor, rtol=1e-4, atol=1e-5)


def one_and_two_processes(run_cli, mlflow_home: Path, args: list[str]) -> tuple[dict, dict]:
    """The JSON reports of `harden ARGS` in this process and under `torchrun --nproc-per-node 2`,
    checking that the two-process run registered exactly one version (rank 0's)."""
    code, out, err = run_cli(*args)
    assert code == 0, err
    before = registry_snapshot()
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "harden", *args],
                          env=env, cwd=mlflow_home, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(registry_snapshot()) == len(before) + 1
    return json.loads(out), json.loads(done.stdout)


def test_purify_under_torchrun_matches_one_process(demo, mlflow_home, run_cli):
    """`torchrun --nproc-per-node 2 -m harden purify` trains data-parallel; rank 0 alone registers one version."""
    args = ["purify", demo.model_uri, "--data", str(demo.data_dir / "clean.npz"), "--method", "trigger-unlearn",
            "--trigger", demo.trigger, "--target", str(demo.target), "--test-data", str(demo.data_dir / "test.npz"),
            "--set", "epochs=12", "--set", "bn_mode=freeze", "--set", "lr=1e-3", "--triggers", "1", "--max-acc-drop", "10",
            "--format", "json", "-q"]
    single, parallel = one_and_two_processes(run_cli, mlflow_home, args)
    # Same batches and updates, but each rank draws which of its images get stamped: close, not bit-equal.
    for key, tolerance in (("test_accuracy", 0.02), ("test_known_asr", 0.1)):
        assert abs(parallel["after"][key] - single["after"][key]) < tolerance, (key, parallel["after"], single["after"])


def test_sophon_under_torchrun_matches_one_process(mlflow_home, run_cli, tmp_path):
    """`torchrun --nproc-per-node 2 -m harden sophon` runs the outer loop on both ranks; rank 0 alone registers."""
    import copy

    import mlflow

    from harden import tracking
    from harden.data import load_data
    from harden.models import InputSpec, create_model
    from harden.training import TrainConfig, fit

    spec = InputSpec(1, 8, 8)
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
    fit(net, load_data("digits", spec), TrainConfig(epochs=4, lr=5e-3, batch_size=64))
    with mlflow.start_run():
        info = tracking.log_model(copy.deepcopy(net).eval(), spec.shape, {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 8},
                                                                          "num_classes": 10, "input_shape": list(spec.shape)})
    source = tracking.register_model(info.model_uri, "sophon-ddp").version
    args = ["sophon", source.uri, "--original-data", "digits", "--restricted-data", "digits-inverted", "--loops", "12",
            "--inner-steps", "2", "--eval-every", "4", "--lr", "3e-3", "--check", "none", "--max-acc-drop", "0.2", "--format", "json", "-q"]
    single, parallel = one_and_two_processes(run_cli, mlflow_home, args)
    assert parallel["loops_done"] == single["loops_done"] == 12
    # Each rank simulates its own attackers, so the runs are close, not equal; both moved the restricted loss.
    assert abs(parallel["acc_after"] - single["acc_after"]) < 0.05, (parallel["acc_after"], single["acc_after"])
    losses = [[check["query_loss"] for check in run["history"]] for run in (single, parallel)]
    assert all(run[-1] < run[0] for run in losses), losses
    assert abs(losses[0][-1] - losses[1][-1]) < 0.5 * losses[0][0], losses
