"""Memory layout of training batches: contiguous vs channels-last, per architecture, on CPU.

Why `harden.runtime.training_layout` hands the model channels-last batches on CPU: it
times one forward+backward step (cross-entropy, random 3×32×32 batch) of each registry
architecture in both layouts, interleaved and repeated, and prints the medians and the
speed-up. Weights stay contiguous in both runs, as they do in harden.

    .venv/bin/python benchmarks/layout.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from harden.models import create_model
from harden.report import Report, Table, emit

CASES = (("small_cnn", 128), ("resnet8_narrow", 128), ("resnet18_cifar", 32))


def _step_ms(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), labels).backward()
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for arch, batch in CASES:
        net = create_model(arch, num_classes=10, in_channels=3).train()
        images, labels = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        layouts = {"contiguous": images, "channels_last": images.contiguous(memory_format=torch.channels_last)}
        _step_ms(net, images, labels, 2)  # warm-up: oneDNN primitive creation
        times: dict[str, list[float]] = {name: [] for name in layouts}
        for _ in range(args.repeats):
            for name, batch_images in layouts.items():
                times[name].append(_step_ms(net, batch_images, labels, args.steps))
        contiguous, channels_last = (statistics.median(times[n]) for n in layouts)
        rows.append([arch, batch, round(contiguous, 1), round(channels_last, 1), round(contiguous / channels_last, 2)])
    emit(Report("harden.bench.layout/1", f"Forward+backward step on CPU ({args.threads} threads, median of {args.repeats}×{args.steps} steps)",
                {}, [Table("Training step by batch layout", ["architecture", "batch", "contiguous ms", "channels-last ms", "speed-up"], rows)]),
         "text")


if __name__ == "__main__":
    main()
