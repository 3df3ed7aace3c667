"""`fit` under torchrun (2 CPU processes, gloo) gives the single-process result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from harden import distributed

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
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(HERE / "ddp_fit.py"), str(out)], check=True, env=env, timeout=180, capture_output=True)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name], rtol=0, atol=0)  # ranks agree exactly
        torch.testing.assert_close(ranks[0]["state"][name], tensor, rtol=1e-4, atol=1e-5)
    assert ranks[0]["history"] == ranks[1]["history"]
    torch.testing.assert_close(torch.tensor(ranks[0]["history"]), torch.tensor(history), rtol=1e-5, atol=1e-6)
    assert history[-1] < history[0]  # it trained
