"""Scan time per device and inversion strategy, with a plain Neural Cleanse beside it.

The issue chose the trigger inversion's execution by measurement, per device: on 2 CPU cores
one class at a time beat one batched optimisation of all classes, and on a GPU batching was
expected to win. This script measures harden's own inversion on the device at hand: `loop` (one
class per forward pass) against `auto`, the default (classes share a pass while it holds at most
256 images of 32×32: all ten classes of a 32×32 model). It records the whole scan's time
(artifact check, load, inversion, verdict, through the real `harden.scan.scan`) of zoo models
(benchmarks/zoo.py; ResNet-18 models are built on first use, on the same device) under each
strategy, beside a plain Neural Cleanse (per-class loop, fixed 300 steps per class, no early
stop, same probe set, MAD index > 2) of the same model on the same device.

    .venv/bin/python benchmarks/scan_speed.py --archs small_cnn --device cpu
    python benchmarks/scan_speed.py --archs resnet18_cifar,small_cnn --seeds 0,1 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from zoo import load_zoo, write_npz, zoo_data  # noqa: E402

from harden import progress  # noqa: E402
from harden.data.pipeline import stratified_sample  # noqa: E402
from harden.models import load_model  # noqa: E402
from harden.report import Report, Table, emit  # noqa: E402
from harden.runtime import device_label, measure, reproducible, resolve_device  # noqa: E402
from harden.scan import scan  # noqa: E402
from harden.scan.inversion import InversionConfig, invert_triggers  # noqa: E402

COMPARED = ("loop", "auto")  # the strategies timed side by side


def _probe(entry, device: torch.device):
    """The model on `device` and the scan's probe set (10 clean images per class)."""
    model = load_model(entry.path, arch=entry.arch, device=device)
    return (model.module, *stratified_sample(zoo_data(entry.spec)[1], 10, 0))


def plain_neural_cleanse(entry, device: torch.device, steps: int = 300) -> tuple[float, float]:
    """(seconds, largest anomaly index) of the reference inversion on the scan's probe set."""
    module, images, labels = _probe(entry, device)
    with measure(device) as cost:
        result = invert_triggers(module, images, labels, 10, InversionConfig.plain_neural_cleanse(steps), device=device)
    return cost.duration_s, max(c.anomaly_index for c in result.classes)


def warm_up(entry, device: torch.device) -> None:
    """A few untimed steps per strategy on an architecture's first model: CUDA context, kernel
    selection and the allocator's first blocks are paid here, not by the first timed model."""
    module, images, labels = _probe(entry, device)
    for strategy in COMPARED:
        invert_triggers(module, images, labels, 10, replace(InversionConfig.plain_neural_cleanse(5), strategy=strategy), device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="small_cnn", help="zoo architectures (resnet18_cifar models are built on first use)")
    parser.add_argument("--seeds", default="0", help="zoo seeds: the clean model and every attack of each seed")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (the issue's CPU figures are on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    progress.set_enabled(False)
    device = resolve_device(args.device)
    reproducible(device)  # as every harden command does
    archs, seeds = args.archs.split(","), [int(s) for s in args.seeds.split(",")]
    zoo = load_zoo(lambda e: e.arch in archs and e.seed in seeds, device=args.device)
    rows, seconds, right = [], {s: [] for s in COMPARED + ("nc",)}, {s: 0 for s in COMPARED + ("nc",)}
    with tempfile.TemporaryDirectory() as tmp:
        clean_files: dict = {}
        warmed: set[str] = set()
        for entry in zoo:
            if entry.spec not in clean_files:
                clean_files[entry.spec] = write_npz(zoo_data(entry.spec)[1], Path(tmp) / f"clean-{entry.spec}.npz")
            if entry.arch not in warmed:
                warmed.add(entry.arch)
                warm_up(entry, device)
            row = [entry.name, "backdoor" if entry.backdoored else "clean"]
            for strategy in COMPARED:
                result = scan(str(entry.path), data=str(clean_files[entry.spec]), device=device, load_options={"arch": entry.arch},
                              options={"inversion": {"strategy": strategy}}, workdir=Path(tmp) / "scan")
                seconds[strategy].append(result.duration_s)
                right[strategy] += (result.verdict == "backdoor") == entry.backdoored
                row += [round(result.duration_s, 1), round(result.p_backdoor, 3), round(result.peak_memory_mb)]
            nc_seconds, index = plain_neural_cleanse(entry, device)
            seconds["nc"].append(nc_seconds)
            right["nc"] += (index > 2) == entry.backdoored
            row += [round(nc_seconds, 1), round(index, 2), round(nc_seconds / seconds["auto"][-1], 2)]
            rows.append(row)
            print(" ".join(str(c) for c in row), file=sys.stderr, flush=True)
    speedups = [nc / ours for nc, ours in zip(seconds["nc"], seconds["auto"])]
    summary = {"device": device_label(device), "models": len(zoo),
               **{f"median s, {s}": round(float(np.median(seconds[s])), 2) for s in seconds},
               **{f"right verdicts, {s}": f"{right[s]} of {len(zoo)}" for s in right},
               "speed-up over NC (auto)": f"{min(speedups):.2f}–{max(speedups):.2f}×"}
    headers = ["model", "truth"] + [f"{s} {c}" for s in COMPARED for c in ("s", "p", "peak MB")] + ["NC s", "NC index", "NC s / auto s"]
    tables = [Table("whole scan per strategy, and plain Neural Cleanse (300 steps/class)", headers, rows),
              Table("summary", ["", "value"], [[k, v] for k, v in summary.items()])]
    emit(Report("harden.bench.scan_speed/1", f"Scan time per strategy ({device_label(device)})", summary, tables), "text",
         console=Console(width=200))


if __name__ == "__main__":
    main()
