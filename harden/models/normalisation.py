"""Which input normalisation a model expects, when neither the user nor the model says.

Most models are trained on normalised images (ImageNet or CIFAR statistics, [-1, 1], raw
0-255 values) and MLflow records none of it. Fed [0, 1] pixels, such a model still runs, but
it gets its clean data wrong, and a scan of it measures noise: harden would rather find out.
The model's cross-entropy on a few clean images per class under each common convention tells:
it was trained to minimise it under its own. Accuracy cannot tell: a ReLU network is nearly
blind to the scale of its input. The CNN of examples/evaluate_outside_model.py, trained on
MNIST-normalised digits, gets 0.920 of them right on raw pixels and 0.935 on 0-255 values, at
cross-entropies of 0.775 and 10.7 against 0.215 under its own. `none` is kept unless another
convention lowers the cross-entropy by `MIN_GAIN` nats; `--mean/--std` (or harden's metadata) always win, and `--mean 0 --std 1`
turns the choice off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harden.data.pipeline import LabelledDataset, stratified_sample
from harden.evaluation import batched_logits
from harden.models.loader import LoadedModel
from harden.report import Table

# name → (mean, std) in [0, 1] pixel units; one value applies to every channel
CONVENTIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "none": ((0.0,), (1.0,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "minus_one_to_one": ((0.5,), (0.5,)),
    "mnist": ((0.1307,), (0.3081,)),
    "bytes": ((0.0,), (1 / 255,)),  # 0-255 pixel values
}
MIN_GAIN = 0.1  # nats of mean cross-entropy below `none`
PER_CLASS = 20


@dataclass
class NormalisationChoice:
    """The convention chosen, and the clean cross-entropy and accuracy under each one tried."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cross_entropy: dict[str, float]
    accuracy: dict[str, float]

    def table(self) -> Table:
        rows = [[name, self.cross_entropy[name], self.accuracy[name], "yes" if name == self.name else ""] for name in self.cross_entropy]
        return Table(f"Input normalisation chosen by harden: {self.name} (mean {[round(m, 4) for m in self.mean]}, "
                     f"std {[round(s, 4) for s in self.std]}; pass --mean/--std to choose)",
                     ["convention", "clean cross-entropy", "clean accuracy", "chosen"], rows)


@torch.no_grad()
def choose_normalisation(loaded: LoadedModel, data: LabelledDataset, device: torch.device | str = "cpu", seed: int = 0
                         ) -> NormalisationChoice | None:
    """Apply the convention that reads `data` best to `loaded` (module and metadata) and return it;
    None when the model already normalises (user or metadata) or `none` is best."""
    if loaded.mean is not None:
        return None
    images, labels = stratified_sample(data, PER_CLASS, seed)
    channels = images.shape[1]
    module = loaded.module.eval()
    cross_entropy, accuracy = {}, {}
    for name, (mean, std) in CONVENTIONS.items():
        if len(mean) not in (1, channels):
            continue
        normalised = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        # the wrapper does not normalise yet, so feeding normalised pixels runs the network on them
        logits = batched_logits(module, normalised, device)
        cross_entropy[name] = float(torch.nn.functional.cross_entropy(logits, labels))
        accuracy[name] = float((logits.argmax(1) == labels).float().mean())
    best = min(cross_entropy, key=lambda name: cross_entropy[name])
    if cross_entropy[best] > cross_entropy["none"] - MIN_GAIN:
        return None
    mean, std = (tuple(v * channels if len(v) == 1 else v) for v in CONVENTIONS[best])
    loaded.module.set_normalisation(mean, std)
    loaded.mean, loaded.std = mean, std
    return NormalisationChoice(best, mean, std, cross_entropy, accuracy)
