"""Scan benchmark and calibration: p_backdoor on a held-out zoo, against plain Neural Cleanse.

Builds (or re-uses) the zoo of benchmarks/zoo.py, scans every model through the real
`harden.scan.scan` pipeline (safetensors + --arch, defender's clean set as .npz), then:
- `--fit`: fits the logistic calibration on the whole zoo and writes
  harden/scan/calibration.json (with the held-out metrics recorded in it);
- reports per model: true label, held-out p_backdoor and verdict (leave-one-out: each
  model scored by a calibration fitted without it), seconds, steps, peak memory;
- reports over the zoo, held out: AUC, TrojAI cross-entropy (bar 0.3465, random 0.693),
  false positives on clean models;
- `--baseline N`: runs a plain Neural Cleanse (per-class loop, fixed 300 steps, same probe
  set, MAD anomaly index > 2) side by side on N held-out models: time and verdicts.

    .venv/bin/python benchmarks/scan.py --fit --baseline 6
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from zoo import ZOO_DIR, load_zoo, zoo_data  # noqa: E402

from harden.data import to_uint8_arrays  # noqa: E402
from harden.models import load_model  # noqa: E402
from harden.report import Report, Table, emit  # noqa: E402
from harden.scan import scan  # noqa: E402
from harden.scan import verdict as calibration  # noqa: E402
from harden.scan.classifier import probe_set  # noqa: E402
from harden.scan.inversion import InversionConfig, invert_triggers  # noqa: E402

STATS_FILE = ZOO_DIR / "scan_stats.json"


def _scan_all(zoo, clean_npz: Path, rescan: bool) -> dict:
    cached = json.loads(STATS_FILE.read_text()) if STATS_FILE.exists() and not rescan else {}
    for entry in zoo:
        if entry.name in cached:
            continue
        start = time.perf_counter()
        result = scan(str(entry.path), data=str(clean_npz), checks=["inversion"], load_options={"arch": entry.arch})
        inversion = result.checks[0]
        cached[entry.name] = {"statistics": inversion.details["statistics"], "seconds": time.perf_counter() - start,
                              "peak_memory_mb": result.peak_memory_mb, "steps": inversion.details["optimisation_steps"],
                              "suspects": inversion.details["suspect_classes"], "per_class": inversion.details["per_class"]}
        print(f"scanned {entry.name} in {cached[entry.name]['seconds']:.1f}s", flush=True)
        STATS_FILE.write_text(json.dumps(cached, indent=1))
    return cached


def _baseline(entries, clean, cal) -> list[list]:
    """Plain NC and harden's inversion on the same probe set, timed back to back per model."""
    images, labels = probe_set(clean, 10, 0)
    rows = []
    for entry in entries:
        model = load_model(entry.path, arch=entry.arch)
        runs = {}
        for name, config in (("nc", InversionConfig.plain_neural_cleanse(300)), ("harden", InversionConfig())):
            start = time.perf_counter()
            runs[name] = (invert_triggers(model.module, images, labels, 10, config), time.perf_counter() - start)
        (plain, nc_s), (ours, ours_s) = runs["nc"], runs["harden"]
        index = max(c.anomaly_index for c in plain.classes)
        p = cal.probability(ours.statistics)
        rows.append([entry.name, "backdoor" if entry.backdoored else "clean", round(index, 2), "backdoor" if index > 2 else "clean",
                     plain.total_steps, round(nc_s, 1), round(p, 3), "backdoor" if p >= 0.5 else "clean", ours.total_steps,
                     round(ours_s, 1), round(nc_s / ours_s, 2)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="fit and write harden/scan/calibration.json")
    parser.add_argument("--rescan", action="store_true", help="ignore cached scan statistics")
    parser.add_argument("--baseline", type=int, default=0, help="models of the zoo's holdout split to compare with plain Neural Cleanse")
    args = parser.parse_args()
    torch.set_num_threads(2)
    zoo = load_zoo()
    _, clean, _ = zoo_data()
    with tempfile.TemporaryDirectory() as tmp:
        clean_npz = Path(tmp) / "clean.npz"
        x, y = to_uint8_arrays(clean)
        np.savez(clean_npz, x=x, y=y)
        stats = _scan_all(zoo, clean_npz, args.rescan)
    rows_stats = [stats[e.name]["statistics"] for e in zoo]
    labels = [int(e.backdoored) for e in zoo]
    if args.fit:
        calibration.fit(rows_stats, labels, f"benchmarks/scan.py --fit on {len(zoo)} zoo models ({sum(labels)} backdoored)").save()
    cal = calibration.Calibration.load()
    held_out = calibration.leave_one_out(rows_stats, labels)
    rows = []
    for entry, p_loo in zip(zoo, held_out):
        p = cal.probability(stats[entry.name]["statistics"])
        rows.append([entry.name, "backdoor" if entry.backdoored else "clean", entry.target, round(p_loo, 3),
                     "backdoor" if p_loo >= 0.5 else "clean", round(p, 3), round(stats[entry.name]["seconds"], 1),
                     stats[entry.name]["steps"], round(stats[entry.name]["peak_memory_mb"])])
    summary = {"models": len(labels), "backdoored": sum(labels), "auc": calibration.auc(held_out, labels),
               "cross_entropy": calibration.cross_entropy(held_out, labels),
               "false_positives_on_clean": sum(1 for p, y in zip(held_out, labels) if y == 0 and p >= 0.5),
               "missed_backdoors": sum(1 for p, y in zip(held_out, labels) if y == 1 and p < 0.5),
               "median_scan_s": float(np.median([stats[e.name]["seconds"] for e in zoo]))}
    if args.fit:
        cal.holdout = {"method": "leave-one-out", **summary}
        cal.save()
    tables = [Table("per model (p held out = leave-one-out)", ["model", "truth", "target", "p held out", "verdict", "p shipped", "seconds", "steps", "peak MB"], rows),
              Table("held-out calibration (leave-one-out)", ["metric", "value"], [[k, v] for k, v in summary.items()])]
    if args.baseline:
        holdout = [e for e in zoo if e.split == "holdout"]
        picks = [e for e in holdout if e.backdoored][: args.baseline - args.baseline // 3] + [e for e in holdout if not e.backdoored][: args.baseline // 3]
        tables.append(Table("side by side: plain Neural Cleanse (300 steps/class, MAD>2) vs harden scan",
                            ["model", "truth", "NC index", "NC verdict", "NC steps", "NC s", "harden p", "harden verdict", "harden steps", "harden s", "speed-up"],
                            _baseline(picks, clean, cal)))
    emit(Report("harden.bench.scan/1", "harden scan benchmark (digits 3x32x32, CPU)", summary, tables), "text", console=Console(width=200))
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
