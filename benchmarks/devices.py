"""Every path that trains or inverts, on each device: the same models and data on the CPU and on CUDA.

The scan and purify benchmarks measure the classifier inversion, NFT and trigger unlearning on a
GPU; this one runs the remaining paths there too, side by side with the CPU, so a tensor left on
the wrong device shows as an error row and every path gets its GPU seconds and memory:

| path | what runs (library API, no MLflow) | result column |
|---|---|---|
| scan | artifact + inversion + sensitivity (`--train-data`) of the zoo's BadNets small_cnn, from a .pt2 | verdict, p, suspect; poisoned samples flagged (precision, recall) |
| scan inversion, 3 times | the inversion alone, three times in one process | the three p: whether a scan repeats on the device |
| purify <method> | nft, trigger-unlearn, and unlearn-relearn driven by the scan's saved separation | test ACC and BadNets ASR before → after |
| encoder scan | `--task encoder` on a backdoored projected encoder (benchmarks/encoders.py), from a .pt2 | p, trigger mask L1 |
| encoder purify | trigger-unlearn `--task encoder` on it | collapse of checkerboarded test images (mean pairwise cosine) before → after |
| sophon | SOPHON on digits → inverted digits (benchmarks/sophon.py's task), then the `quick` fine-tuning attack | original ACC before → after; attacker's best accuracy on it / on the unprotected model |
| watermark | embed a key, verify with it and with another key | key success before → after; verified with the key / another |

The models are built on the CPU once (the zoo's cache, or seconds of training here), so both
devices start from the same weights. Peak memory is the process's RSS on the CPU and the GPU
allocator's peak on CUDA. CUDA runs use deterministic algorithms, as harden's commands do
(`harden.runtime.reproducible`); `--nondeterministic` shows what the default kernels give.

    .venv/bin/python benchmarks/devices.py --devices cpu
    python benchmarks/devices.py                       # cpu and cuda when present
    python benchmarks/devices.py --devices cuda --paths classifier --nondeterministic
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from encoders import collapse, digit_split, projected_encoder  # noqa: E402
from foreign import as_npz, checkerboard  # noqa: E402
from purify import defender_files  # noqa: E402
from sophon import SPEC as SOPHON_SPEC  # noqa: E402
from sophon import source_model  # noqa: E402
from zoo import load_zoo, training_set, write_npz  # noqa: E402

from harden import progress  # noqa: E402
from harden.data import load_data, split  # noqa: E402
from harden.report import Report, Table, emit  # noqa: E402
from harden.runtime import device_label, measure, reproducible, resolve_device  # noqa: E402
from harden.sophon import InnerLoop, OuterConfig, embed, finetune_test, harden_model, verify  # noqa: E402
from harden.sophon.data import in_memory, take_per_class  # noqa: E402
from harden.training import TrainConfig  # noqa: E402

Row = Callable[[torch.device], str]


def _export(module: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(module.eval(), (torch.rand(2, *shape),), dynamic_shapes=({0: batch},)), str(path))
    return path


def classifier_rows(folder: Path) -> dict[str, Row]:
    """Scan, then each purification method, of the zoo's BadNets small_cnn (seed 0)."""
    from harden.purify import purify
    from harden.scan import scan

    entry = load_zoo(lambda e: e.arch == "small_cnn" and e.seed == 0 and (e.attack or "").startswith("grid_paste"), device="cpu")[0]
    _, test, clean_npz, test_npz = defender_files(entry.spec, 0.05, 0, folder)
    train = training_set(entry)
    train_npz = write_npz(train, folder / "train.npz")
    poisoned = set(train.poisoned.tolist())
    separations: dict[str, str] = {}

    def scan_row(device: torch.device) -> str:
        workdir = folder / f"scan-{device.type}"
        result = scan(str(entry.path), data=str(clean_npz), train_data=str(train_npz), checks=["artifact", "inversion", "sensitivity"],
                      device=device, load_options={"arch": entry.arch}, workdir=workdir)
        sensitivity = next(c for c in result.checks if c.name == "sensitivity")
        separations[device.type] = sensitivity.details["separation_path"]
        flagged = set(json.loads(Path(separations[device.type]).read_text())["poisoned"])
        hits = len(flagged & poisoned)
        return (f"{result.verdict}, p {result.p_backdoor:.3f}, suspect {result.suspect_classes[:1]} (true {entry.target}); "
                f"{len(flagged)} flagged, precision {hits / max(len(flagged), 1):.2f}, recall {hits / len(poisoned):.2f}")

    def purify_row(method: str) -> Row:
        def run(device: torch.device) -> str:
            extra = {"train_data": str(train_npz), "separation": separations.get(device.type)} if method == "unlearn-relearn" else {}
            result = purify(str(entry.path), str(clean_npz), method=method, trigger=entry.attack, target=entry.target,
                            test_data=str(test_npz), load_options={"arch": entry.arch}, device=device, **extra)
            b, a = result.before, result.after
            return (f"ACC {b.test_accuracy:.3f} → {a.test_accuracy:.3f}, ASR {b.test_known_asr:.3f} → {a.test_known_asr:.3f}, "
                    f"guardrail {'passed' if result.passed else 'tripped'}")
        return run

    def repeat_row(device: torch.device) -> str:
        p = [scan(str(entry.path), data=str(clean_npz), checks=["inversion"], device=device, load_options={"arch": entry.arch},
                  workdir=folder / f"repeat-{device.type}-{i}").p_backdoor for i in range(3)]
        return f"p {', '.join(f'{v:.4f}' for v in p)}: {'the same' if len(set(p)) == 1 else 'they differ'}"

    rows = {"scan (artifact, inversion, sensitivity)": scan_row, "scan inversion, 3 times": repeat_row}
    rows.update({f"purify {m}": purify_row(m) for m in ("nft", "trigger-unlearn", "unlearn-relearn")})
    return rows


def encoder_rows(folder: Path) -> dict[str, Row]:
    """RECEIVE-style scan and trigger unlearning of a backdoored projected encoder (seed 0)."""
    from harden.purify import purify
    from harden.scan import scan

    encoder, _ = projected_encoder(0, backdoored=True)
    _, (x_test, y_test) = digit_split(0)
    shape = tuple(x_test.shape[1:])
    path = _export(encoder, shape, folder / "encoder.pt2")
    clean_npz = as_npz(folder / "encoder-clean.npz", x_test[:300], y_test[:300])
    test_npz = as_npz(folder / "encoder-test.npz", x_test[300:], y_test[300:])
    stamped = checkerboard(4, 1)(x_test[300:400])  # seed 0's trigger

    def scan_row(device: torch.device) -> str:
        result = scan(str(path), data=str(clean_npz), task="encoder", checks=["encoder"], device=device, workdir=folder / f"enc-{device.type}")
        details = result.checks[0].details
        return f"{result.verdict}, p {result.p_backdoor:.3f}, mask L1 {details['mask_norm']:.1f} (clean-baseline similarity {details['baseline_similarity']:.2f})"

    def purify_row(device: torch.device) -> str:
        result = purify(str(path), str(clean_npz), method="trigger-unlearn", task="encoder", test_data=str(test_npz), max_acc_drop=5.0, device=device)
        after = result.model.net.cpu()
        return (f"collapse {collapse(encoder, stamped):.2f} → {collapse(after, stamped):.2f}; "
                f"kNN ACC {result.before.test_accuracy:.3f} → {result.after.test_accuracy:.3f}")

    return {"encoder scan": scan_row, "encoder purify trigger-unlearn": purify_row}


def sophon_rows(loops: int) -> dict[str, Row]:
    """SOPHON and the watermark on benchmarks/sophon.py's task, at `loops` outer loops."""
    original = in_memory(load_data("digits", SOPHON_SPEC))
    restricted = in_memory(load_data("digits-inverted", SOPHON_SPEC))
    train, test = split(original, [0.7, 0.3], seed=0)
    defender, attacker = split(restricted, [0.5, 0.5], seed=1)
    attack_train = take_per_class(attacker, 5, 0)
    attack_test = attacker.subset(np.setdiff1d(np.arange(len(attacker)), attack_train.indices))
    source = source_model(train, 0).cpu()
    config = OuterConfig(InnerLoop(steps=20), loops=loops, eval_every=max(loops // 5, 1), seed=0)

    def sophon_row(device: torch.device) -> str:
        result = harden_model(copy.deepcopy(source), train, test, defender, config=config, device=device)
        suite = finetune_test(result.model, attack_train, attack_test, budget="quick", baseline=source, scratch=False, device=device)
        return (f"original ACC {result.acc_before:.3f} → {result.acc_after:.3f}; attacker's best "
                f"{suite.best_attack_accuracy:.3f} (unprotected {suite.baseline_accuracy:.3f})")

    def watermark_row(device: torch.device) -> str:
        key = "devices-benchmark-key"
        result = embed(copy.deepcopy(source), train, test, key, num_classes=10, config=config, pretrain=TrainConfig(epochs=4, lr=3e-3), device=device)
        own, other = (verify(result.model, test, k, num_classes=10, device=device).present for k in (key, "another-owner-key"))
        return f"key success {result.success_before:.2f} → {result.success_after:.2f}; verified with the key: {own}, with another: {other}"

    return {"sophon + finetune-test quick": sophon_row, "watermark embed + verify": watermark_row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu", help="comma-separated: cpu, cuda[:N]")
    parser.add_argument("--paths", default="classifier,encoder,sophon", help="which groups of rows")
    parser.add_argument("--sophon-loops", type=int, default=40, help="outer loops of the SOPHON and watermark rows")
    parser.add_argument("--nondeterministic", action="store_true", help="leave CUDA's default (faster-kernel) algorithms, as harden did before")
    args = parser.parse_args()
    progress.set_enabled(False)
    devices = [resolve_device(d) for d in args.devices.split(",")]
    for device in devices if not args.nondeterministic else []:
        reproducible(device)  # as every harden command does
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        groups = {"classifier": lambda: classifier_rows(folder), "encoder": lambda: encoder_rows(folder), "sophon": lambda: sophon_rows(args.sophon_loops)}
        for group in args.paths.split(","):
            for name, run in groups[group]().items():
                for device in devices:  # the CPU first: its separation is what the CPU unlearn-relearn consumes
                    with measure(device) as cost:
                        try:
                            outcome = run(device)
                        except Exception as error:  # one failing path must not hide the others
                            traceback.print_exc()
                            outcome = f"ERROR {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    rows.append([name, device.type, outcome, round(cost.duration_s, 1), round(cost.peak_memory_mb)])
                    print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    title = "Each path on each device: " + "; ".join(f"{d} = {device_label(d)}" for d in devices)
    emit(Report("harden.bench.devices/1", title, {"rows": rows},
                [Table("Paths", ["path", "device", "result", "seconds", "peak MB"], rows)]), "text")


if __name__ == "__main__":
    main()
