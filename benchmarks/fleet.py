"""Fleet-scan throughput: `harden scan-registry` with 1 and 2 workers on the zoo, and a 10,000-version plan.

Registers N zoo models (benchmarks/zoo.py, cached safetensors) as pt2 model versions in a
temporary MLflow store, then scans all of them with 1 and with 2 workers (`--rescan`, so
both runs do the same work) through the real `harden.fleet.scan_registry`, and prints:
- per worker count: wall time, versions per minute, mean seconds and CPU seconds per version, speed-up;
- the measured per-version cost (CPU seconds: independent of other load on the machine)
  and the plan it implies for a 10,000-version registry.

    .venv/bin/python benchmarks/fleet.py                        # 8 models, local process pool
    .venv/bin/python benchmarks/fleet.py --models 16 --executor ray
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from zoo import ARCHS, arch_spec, load_zoo, write_npz, zoo_data  # noqa: E402

from harden import tracking  # noqa: E402
from harden.fleet import scan_registry  # noqa: E402
from harden.models import load_model  # noqa: E402
from harden.report import Report, Table, emit  # noqa: E402

REGISTRY_SIZE = 10_000


def register_zoo(count: int) -> int:
    zoo = load_zoo(lambda e: e.arch == ARCHS[0])[:count]  # one input geometry: the fleet scan gets one --data
    for entry in zoo:
        net = load_model(entry.path, arch=entry.arch).module.net
        info = tracking.log_model(net, entry.spec.shape, {"arch": entry.arch, "arch_kwargs": {}, "num_classes": 10,
                                                          "input_shape": list(entry.spec.shape), "mean": None, "std": None})
        tracking.register_model(info.model_uri, f"zoo-{entry.name}")
    return len(zoo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--checks", default="artifact,inversion")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="harden-fleet-bench-"))
    os.chdir(home)
    tracking.configure(f"sqlite:///{home / 'mlflow.db'}")
    write_npz(zoo_data(arch_spec(ARCHS[0]))[1], home / "clean.npz")
    with tracking.command_run("bench-fleet", None):
        count = register_zoo(args.models)

    rows, per_version, cpu = [], {}, {}
    for workers in (1, 2):
        result = scan_registry("name LIKE 'zoo-%'", data=str(home / "clean.npz"), checks=args.checks.split(","),
                               executor=args.executor, workers=workers, rescan=True)
        errors = [i.error for i in result.items if i.status == "error"]
        if errors:
            raise SystemExit(f"scan errors: {errors[:3]}")
        per_version[workers] = statistics.mean(i.duration_s for i in result.scanned)
        cpu[workers] = statistics.mean(i.cpu_s for i in result.scanned)
        rows.append([workers, len(result.scanned), round(result.duration_s, 1), round(result.throughput_per_min, 2),
                     round(per_version[workers], 2), round(cpu[workers], 2)])
    base = rows[0][3]
    for row in rows:
        row.append(round(row[3] / base, 2))

    # CPU seconds per version (artifact scan + inversion + MLflow logging), from the 1-thread runs: one core each
    cost = cpu[2]
    cpu_hours = REGISTRY_SIZE * cost / 3600
    efficiency = min(rows[1][6] / 2, 1.0)  # measured scaling per added worker (on a shared machine: a lower bound)
    plan = []
    for workers in (2, 16, 64, 256):
        plan.append([workers, round(REGISTRY_SIZE * cost / (workers * efficiency) / 3600, 2)])
    cores = os.cpu_count()
    emit(Report("harden.bench.fleet/1", f"scan-registry throughput ({args.executor}, {count} zoo versions, {cores} CPU cores, checks {args.checks})",
                {"cpu_s_per_version": cost, "efficiency": efficiency},
                [Table("Throughput", ["workers", "versions", "wall s", "versions/min", "wall s per version", "CPU s per version",
                                      "speed-up vs 1"], rows),
                 Table(f"Plan for {REGISTRY_SIZE:,} versions at {cost:.1f} CPU s per version ({cpu_hours:.1f} core-hours), "
                       f"scaling efficiency {efficiency:.2f} as measured",
                       ["workers (1 core each)", "wall hours, first full pass"], plan)],
                next_steps=["Later passes scan only new versions (harden.scan.harden_version tag): cost = new versions x per-version s.",
                            "A harden upgrade re-scans everything once: plan a full pass per release."]), "text")


if __name__ == "__main__":
    main()
