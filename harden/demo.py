"""`harden demo`: a backdoored model in the registry in under two minutes, from nothing.

Trains the small CNN on scikit-learn's digits (rendered 3×32×32) with a BadNets
grid trigger poisoned into 10% of the non-target training images, registers it as
`models:/harden-demo/<v>` with alias `candidate`, and writes the defender's clean
data (`clean.npz`) and a held-out test set (`test.npz`) for the next commands.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harden import tracking
from harden.attacks import Attack, PoisonedDataset
from harden.data import load_data, split, to_uint8_arrays
from harden.evaluation import EvaluationResult, evaluate
from harden.models import InputSpec, RegisteredVersion, create_model
from harden.runtime import measure, seed_everything
from harden.training import TrainConfig, fit

DEMO_SPEC = InputSpec(3, 32, 32)


@dataclass
class DemoResult:
    version: RegisteredVersion
    alias: str
    run_id: str
    trigger: str
    target: int
    clean: EvaluationResult
    data_dir: Path
    duration_s: float
    peak_memory_mb: float

    @property
    def model_uri(self) -> str:
        return self.version.uri


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Atomic: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, x=images, y=labels)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_demo(
    data_dir: Path = Path("harden-demo-data"),
    *,
    name: str = "harden-demo",
    alias: str = "candidate",
    trigger: str = "grid_paste",
    target: int = 0,
    rate: float = 0.1,
    epochs: int = 12,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> DemoResult:
    seed_everything(seed)
    digits = load_data("digits", DEMO_SPEC, num_classes=10)
    train, clean, test = split(digits, [0.7, 0.15, 0.15], seed=seed)
    attack = Attack(trigger, target=target, num_classes=10)
    poisoned = PoisonedDataset(train, attack, rate=rate, seed=seed)
    config = TrainConfig(epochs=epochs, lr=2e-3, batch_size=64, seed=seed)
    params = {"trigger": attack.trigger.spec, "target": target, "poison_rate": rate, "arch": "small_cnn",
              "input": str(DEMO_SPEC), "train_size": len(train), "poisoned": len(poisoned.poisoned), **vars(config)}
    with measure(torch.device(device)) as cost, tracking.command_run("demo", None, params) as run:
        model = create_model("small_cnn", num_classes=10)
        fit(model, poisoned, config, device=device, description="training demo model",
            on_epoch_end=lambda epoch, loss: tracking.log_metrics({"train_loss": loss}, step=epoch))
        result = evaluate(model, test, trigger=attack.trigger, target=target, device=device)
        tracking.log_metrics({"accuracy": result.accuracy, "asr": result.asr, "ra": result.ra})
        data_dir.mkdir(parents=True, exist_ok=True)
        for part, filename in ((clean, "clean.npz"), (test, "test.npz")):
            _write_npz(data_dir / filename, *to_uint8_arrays(part))
        metadata = {"arch": "small_cnn", "arch_kwargs": {}, "num_classes": 10, "input_shape": list(DEMO_SPEC.shape),
                    "mean": None, "std": None, "class_names": [str(i) for i in range(10)]}
        info = tracking.log_model(model, DEMO_SPEC.shape, metadata)
        version = tracking.register_model(info.model_uri, name, alias=alias, tags={
            "harden.arch": "small_cnn", "harden.demo.trigger": attack.trigger.spec, "harden.demo.target": target,
            "harden.demo.accuracy": f"{result.accuracy:.4f}", "harden.demo.asr": f"{result.asr:.4f}",
        }).version
    return DemoResult(version, alias, run.info.run_id, attack.trigger.spec, target, result, data_dir, cost.duration_s, cost.peak_memory_mb)
