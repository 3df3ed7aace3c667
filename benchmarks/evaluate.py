"""Evaluation throughput: eager nn.Module vs the same weights through MLflow's pt2 format.

harden runs registry models as torch.export GraphModules; this shows what that costs
against the eager module, per architecture, on digits rendered 3x32x32 (CPU unless
--device says otherwise).

    .venv/bin/python benchmarks/evaluate.py [--device cpu] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import mlflow

from harden import tracking
from harden.data import load_data
from harden.evaluation import evaluate
from harden.models import InputSpec, create_model, load_model
from harden.report import Report, Table, emit


def _throughput(model, data, device, batch_size, repeats=2) -> float:
    evaluate(model, data, batch_size=batch_size, device=device)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        evaluate(model, data, batch_size=batch_size, device=device)
    return repeats * len(data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    spec = InputSpec(3, 32, 32)
    data = load_data("digits", spec, num_classes=10)
    rows = []
    with tempfile.TemporaryDirectory() as home:
        os.chdir(home)
        tracking.configure(f"sqlite:///{home}/mlflow.db")
        tracking.quiet_library_logs(False)
        for arch in ("small_cnn", "resnet18_cifar"):
            net = create_model(arch, num_classes=10).eval()
            with mlflow.start_run():
                info = tracking.log_model(net, spec.shape, {"arch": arch})
            loaded = load_model(info.model_uri, device=args.device)
            eager = _throughput(net, data, args.device, args.batch_size)
            pt2 = _throughput(loaded, data, args.device, args.batch_size)
            rows.append([arch, len(data), round(eager, 1), round(pt2, 1), round(pt2 / eager, 3)])
    emit(Report("harden.bench.evaluate/1", f"Evaluation throughput (images/s), device {args.device}, batch {args.batch_size}", {"rows": rows},
                [Table("eager vs pt2", ["arch", "images", "eager img/s", "pt2 img/s", "pt2/eager"], rows)]), "text")


if __name__ == "__main__":
    main()
