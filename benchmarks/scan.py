"""Scan benchmark and calibration: p_backdoor on a held-out zoo, against plain Neural Cleanse.

Builds (or re-uses) the zoo of benchmarks/zoo.py, scans every model through the real
`harden.scan.scan` pipeline (safetensors + --arch, defender's clean set as .npz), then:
- `--fit`: fits the logistic calibration on the zoo's `fit` split and writes
  harden/scan/calibration.json (with the held-out metrics recorded in it);
- reports per model: true label, p_backdoor, verdict, seconds, peak memory;
- reports over the held-out split: AUC, TrojAI cross-entropy (bar 0.3465, random 0.693),
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
                              "suspects": inversion.details["suspect_classes"]}
        print(f"scanned {entry.name} in {cached[entry.name]['seconds']:.1f}s", flush=True)
        STATS_FILE.write_text(json.dumps(cached, indent=1))
    return cached


def _baseline(entries, clean, stats) -> list[list]:
    images, labels = probe_set(clean, 10, 0)
    rows = []
    for entry in entries:
        model = load_model(entry.path, arch=entry.arch)
        start = time.perf_counter()
        plain = invert_triggers(model.module, images, labels, 10, InversionConfig.plain_neural_cleanse(300))
        seconds = time.perf_counter() - start
        index = max(c.anomaly_index for c in plain.classes)
        ours = stats[entry.name]
        p = calibration.Calibration.load().probability(ours["statistics"])
        rows.append([entry.name, "backdoor" if entry.backdoored else "clean", round(index, 2), "backdoor" if index > 2 else "clean",
                     plain.total_steps, round(seconds, 1), round(p, 3), "backdoor" if p >= 0.5 else "clean", ours["steps"],
                     round(ours["seconds"], 1), round(seconds / ours["seconds"], 2)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="fit and write harden/scan/calibration.json")
    parser.add_argument("--rescan", action="store_true", help="ignore cached scan statistics")
    parser.add_argument("--baseline", type=int, default=0, help="held-out models to compare with plain Neural Cleanse")
    args = parser.parse_args()
    torch.set_num_threads(2)
    zoo = load_zoo()
    _, clean, _ = zoo_data()
    with tempfile.TemporaryDirectory() as tmp:
        clean_npz = Path(tmp) / "clean.npz"
        x, y = to_uint8_arrays(clean)
        np.savez(clean_npz, x=x, y=y)
        stats = _scan_all(zoo, clean_npz, args.rescan)
    fit_set = [e for e in zoo if e.split == "fit"]
    holdout = [e for e in zoo if e.split == "holdout"]
    if args.fit:
        fitted = calibration.fit([stats[e.name]["statistics"] for e in fit_set], [int(e.backdoored) for e in fit_set],
                                 f"benchmarks/scan.py --fit on {len(fit_set)} zoo models ({sum(e.backdoored for e in fit_set)} backdoored)")
        fitted.save()
    cal = calibration.Calibration.load()
    rows, probs, labels = [], [], []
    for entry in zoo:
        p = cal.probability(stats[entry.name]["statistics"])
        rows.append([entry.name, entry.split, "backdoor" if entry.backdoored else "clean", entry.target, round(p, 3),
                     "backdoor" if p >= 0.5 else "clean", stats[entry.name]["suspects"][:1], round(stats[entry.name]["seconds"], 1),
                     round(stats[entry.name]["peak_memory_mb"])])
        if entry.split == "holdout":
            probs.append(p)
            labels.append(int(entry.backdoored))
    clean_fp = sum(1 for p, y in zip(probs, labels) if y == 0 and p >= 0.5)
    summary = {"holdout_models": len(labels), "holdout_backdoored": sum(labels), "auc": calibration.auc(probs, labels),
               "cross_entropy": calibration.cross_entropy(probs, labels), "false_positives_on_clean": clean_fp,
               "missed_backdoors": sum(1 for p, y in zip(probs, labels) if y == 1 and p < 0.5)}
    if args.fit:
        cal.holdout = summary
        cal.save()
    tables = [Table("per model", ["model", "split", "truth", "target", "p_backdoor", "verdict", "top suspect", "seconds", "peak MB"], rows),
              Table("held-out calibration", ["metric", "value"], [[k, v] for k, v in summary.items()])]
    if args.baseline:
        picks = [e for e in holdout if e.backdoored][: args.baseline - args.baseline // 3] + [e for e in holdout if not e.backdoored][: args.baseline // 3]
        tables.append(Table("side by side: plain Neural Cleanse (300 steps/class, MAD>2) vs harden scan",
                            ["model", "truth", "NC index", "NC verdict", "NC steps", "NC s", "harden p", "harden verdict", "harden steps", "harden s", "speed-up"],
                            _baseline(picks, clean, stats)))
    emit(Report("harden.bench.scan/1", "harden scan benchmark (digits 3x32x32, CPU)", summary, tables), "text")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
