"""Does harden find the input normalisation a model was trained with? (harden/models/normalisation.py)

Every usable zoo model (benchmarks/zoo.py, trained on [0, 1] pixels) is put behind each
convention in turn: the network then expects `(pixels - mean) / std`, exactly as if it had been
trained that way, and MLflow would record none of it. The choice runs on the defender's clean
set, as `harden scan/purify/evaluate` run it. A row per architecture and true convention: how
often the choice is the true one, an equivalent one (ImageNet and CIFAR-10 statistics differ by
under 0.03), `none` (the model is then scanned on the wrong inputs), or another.

    .venv/bin/python benchmarks/normalisation.py [--per-arch N]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from zoo import load_zoo, load_zoo_model, zoo_data  # noqa: E402

from harden.models.normalisation import CONVENTIONS, choose_normalisation  # noqa: E402
from harden.report import Report, Table, emit  # noqa: E402

EQUIVALENT = {"imagenet": "cifar10", "cifar10": "imagenet"}


class ExpectsNormalised(nn.Module):
    """`net` as a model that takes normalised inputs: what it computes on `z` is what the
    original computed on the pixels `z * std + mean`."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z * self.std + self.mean)


def outcome(true: str, chosen: str | None) -> str:
    chosen = chosen or "none"
    if chosen == true:
        return "found"
    if EQUIVALENT.get(true) == chosen:
        return "equivalent"
    return "missed (none)" if chosen == "none" else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-arch", type=int, default=0, help="at most N models per architecture (0: all)")
    args = parser.parse_args()
    zoo = load_zoo()
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    taken: collections.Counter = collections.Counter()
    for entry in zoo:
        if args.per_arch and taken[entry.arch] >= args.per_arch:
            continue
        taken[entry.arch] += 1
        clean = zoo_data(entry.spec)[1]
        for true, (mean, std) in CONVENTIONS.items():
            if len(mean) not in (1, entry.spec.channels):
                continue
            loaded = load_zoo_model(entry)
            if true != "none":
                loaded.module.net = ExpectsNormalised(loaded.module.net, mean, std).eval()
            choice = choose_normalisation(loaded, clean)
            counts[(entry.arch, true)][outcome(true, choice.name if choice else None)] += 1
    columns = ["found", "equivalent", "missed (none)", "other"]
    rows = [[arch, true, sum(c.values()), *[c[k] for k in columns]] for (arch, true), c in sorted(counts.items())]
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    rows.append(["all", "all", sum(total.values()), *[total[k] for k in columns]])
    emit(Report("harden.bench.normalisation/1", f"Input normalisation found on {sum(taken.values())} zoo models", {},
                [Table("true convention → harden's choice", ["arch", "true", "models", *columns], rows)]), "text")


if __name__ == "__main__":
    main()
