"""Models logged by someone else's code, evaluated by harden.

Trains a small custom CNN (an architecture harden has never seen) on digits twice: once on
[0, 1] pixels, once on MNIST-normalised ones ((x - 0.1307) / 0.3081, as most grayscale training
code feeds it). Each is logged with plain `mlflow.pytorch.log_model` (MLflow 3 saves pt2, and
records no normalisation), registered, then evaluated through harden's library API and compared
with its own accuracy. For the second, harden finds the normalisation from the clean data.

    .venv/bin/python examples/evaluate_outside_model.py
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from sklearn.datasets import load_digits

import harden
from harden.models.normalisation import choose_normalisation

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.out = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.out(x.flatten(1))


def train(x: np.ndarray, y: np.ndarray) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    return model.eval()


def main() -> None:
    digits = load_digits()
    pixels = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target
    np.savez("outsider-holdout.npz", x=(pixels[1200:, 0] * 255).round().astype(np.uint8), y=y[1200:])
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    for name, x in (("outsider-tiny", pixels), ("outsider-tiny-normalised", (pixels - MNIST_MEAN) / MNIST_STD)):
        model = train(x[:1200], y[:1200])
        with torch.no_grad():
            own = float((model(torch.from_numpy(x[1200:])).argmax(1).numpy() == y[1200:]).mean())
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(model, name="tiny", input_example=x[:4], registered_model_name=name)

        loaded = harden.load_model(f"models:/{name}/{info.registered_model_version}")
        data = harden.load_data("outsider-holdout.npz", loaded.input_spec, num_classes=loaded.num_classes)
        choice = choose_normalisation(loaded, data)  # what `harden evaluate/scan/purify` do when no --mean/--std is given
        result = harden.evaluate(loaded, data)
        print(f"{name}: model's own accuracy {own:.4f}  harden evaluate {result.accuracy:.4f}  ({loaded.describe()})")
        if choice is not None:
            print(f"  normalisation found: {choice.name} (mean {choice.mean}, std {choice.std})")
            for convention, cross_entropy in choice.cross_entropy.items():
                print(f"  {convention:17s} cross-entropy {cross_entropy:7.3f}  accuracy {choice.accuracy[convention]:.3f}")


if __name__ == "__main__":
    main()
