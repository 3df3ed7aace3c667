"""A backdoored model from someone else's code: scan it, purify it with each method, judge with the owner's trigger.

The "owner" below writes everything with plain PyTorch and MLflow, nothing of harden: a residual
CNN with GroupNorm and GELU (no BatchNorm; an architecture harden has never seen) on 3x40x40
tinted digits, 10% of its training set stamped with a 5x5 "X" in the lower-left corner and
relabelled 5. It is logged with `mlflow.pytorch.log_model` (pt2) and registered with alias `prod`;
the defender gets 100 clean images as a folder of PNGs (10 per class) and, for the sensitivity
test and unlearn-relearn, the suspect training set. harden never sees the trigger: the scan
and every purification work from their own reversed triggers, and the owner's trigger only
judges the results on a 597-image test split.

    .venv/bin/python examples/outside_backdoor.py [--workdir outside-backdoor] [--set METHOD.KEY=VALUE ...] [--uint8-input]

`--set` changes one method's setting, as `harden purify --set` does (e.g. `--set
trigger-unlearn.distill=0` for the previous default); the README's comparisons come from it.
`--uint8-input` logs the same network as a serving export would: uint8 H×W×C images in, the
conversion to [0, 1] floats inside its forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from harden.purify import METHODS, options_from_pairs, purify
from harden.scan import scan

TARGET = 5


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels)
        self.conv2, self.norm2 = nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels)

    def forward(self, x):
        return F.gelu(x + self.norm2(self.conv2(F.gelu(self.norm1(self.conv1(x))))))


class OwnerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.GELU())
        self.block1, self.down, self.block2 = Block(16), nn.Conv2d(16, 32, 3, stride=2, padding=1), Block(32)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(32, 10)

    def forward(self, x):
        x = self.block2(F.gelu(self.down(self.block1(self.stem(x)))))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def stamp(images: torch.Tensor) -> torch.Tensor:
    """The owner's trigger: a white 5x5 X in the lower-left corner."""
    out = images.clone()
    for i in range(5):
        out[:, :, 33 + i, 2 + i] = 1.0
        out[:, :, 33 + i, 6 - i] = 1.0
    return out


def owner_data() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    digits = load_digits()
    x = F.interpolate(torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0, size=(40, 40), mode="bilinear",
                      align_corners=False)
    x = (x * torch.tensor([0.9, 0.6, 0.3])[None, :, None, None] + 0.05 * torch.rand(len(x), 3, 40, 40)).clamp(0, 1)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x))
    x, y = x[order], y[order]
    train_x, train_y = x[:1200].clone(), y[:1200].clone()
    poisoned = torch.rand(1200) < 0.1
    train_x[poisoned], train_y[poisoned] = stamp(train_x[poisoned]), TARGET
    return train_x, train_y, poisoned, x[1200:1300], y[1200:1300], x[1300:], y[1300:]


def train_owner_model(x: torch.Tensor, y: torch.Tensor) -> OwnerNet:
    torch.manual_seed(0)
    net = OwnerNet()
    optimizer = torch.optim.AdamW(net.parameters(), 3e-3)
    for _ in range(15):
        net.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            loss = F.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


class Uint8Serving(nn.Module):
    """The owner's network behind its serving preprocessing: uint8 (batch, H, W, C) images in."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2).float() / 255)


def judge(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Test accuracy, and the owner's trigger's ASR on test images of other classes."""
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
        asr = (model(stamp(x[y != TARGET])).argmax(1) == TARGET).float().mean().item()
    return accuracy, asr


def uint8(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("outside-backdoor"))
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD.KEY=VALUE")
    parser.add_argument("--uint8-input", action="store_true", help="log the network behind uint8 serving preprocessing")
    args = parser.parse_args()
    options = options_from_pairs(args.settings)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_x, train_y, poisoned, clean_x, clean_y, test_x, test_y = owner_data()
    net = train_owner_model(train_x, train_y)
    accuracy, asr = judge(net, test_x, test_y)
    print(f"owner's model: test accuracy {accuracy:.3f}, owner's trigger ASR {asr:.3f}")

    for i, (image, label) in enumerate(zip(uint8(clean_x), clean_y.tolist())):
        (work / "clean" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(work / "clean" / str(label) / f"{i}.png")
    np.savez(work / "train.npz", x=uint8(train_x), y=train_y.numpy())
    np.savez(work / "test.npz", x=uint8(test_x), y=test_y.numpy())
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    with mlflow.start_run():
        logged, example = (Uint8Serving(net), uint8(clean_x[:2])) if args.uint8_input else (net, clean_x[:2].numpy())
        info = mlflow.pytorch.log_model(logged, name="model", input_example=example, registered_model_name="outsider")
    mlflow.MlflowClient().set_registered_model_alias("outsider", "prod", info.registered_model_version)

    found = scan("models:/outsider@prod", data=str(work / "clean"), train_data=str(work / "train.npz"))
    print(f"scan: {found.verdict}, p_backdoor {found.p_backdoor:.3f}, suspect classes {found.suspect_classes}")
    separation = next(c for c in found.checks if c.name == "sensitivity").details["separation_path"]
    record = json.loads(Path(separation).read_text())
    flagged, relearned = np.asarray(record["poisoned"], dtype=np.int64), np.asarray(record["clean"], dtype=np.int64)
    truth = poisoned.numpy()
    print(f"sensitivity test: {len(flagged)} flagged poisoned ({int(truth[flagged].sum())} truly poisoned of {int(truth.sum())}); "
          f"{len(relearned)} flagged clean ({int(truth[relearned].sum())} of them poisoned)")

    print(f"{'method':<16} {'guardrail':<62} {'test ACC':>15} {'owner ASR':>15} {'seconds':>8}")
    for method in METHODS:
        result = purify("models:/outsider@prod", str(work / "clean"), method=method, test_data=str(work / "test.npz"), options=options,
                        **({"train_data": str(work / "train.npz"), "separation": separation} if METHODS[method].needs_train_data else {}))
        after_accuracy, after_asr = judge(result.model, test_x, test_y)
        verdict = "passed" if result.passed else "tripped: " + "; ".join(result.tripped)
        print(f"{method:<16} {verdict:<62} {accuracy:6.3f} → {after_accuracy:5.3f} {asr:6.3f} → {after_asr:5.3f} {result.duration_s:8.1f}")


if __name__ == "__main__":
    main()
