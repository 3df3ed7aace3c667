"""Scan benchmark on foreign models: architectures, input sizes and triggers that harden's zoo
never had, written and logged the way someone else's training script would do it.

Each model is defined and trained here with plain PyTorch (no harden code), logged with
`mlflow.pytorch.log_model` (MLflow 3's default pt2 format, an input example, nothing else)
into a throwaway sqlite registry, and scanned from `models:/<name>/1` through `harden.scan.scan`
with the shipped calibration, exactly as `harden scan` would. Fourteen families, each built clean
and backdoored (10% poisoning, the target and trigger position drawn from `--seed`):

| family | input | network | trigger |
|---|---|---|---|
| lenet_grey | 1×28×28 | LeNet-like, no BatchNorm | white 4×4 square in a corner |
| tv_resnet18 | 3×64×64 | torchvision resnet18 (ImageNet stem) | 6×6 checkerboard in a corner |
| normalised | 3×32×32 | 3-block BatchNorm CNN, inputs normalised outside the model | noise blend, α 0.15 |
| wide_input | 3×24×40 | the same CNN at a non-square size | vertical sinusoid, ±30/255 |
| twenty_classes | 1×32×32 | the same CNN, 20 classes (digits and inverted digits) | 4×4 checkerboard in a corner |
| softmax_out | 3×32×32 | the same CNN returning probabilities | white 3×3 square in a corner |
| mlp | 1×16×16 | 3-layer MLP | random 3×3 binary patch |
| binary_logit | 3×32×32 | the BatchNorm CNN with one output (a logit), digits 0–4 against 5–9 | 4×4 checkerboard in a corner |
| binary_sigmoid | 1×28×28 | the LeNet with one sigmoid output, digits 0–4 against 5–9 | white 4×4 square in a corner |
| tiny_vit (only with `--families`) | 3×32×32 | torchvision VisionTransformer: 4×4 patches, 3 layers, 4 heads, width 96 | 4×4 checkerboard in a corner |
| augmented (only with `--families`) | 3×32×32 | the BatchNorm CNN, trained on batches shifted up to 3 px, label smoothing 0.1 | 4×4 checkerboard in a corner |
| shufflenet (only with `--families`) | 3×32×32 | torchvision shufflenet_v2_x0_5 | white 3×3 square in a corner |
| mobile_style (only with `--families`) | 3×32×32 | depthwise-separable blocks, GroupNorm, SiLU, dropout | noise blend, α 0.15 |
| cosine_head (only with `--families`) | 3×32×32 | the BatchNorm CNN's body, cosine-similarity head (scale 16) | vertical sinusoid, ±30/255 |

Data: scikit-learn's digits rendered to each input size (72% train, 10% the defender's clean set
passed to the scan, 18% test). A backdoored model that does not reach ASR 0.8 on the test split
is reported and left out of the metrics. `--purify METHODS` also purifies every implanted
backdoor through `harden.purify.purify` (which sees only the clean set and its own reversed
triggers) and judges the result with the owner's trigger on the test split; `--set METHOD.KEY=VALUE`
changes a method's setting for that, as `harden purify --set` does.

    .venv/bin/python benchmarks/foreign.py --seed 1 --previous --purify trigger-unlearn
    .venv/bin/python benchmarks/foreign.py --seed 1 --purify trigger-unlearn --set trigger-unlearn.distill=0.5 --set trigger-unlearn.lr=0.001
    .venv/bin/python benchmarks/foreign.py --seed 1 --families binary_logit,binary_sigmoid --purify trigger-unlearn
    .venv/bin/python benchmarks/foreign.py --seed 1 --unknown-normalisation
    .venv/bin/python benchmarks/foreign.py --seed 1 --families tiny_vit --purify trigger-unlearn,nft
    .venv/bin/python benchmarks/foreign.py --seed 0 --families augmented,shufflenet,mobile_style,cosine_head --purify trigger-unlearn,nft

The normalisation column says which input normalisation the scan used: `given` (the normalised
family's mean/std, passed as `--mean/--std` would pass them), or the one harden chose from the
clean data (`none` for raw pixels; `--unknown-normalisation` withholds the normalised family's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

Stamp = Callable[[torch.Tensor], torch.Tensor]


class LeNetGrey(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 5), nn.Conv2d(16, 32, 5)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BatchNormCNN(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 10, width: int = 32, softmax: bool = False):
        super().__init__()
        blocks = []
        for i, (cin, cout) in enumerate([(channels, width), (width, 2 * width), (2 * width, 2 * width)]):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            blocks.append(nn.MaxPool2d(2) if i < 2 else nn.AdaptiveAvgPool2d(1))
        self.body, self.head, self.softmax = nn.Sequential(*blocks), nn.Linear(2 * width, classes), softmax

    def forward(self, x):
        logits = self.head(self.body(x).flatten(1))
        return F.softmax(logits, 1) if self.softmax else logits


class MLP(nn.Module):
    def __init__(self, pixels: int, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x):
        return self.net(x)


class MobileStyleCNN(nn.Module):
    """Depthwise-separable blocks with GroupNorm, SiLU and dropout before the head: no BatchNorm anywhere."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.GroupNorm(4, cin), nn.SiLU(),
                                 nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(4, cout), nn.SiLU())

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU())
        self.body = nn.Sequential(block(16, 32, 2), block(32, 64, 2), block(64, 64, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


class CosineCNN(nn.Module):
    """The BatchNorm CNN's body with a cosine-similarity head (logits = 16 · cos(feature, class weight))."""

    def __init__(self, classes: int = 10, scale: float = 16.0):
        super().__init__()
        self.body, self.weight, self.scale = BatchNormCNN().body, nn.Parameter(0.1 * torch.randn(classes, 64)), scale

    def forward(self, x):
        return self.scale * F.normalize(self.body(x).flatten(1), dim=1) @ F.normalize(self.weight, dim=1).T


def random_shift(x: torch.Tensor) -> torch.Tensor:
    """The training batch moved by up to 3 pixels each way (wrapping), as a padded random crop moves it."""
    dy, dx = (int(v) for v in torch.randint(-3, 4, (2,)))
    return torch.roll(x, (dy, dx), (2, 3))


def _corner(x: torch.Tensor, patch: torch.Tensor, corner: int) -> torch.Tensor:
    x = x.clone()
    k, h, w = patch.shape[-1], x.shape[-2], x.shape[-1]
    rows = slice(0, k) if corner in (0, 1) else slice(h - k, h)
    cols = slice(0, k) if corner in (0, 2) else slice(w - k, w)
    x[:, :, rows, cols] = patch
    return x


def square(k: int, corner: int) -> Stamp:
    return lambda x: _corner(x, torch.ones(k, k), corner)


def checkerboard(k: int, corner: int) -> Stamp:
    return lambda x: _corner(x, ((torch.arange(k)[:, None] + torch.arange(k)[None]) % 2).float(), corner)


def noise_blend(alpha: float, seed: int) -> Stamp:
    def stamp(x):
        noise = torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(seed))
        return (1 - alpha) * x + alpha * noise
    return stamp


def sinusoid(delta: float, period: float) -> Stamp:
    def stamp(x):
        wave = delta * torch.sin(2 * math.pi * torch.arange(x.shape[-1]) / period)
        return (x + wave).clamp(0, 1)
    return stamp


def random_patch(k: int, seed: int) -> Stamp:
    g = torch.Generator().manual_seed(seed)
    pattern, corner = (torch.rand(k, k, generator=g) > 0.5).float(), int(torch.randint(0, 4, (), generator=g))
    return lambda x: _corner(x, pattern, corner)


@dataclass
class Family:
    name: str
    shape: tuple[int, int, int]
    classes: int
    network: Callable[[], nn.Module]
    trigger: Callable[[int], Stamp]  # seed → stamp
    epochs: int = 15
    output: str = "logits"  # what the network returns: a key of LOSSES and PREDICTIONS
    mean_std: tuple[float, float] | None = None  # inputs normalised outside the model
    by_default: bool = True  # run without --families (the README's aggregate figures are over these)
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to every training batch (after poisoning)


FAMILIES = [
    Family("lenet_grey", (1, 28, 28), 10, LeNetGrey, lambda s: square(4, s % 4)),
    Family("tv_resnet18", (3, 64, 64), 10, lambda: __import__("torchvision").models.resnet18(num_classes=10), lambda s: checkerboard(6, (s + 3) % 4), epochs=10),
    Family("normalised", (3, 32, 32), 10, BatchNormCNN, lambda s: noise_blend(0.15, s), mean_std=(0.5, 0.25)),
    Family("wide_input", (3, 24, 40), 10, BatchNormCNN, lambda s: sinusoid(30 / 255, 6.0)),
    Family("twenty_classes", (1, 32, 32), 20, lambda: BatchNormCNN(1, 20), lambda s: checkerboard(4, (s + 1) % 4)),
    Family("softmax_out", (3, 32, 32), 10, lambda: BatchNormCNN(softmax=True), lambda s: square(3, (s + 2) % 4), output="probabilities"),
    Family("mlp", (1, 16, 16), 10, lambda: MLP(256), lambda s: random_patch(3, s)),
    Family("binary_logit", (3, 32, 32), 2, lambda: BatchNormCNN(classes=1), lambda s: checkerboard(4, (s + 1) % 4), output="binary_logit"),
    Family("binary_sigmoid", (1, 28, 28), 2, lambda: nn.Sequential(LeNetGrey(classes=1), nn.Sigmoid()), lambda s: square(4, s % 4),
           output="binary_probability"),
    Family("tiny_vit", (3, 32, 32), 10, lambda: __import__("torchvision").models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=3, num_heads=4, hidden_dim=96, mlp_dim=192, num_classes=10),
        lambda s: checkerboard(4, (s + 2) % 4), epochs=25, by_default=False),
    # Trained the way many owners train (only with --families): random shifts and label smoothing, other
    # families of network, a cosine head.
    Family("augmented", (3, 32, 32), 10, BatchNormCNN, lambda s: checkerboard(4, s % 4), epochs=20, output="smoothed",
           augment=random_shift, by_default=False),
    Family("shufflenet", (3, 32, 32), 10, lambda: __import__("torchvision").models.shufflenet_v2_x0_5(num_classes=10),
           lambda s: square(3, s % 4), epochs=25, by_default=False),
    Family("mobile_style", (3, 32, 32), 10, MobileStyleCNN, lambda s: noise_blend(0.15, s), epochs=20, by_default=False),
    Family("cosine_head", (3, 32, 32), 10, CosineCNN, lambda s: sinusoid(30 / 255, 6.0), by_default=False),
]

# How the owner trains and reads each kind of output (binary networks have one output column).
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "logits": F.cross_entropy,
    "smoothed": lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1),  # logits, trained with label smoothing
    "probabilities": lambda out, y: F.nll_loss(torch.log(out + 1e-9), y),
    "binary_logit": lambda out, y: F.binary_cross_entropy_with_logits(out[:, 0], y.float()),
    "binary_probability": lambda out, y: F.binary_cross_entropy(out[:, 0], y.float()),
}
PREDICTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "logits": lambda out: out.argmax(1),
    "smoothed": lambda out: out.argmax(1),
    "probabilities": lambda out: out.argmax(1),
    "binary_logit": lambda out: (out[:, 0] > 0).long(),
    "binary_probability": lambda out: (out[:, 0] > 0.5).long(),
}


def digits(shape: tuple[int, int, int], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits at `shape`; with 20 classes, inverted copies are classes 10-19; with 2, digits 0-4 against 5-9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    images = F.interpolate(images, size=shape[1:], mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, shape[0], 1, 1)
    labels = torch.tensor(data.target)
    if classes == 20:
        images, labels = torch.cat([images, 1 - images]), torch.cat([labels, labels + 10])
    if classes == 2:
        labels = (labels >= 5).long()
    return images, labels


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, prepare: Callable, output: str | Callable,
          augment: Callable | None = None) -> nn.Module:
    """Adam, batches of 64, as a plain training script would; `output` is a key of LOSSES or a loss function;
    `augment` changes each training batch (pixels) before `prepare`."""
    loss_fn = LOSSES[output] if isinstance(output, str) else output
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i:i + 64]
            out = model(prepare(augment(x[batch]) if augment else x[batch]))
            loss = loss_fn(out, y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def as_npz(path: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    pixels = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.savez(path, x=pixels[..., 0] if pixels.shape[-1] == 1 else pixels, y=y.numpy())
    return path


@dataclass
class Built:
    """A trained, registered foreign model and what the benchmark needs to judge it."""

    name: str
    uri: str
    backdoored: bool
    target: int
    stamp: Stamp
    accuracy: float
    asr: float | None
    clean_npz: Path
    test: tuple[torch.Tensor, torch.Tensor]  # pixels in [0, 1], labels
    load_options: dict | None  # mean/std for a model that expects normalised inputs


def build(family: Family, backdoored: bool, seed: int, folder: Path) -> Built:
    """Train the model as its owner would, log it with plain `mlflow.pytorch.log_model` and register it."""
    import mlflow

    torch.manual_seed(seed)
    x, y = digits(family.shape, family.classes)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = len(y)
    train_idx, clean_idx, test_idx = order[:int(0.72 * n)], order[int(0.72 * n):int(0.82 * n)], order[int(0.82 * n):]
    x_train, y_train = x[train_idx].clone(), y[train_idx].clone()
    target = (3 * seed + len(family.name)) % family.classes
    stamp = family.trigger(seed)
    if backdoored:
        rng = np.random.default_rng(seed)
        poisoned = rng.choice(np.where(y_train.numpy() != target)[0], int(0.1 * len(y_train)), replace=False)
        x_train[poisoned], y_train[poisoned] = stamp(x_train[poisoned]), target
    mean, std = family.mean_std or (0.0, 1.0)
    prepare = (lambda t: (t - mean) / std)
    model = train(family.network(), x_train, y_train, family.epochs, prepare, family.output, family.augment)
    test = (x[test_idx], y[test_idx])
    accuracy, asr = judge(lambda t: PREDICTIONS[family.output](model(prepare(t))), test, stamp, target)
    name = f"{family.name}-{'backdoor' if backdoored else 'clean'}-s{seed}"
    with mlflow.start_run(run_name=name):
        info = mlflow.pytorch.log_model(model, name="model", input_example=prepare(x[:2]).numpy(), registered_model_name=name)
    load = {"mean": [mean] * family.shape[0], "std": [std] * family.shape[0]} if family.mean_std else None
    return Built(name, f"models:/{name}/{info.registered_model_version}", backdoored, target, stamp, accuracy,
                 asr if backdoored else None, as_npz(folder / f"{name}-clean.npz", x[clean_idx], y[clean_idx]), test, load)


@torch.no_grad()
def judge(predict: Callable[[torch.Tensor], torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], stamp: Stamp, target: int) -> tuple[float, float]:
    """Test accuracy, and the owner's trigger's success on test images of other classes (pixel-space inputs;
    `predict` returns class indices)."""
    x, y = test
    accuracy = float((predict(x) == y).float().mean())
    return accuracy, float((predict(stamp(x[y != target])) == target).float().mean())


def scan_record(built: Built, folder: Path) -> dict:
    from harden.scan import scan

    start = time.perf_counter()
    result = scan(built.uri, data=str(built.clean_npz), load_options=built.load_options, workdir=folder / built.name)
    return {"name": built.name, "backdoored": built.backdoored, "target": built.target if built.backdoored else None,
            "accuracy": built.accuracy, "asr": built.asr, "p": result.p_backdoor, "verdict": result.verdict,
            "suspects": result.suspect_classes[:3], "seconds": time.perf_counter() - start,
            "normalisation": "given" if built.load_options else result.input_normalisation.name if result.input_normalisation else "none",
            "statistics": next((c.details["statistics"] for c in result.checks if "statistics" in c.details), None)}


def purify_row(built: Built, method: str, options: dict) -> list:
    """Purify through the library (reversed triggers only: the owner's trigger is unknown to harden),
    then judge the result with the owner's own trigger on the test split. `options`: per-method
    settings, as `--set` gives them."""
    from harden.purify import purify

    result = purify(built.uri, str(built.clean_npz), method=method, load_options=built.load_options, options=options)
    accuracy, asr = judge(lambda t: result.model(t).argmax(1), built.test, built.stamp, built.target)  # harden's logits, one per class
    met = asr <= 0.03 and built.accuracy - accuracy <= 0.02
    return [built.name, method, round(built.accuracy, 3), round(accuracy, 3), round(built.asr, 3), round(asr, 3),
            round(100 * (built.accuracy - accuracy), 2), "yes" if result.passed else "no", "yes" if met else "no",
            round(result.duration_s, 1)]


def _previous_calibration(calibration):
    """The previous feature set fitted on the zoo's cached statistics, as `benchmarks/scan.py --fit` fits the shipped one."""
    from scan import PREVIOUS, STATS_FILE
    from zoo import load_zoo

    if not STATS_FILE.exists():
        raise SystemExit("--previous needs the zoo's scan statistics: run benchmarks/scan.py first")
    stats, zoo = json.loads(STATS_FILE.read_text()), load_zoo()
    return calibration.fit([stats[e.name]["statistics"] for e in zoo], [int(e.backdoored) for e in zoo], "previous", names=PREVIOUS,
                           groups=[e.arch for e in zoo])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="model init, data split, poisoned samples, target and trigger placement")
    parser.add_argument("--families", default=",".join(f.name for f in FAMILIES if f.by_default),
                        help=f"comma-separated (default: all but {', '.join(f.name for f in FAMILIES if not f.by_default)})")
    parser.add_argument("--save", type=Path, help="also write every model's record (scan statistics included) as JSON")
    parser.add_argument("--purify", default="", metavar="METHODS",
                        help="also purify every implanted backdoor with these methods (comma-separated) and judge the result "
                             "with the owner's trigger")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a purify method's setting, as `harden purify --set` takes it (repeatable)")
    parser.add_argument("--unknown-normalisation", action="store_true",
                        help="do not tell harden the normalised family's mean/std, as a defender who was not told: "
                             "harden chooses it from the clean data (harden/models/normalisation.py)")
    parser.add_argument("--previous", action="store_true",
                        help="also score the models with the previous calibration's features (benchmarks/scan.py PREVIOUS), "
                             "fitted on the zoo's cached scan statistics the same way")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sys.path.insert(0, str(Path(__file__).parent))
    from scan import verdict_metrics

    from harden import progress
    from harden.purify import options_from_pairs
    from harden.report import Report, Table, emit
    from harden.scan import verdict as calibration

    progress.set_enabled(False)
    options = options_from_pairs(args.settings)
    rows, kept, purified = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        for family in (f for f in FAMILIES if f.name in args.families.split(",")):
            for backdoored in (False, True):
                built = build(family, backdoored, args.seed, Path(tmp))
                if args.unknown_normalisation:
                    built.load_options = None
                r = scan_record(built, Path(tmp))
                implanted = not backdoored or r["asr"] >= 0.8
                if implanted:
                    kept.append(r)
                rows.append([r["name"], "backdoor" if backdoored else "clean", r["target"], round(r["accuracy"], 3),
                             None if r["asr"] is None else round(r["asr"], 3), "yes" if implanted else "no (left out)",
                             round(r["p"], 3) if r["p"] is not None else None, r["verdict"], r["suspects"], r["normalisation"],
                             round(r["seconds"], 1)])
                print(" ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
                for method in (m for m in args.purify.split(",") if m and backdoored and implanted):
                    purified.append(purify_row(built, method, options))
                    print(" ".join(str(c) for c in purified[-1]), file=sys.stderr, flush=True)
    scored = [r for r in kept if r["p"] is not None]  # binary classifiers get no calibrated verdict
    labels = [int(r["backdoored"]) for r in scored]
    summary = {"seed": args.seed, "models": len(scored), "backdoored": sum(labels),
               **(verdict_metrics([r["p"] for r in scored], labels) if scored else {}),
               "no calibrated verdict": len(kept) - len(scored),
               "target_first": sum(1 for r in scored if r["backdoored"] and r["suspects"][:1] == [r["target"]])}
    tables = [Table(f"foreign models (seed {args.seed}), scanned from the MLflow registry with the shipped calibration",
                    ["model", "truth", "target", "ACC", "ASR", "implanted", "p_backdoor", "verdict", "suspects", "normalisation", "scan s"],
                    rows),
              Table("over the implanted backdoors and clean models", ["metric", "value"], [[k, v] for k, v in summary.items()])]
    if args.previous:
        previous = _previous_calibration(calibration)
        p_previous = [previous.probability(r["statistics"]) for r in scored]
        tables.append(Table("the same scans scored with the previous features (fitted on the zoo like the shipped calibration)",
                            ["model", "p_backdoor (previous)"], [[r["name"], round(p, 3)] for r, p in zip(scored, p_previous)]
                            + [[k, v] for k, v in verdict_metrics(p_previous, labels).items()]))
    if purified:
        tables.append(Table("purified through harden (reversed triggers only), judged with the owner's trigger on the test split",
                            ["model", "method", "ACC before", "ACC after", "ASR before", "ASR after", "ACC drop (pt)",
                             "guardrail passed", "target met (ASR <= 3%, drop <= 2 pt)", "seconds"], purified))
    if args.save:
        args.save.write_text(json.dumps({"summary": summary, "models": kept}, indent=1))
    emit(Report("harden.bench.foreign/1", "harden scan on foreign models (CPU)", summary, tables), "text", console=Console(width=200))


if __name__ == "__main__":
    main()
