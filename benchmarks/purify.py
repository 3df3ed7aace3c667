"""Purification benchmark: attack × method on zoo models, with 5% of the data as the defender's clean set.

For every backdoored zoo model (benchmarks/zoo.py) of the chosen attacks and every method,
runs the real `harden.purify.purify` pipeline on a clean set of 5% of the dataset (90
digits; a fifth of it held out for selection and the guardrail) and measures on the zoo's
untouched test split: ACC and the real trigger's ASR before/after, DER, seconds, peak memory
(the process's RSS on the CPU, GPU memory allocated on CUDA).
`--reference` also times a straightforward per-step implementation of the published NFT
(1000 steps, masks on every BatchNorm, layer-index bounds, MixUp, BN statistics updated)
on the same models and clean set, and reports the time ratio. "guardrail passed" is what harden
decided on the validation split alone (accuracy kept and the known trigger's ASR at most 0.2):
whether the result would have been registered. unlearn-relearn is handed the model's own
poisoned training set as `--train-data`.

    .venv/bin/python benchmarks/purify.py                       # nft + trigger-unlearn, BadNets/Blend/SIG
    .venv/bin/python benchmarks/purify.py --methods nft --set nft.steps=300 --reference
    python benchmarks/purify.py --archs resnet18_cifar,small_cnn --reference --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).parent))
from zoo import load_zoo, training_set, write_npz, zoo_data  # noqa: E402

from harden import progress  # noqa: E402
from harden.data import make_loader, split  # noqa: E402
from harden.evaluation import der, evaluate  # noqa: E402
from harden.models import load_model  # noqa: E402
from harden.purify import METHODS, options_from_pairs, purify  # noqa: E402
from harden.report import Report, Table, emit  # noqa: E402
from harden.runtime import device_label, measure, reproducible, resolve_device  # noqa: E402

ATTACKS = {"badnets": "grid_paste", "blend": "blend", "sig": "sig", "wanet": "wanet"}


class _Mask(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.mask = torch.nn.Parameter(torch.ones(channels))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def reference_nft(model: torch.nn.Module, clean, steps: int = 1000, batch: int = 128, lr: float = 0.05, seed: int = 0,
                  device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """The published NFT, written the straightforward way: one BN at a time, one step at a time."""
    torch.manual_seed(seed)
    model.to(device)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    masks = []
    for bn in bns:
        parametrize.register_parametrization(bn, "weight", _Mask(bn.num_features).to(device))
        masks.append(bn.parametrizations.weight[0].mask)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in masks:
        m.requires_grad_(True)
    optimizer = torch.optim.SGD(masks, lr=lr, momentum=0.95)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0.02)
    images, labels = (t.to(device) for t in next(iter(make_loader(clean, batch_size=len(clean)))))
    per_class = len(clean) / 10
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(labels), (batch,)).to(device)
        x, y = images[idx], labels[idx]
        lam = float(np.random.beta(1.0, 1.0))
        perm = torch.randperm(batch).to(device)
        logits = model(lam * x + (1 - lam) * x[perm])
        loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        loss = loss + 0.001 / per_class * sum((1 - m).abs().sum() for m in masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for k, m in enumerate(masks, start=1):
                m.clamp_(0.8 * math.exp(-0.5 * k), 1.0)
    for bn in bns:
        parametrize.remove_parametrizations(bn, "weight", leave_parametrized=True)
    return model.eval()


def defender_files(spec, clean_fraction: float, clean_seed: int, folder: Path):
    """The defender's clean set (`clean_fraction` of the dataset, drawn by `clean_seed`) and the test
    split at `spec`, with the .npz files a user would pass (written once per input geometry)."""
    train, defender, test = zoo_data(spec)
    share = clean_fraction * (len(train) + len(defender) + len(test)) / len(defender)  # of the defender's 15% split
    clean = split(defender, [share, 1 - share], seed=clean_seed)[0]
    clean_npz, test_npz = folder / f"clean-{spec}.npz", folder / f"test-{spec}.npz"
    if not clean_npz.exists():
        write_npz(clean, clean_npz)
        write_npz(test, test_npz)
    return clean, test, clean_npz, test_npz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="nft,trigger-unlearn")
    parser.add_argument("--attacks", default="badnets,blend,sig")
    parser.add_argument("--archs", default="small_cnn,resnet8_narrow", help="zoo architectures; resnet18_cifar models are built on first use")
    parser.add_argument("--seeds", default="0", help="zoo seeds (model variants) per attack")
    parser.add_argument("--clean-fraction", type=float, default=0.05, help="defender's clean set, as a fraction of the dataset")
    parser.add_argument("--clean-seed", type=int, default=0, help="which draw of the defender's clean set (single runs are noisy at the 2-point line)")
    parser.add_argument("--validation-fraction", type=float, default=0.2, help="of the clean set, held out for checkpoint selection and the guardrail")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD.KEY=VALUE")
    parser.add_argument("--reference", action="store_true", help="also time the straightforward published NFT")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]; the zoo's missing models are built there too")
    parser.add_argument("--format", default="text")
    args = parser.parse_args()
    progress.set_enabled(False)
    device = resolve_device(args.device)
    reproducible(device)  # as every harden command does
    options = options_from_pairs(args.settings)
    zoo = load_zoo(lambda e: e.backdoored and e.arch in args.archs.split(",") and str(e.seed) in args.seeds.split(",")
                   and any(e.attack.startswith(ATTACKS[a]) for a in args.attacks.split(",")), device=args.device)
    rows, reference_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in zoo:
            clean, test, clean_npz, test_npz = defender_files(entry.spec, args.clean_fraction, args.clean_seed, Path(tmp))
            for method in args.methods.split(","):
                # unlearn-relearn gets the model's own poisoned training set, as the sensitivity test would
                suspect = write_npz(training_set(entry), Path(tmp) / "train.npz") if METHODS[method].needs_train_data else None
                result = purify(str(entry.path), str(clean_npz), method=method, trigger=entry.attack, target=entry.target,
                                test_data=str(test_npz), train_data=suspect and str(suspect), load_options={"arch": entry.arch},
                                options=options, validation_fraction=args.validation_fraction, device=device)
                b, a = result.before, result.after
                rows.append([entry.name, method, b.test_accuracy, a.test_accuracy, b.test_known_asr, a.test_known_asr,
                             round(100 * (b.test_accuracy - a.test_accuracy), 2),
                             der(b.test_known_asr, a.test_known_asr, b.test_accuracy, a.test_accuracy),
                             "yes" if result.passed else "no",
                             "yes" if a.test_known_asr <= 0.03 and b.test_accuracy - a.test_accuracy <= 0.02 else "no",
                             round(result.duration_s, 1), round(result.peak_memory_mb)])
                print(" ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
            if args.reference:
                model = load_model(entry.path, arch=entry.arch).trainable()
                with measure(device) as cost:
                    reference_nft(model, clean, device=device)
                after = evaluate(model, test, trigger=entry.attack, target=entry.target, device=device)
                ours = [r for r in rows if r[0] == entry.name and r[1] == "nft"]
                ratio = cost.duration_s / ours[0][-2] if ours else None
                reference_rows.append([entry.name, after.accuracy, after.asr, round(cost.duration_s, 1), ratio])
    tables = [Table("Purification (test split; clean set = 5% of the data)",
                    ["model", "method", "ACC before", "ACC after", "ASR before", "ASR after", "ACC drop (pt)", "DER",
                     "guardrail passed", "target met", "seconds", "peak MB"], rows)]
    if reference_rows:
        tables.append(Table("Published NFT, straightforward implementation (1000 steps)",
                            ["model", "ACC after", "ASR after", "seconds", "time ratio vs harden nft"], reference_rows))
    emit(Report("harden.bench.purify/1", f"Purification benchmark ({device_label(device)})", {"rows": rows, "reference": reference_rows}, tables), args.format)


if __name__ == "__main__":
    main()
