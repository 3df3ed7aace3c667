"""A zoo of clean and backdoored models for calibrating and benchmarking `harden scan`.

Three architectures, each at its own input geometry: small_cnn and resnet8_narrow (BatchNorm,
digits rendered 3×32×32) and lenet5 (no BatchNorm, 1×28×28 grey), so that the scan's
calibration is fitted and judged across architectures and input sizes (benchmarks/scan.py
holds each architecture out in turn). Triggers from harden.attacks (patch, blend, SIG, warp)
toward varying targets, several seeds. ResNet-18 (resnet18_cifar) models are planned the same way but built only when a
benchmark selects them (`benchmarks/purify.py --archs resnet18_cifar`). Models are cached as safetensors under benchmarks/.zoo/ (git-ignored), so the
scan and purify benchmarks re-use them. A "backdoored" model must reach ASR ≥ 0.8 on
held-out data; attacks that fail to implant are recorded as such and left out, and so is a model
whose training collapsed (test accuracy below MIN_ACCURACY: the scan refuses it as not fitting its data).

    .venv/bin/python benchmarks/zoo.py          # builds (or re-uses) the zoo, prints it
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harden.attacks import Attack, PoisonedDataset
from harden.data import LabelledDataset, load_data, split, to_uint8_arrays
from harden.evaluation import evaluate
from harden.models import InputSpec, create_model, get_arch
from harden.models.loader import load_model
from harden.report import Report, Table, emit
from harden.runtime import resolve_device, seed_everything
from harden.training import TrainConfig, fit

ZOO_DIR = Path(__file__).parent / ".zoo"
ARCHS = ("small_cnn", "resnet8_narrow", "lenet5")
LARGE_ARCHS = ("resnet18_cifar",)  # planned too, but built only when a benchmark asks for them (minutes per model on CPU)
ATTACKS = ("grid_paste", "blend", "sig", "wanet:k=4,s=1.0")
EPOCHS = {"lenet5": 30}  # training epochs where the default 8 leave a zoo architecture short of ASR 0.8 on most attacks
CLEAN_SEEDS = 30  # per architecture: the clean side of the calibration needs its own spread
ATTACK_SEEDS = 10  # per attack and architecture
MIN_ACCURACY = 0.5  # below it a model does not work (one WaNet small_cnn collapsed onto its target: accuracy 0.14)


@dataclass
class ZooModel:
    name: str
    arch: str
    attack: str | None  # trigger spec, None for clean models
    target: int | None
    seed: int
    split: str  # fit | holdout (holdout models are never used to fit the calibration)
    accuracy: float = 0.0
    asr: float | None = None

    @property
    def path(self) -> Path:
        return ZOO_DIR / f"{self.name}.safetensors"

    @property
    def backdoored(self) -> bool:
        return self.attack is not None

    @property
    def spec(self) -> InputSpec:
        return arch_spec(self.arch)


def arch_spec(arch: str) -> InputSpec:
    """The input a zoo architecture is trained and scanned at: its registry default."""
    return InputSpec(*get_arch(arch).default_input)


@functools.lru_cache(maxsize=None)
def zoo_data(spec: InputSpec = arch_spec(ARCHS[0]), seed: int = 0) -> tuple[LabelledDataset, LabelledDataset, LabelledDataset]:
    """(train, defender's clean set, test) at `spec`: the same split of the digits for every zoo model."""
    return tuple(split(load_data("digits", spec, num_classes=10), [0.7, 0.15, 0.15], seed=seed))  # type: ignore[return-value]


def write_npz(data: LabelledDataset, path: Path) -> Path:
    """`data` as the uint8 .npz (x, y) a user would pass to `harden scan/purify --data`."""
    import numpy as np

    x, y = to_uint8_arrays(data)
    np.savez(path, x=x, y=y)
    return path


def zoo_plan(fresh: int = 0) -> list[ZooModel]:
    """The calibration zoo: CLEAN_SEEDS clean seeds and ATTACK_SEEDS seeds per attack for each
    architecture. With `fresh` = n, a fresh zoo instead: the next n seeds per attack and 3n
    clean seeds, models that neither the fit nor any design choice has seen (split "fresh")."""
    clean_seeds = range(CLEAN_SEEDS, CLEAN_SEEDS + 3 * fresh) if fresh else range(CLEAN_SEEDS)
    attack_seeds = range(ATTACK_SEEDS, ATTACK_SEEDS + fresh) if fresh else range(ATTACK_SEEDS)
    plan = []
    for arch in ARCHS + LARGE_ARCHS:
        for seed in clean_seeds:
            split = "fresh" if fresh else "holdout" if seed % 4 >= 2 else "fit"
            plan.append(ZooModel(f"{arch}-clean-s{seed}", arch, None, None, seed, split))
        for i, attack in enumerate(ATTACKS):
            for seed in attack_seeds:
                target = (3 * i + 2 * seed + 1) % 10
                name = f"{arch}-{attack.split(':')[0]}-t{target}-s{seed}"
                split = "fresh" if fresh else "holdout" if seed == 1 else "fit"
                plan.append(ZooModel(name, arch, attack, target, seed, split))
    return plan


def training_set(entry: ZooModel) -> LabelledDataset:
    """The data `entry` was trained on: the train split, 10% of it poisoned when the model is backdoored."""
    train = zoo_data(entry.spec)[0]
    if not entry.attack:
        return train
    return PoisonedDataset(train, Attack(entry.attack, target=entry.target, num_classes=10), rate=0.1, seed=entry.seed)


def build(entry: ZooModel, device: torch.device) -> ZooModel:
    from safetensors.torch import save_file

    _, _, test = zoo_data(entry.spec)
    seed_everything(entry.seed)
    model = create_model(entry.arch, num_classes=10, in_channels=entry.spec.channels)
    data = training_set(entry)
    fit(model, data, TrainConfig(epochs=EPOCHS.get(entry.arch, 8), lr=2e-3, seed=entry.seed), device=device)
    result = evaluate(model, test, trigger=entry.attack, target=entry.target, device=device)
    entry.accuracy, entry.asr = result.accuracy, result.asr
    ZOO_DIR.mkdir(exist_ok=True)
    save_file({name: tensor.cpu() for name, tensor in model.state_dict().items()}, str(entry.path))
    return entry


def load_zoo(select: Callable[[ZooModel], bool] = lambda entry: entry.arch in ARCHS, fresh: int = 0,
             device: str = "auto") -> list[ZooModel]:
    """Build the selected models of `zoo_plan(fresh)` that are missing (on `device`, CUDA when
    present by default); return the usable selection (failed attacks and collapsed models left out)."""
    index = ZOO_DIR / "index.json"
    known = {e["name"]: ZooModel(**e) for e in json.loads(index.read_text())} if index.exists() else {}
    entries = []
    for planned in filter(select, zoo_plan(fresh)):
        entry = known.get(planned.name)
        if entry is not None:
            entry.split = planned.split  # a fresh model of an earlier plan may belong to the calibration zoo now
        if entry is None or not entry.path.exists():
            start = time.perf_counter()
            entry = build(planned, resolve_device(device))
            print(f"built {entry.name}: acc {entry.accuracy:.3f} asr {entry.asr} in {time.perf_counter() - start:.0f}s", flush=True)
            known[entry.name] = entry
            index.write_text(json.dumps([asdict(e) for e in known.values()], indent=1))
        entries.append(entry)
    return [e for e in entries if e.accuracy >= MIN_ACCURACY and (not e.backdoored or (e.asr or 0) >= 0.8)]


def load_zoo_model(entry: ZooModel):
    return load_model(entry.path, arch=entry.arch)


def main() -> None:
    zoo = load_zoo()
    rows = [[e.name, e.arch, e.attack or "-", e.target, e.split, round(e.accuracy, 4), None if e.asr is None else round(e.asr, 4)] for e in zoo]
    emit(Report("harden.bench.zoo/1", f"Zoo: {len(zoo)} usable models", {}, [Table("models", ["name", "arch", "attack", "target", "split", "ACC", "ASR"], rows)]), "text")


if __name__ == "__main__":
    main()
