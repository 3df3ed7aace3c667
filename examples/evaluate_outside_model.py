"""A model logged by someone else's code, evaluated by harden.

Trains a small custom CNN (an architecture harden has never seen) on digits, logs it
with plain `mlflow.pytorch.log_model` (MLflow 3 saves it as pt2), registers it, then
evaluates it through harden's library API and compares with its own accuracy.

    .venv/bin/python examples/evaluate_outside_model.py
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from sklearn.datasets import load_digits

import harden


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.out = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.out(x.flatten(1))


def main() -> None:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x[:1200])), torch.from_numpy(y[:1200])).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        own = float((model(torch.from_numpy(x[1200:])).argmax(1).numpy() == y[1200:]).mean())

    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="tiny", input_example=x[:4], registered_model_name="outsider-tiny")

    np.savez("outsider-holdout.npz", x=(x[1200:, 0] * 255).round().astype(np.uint8), y=y[1200:])
    loaded = harden.load_model(f"models:/outsider-tiny/{info.registered_model_version}")
    data = harden.load_data("outsider-holdout.npz", loaded.input_spec, num_classes=loaded.num_classes)
    result = harden.evaluate(loaded, data)
    print(f"model's own accuracy {own:.4f}  harden evaluate {result.accuracy:.4f}  ({loaded.describe()})")


if __name__ == "__main__":
    main()
