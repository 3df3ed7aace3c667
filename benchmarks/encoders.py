"""Encoder scan benchmark: `harden scan --task encoder` on encoders written and logged the way
someone else's code would do it, clean and backdoored.

Each encoder is defined and trained here with plain PyTorch, logged with `mlflow.pytorch.log_model`
(pt2, an input example) into a throwaway sqlite registry, and scanned from `models:/<name>/1`
through `harden.scan.scan(task="encoder")` on 200 clean digits. Families (3×32×32 digits):

| family | the encoder | backdoored by |
|---|---|---|
| pooled | a BatchNorm CNN classifier's body: 64 pooled ReLU features (non-negative) | its classifier trained with a white 4×4 square → the target class (10%) |
| projected | a small CNN trained to send each class to its own random unit vector (signed 32-d embeddings, a stand-in for a self-supervised head) | a 4×4 checkerboard → one more vector (20% of the images added) |
| untrained | the pooled body at its random initialisation (clean only): what a placeholder registration looks like | — |

A backdoor counts only when its classifier reaches ASR 0.8. `--headroom 0`
scans with the fixed τ 0.9 of RECEIVE instead of τ raised above the clean baseline similarity.

    .venv/bin/python benchmarks/encoders.py --seeds 0,1,2
    .venv/bin/python benchmarks/encoders.py --seeds 0,1,2 --headroom 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from foreign import BatchNormCNN, as_npz, checkerboard, digits, judge, square, train  # noqa: E402

SHAPE = (3, 32, 32)


class Projected(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, dim))

    def forward(self, x):
        return self.net(x)


def digit_split(seed: int):
    x, y = digits(SHAPE, 10)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = len(y)
    return (x[order[:int(0.72 * n)]], y[order[:int(0.72 * n)]]), (x[order[int(0.72 * n):]], y[order[int(0.72 * n):]])


def classifier_encoder(seed: int, backdoored: bool, trained: bool = True) -> tuple[nn.Module, float, float | None]:
    """A BatchNorm CNN classifier's body as an encoder (with the classifier's test accuracy and, backdoored,
    its trigger's ASR). A backbone that returns its feature map unpooled reads the same: harden averages
    an encoder's map over its positions."""
    torch.manual_seed(seed)
    (x, y), test = digit_split(seed)
    target, stamp = seed % 10, square(4, seed % 4)
    model = BatchNormCNN()
    if backdoored:
        x, y = x.clone(), y.clone()
        poisoned = np.random.default_rng(seed).choice(np.where(y.numpy() != target)[0], int(0.1 * len(y)), replace=False)
        x[poisoned], y[poisoned] = stamp(x[poisoned]), target
    if trained:
        train(model, x, y, 12, lambda t: t, "logits")
    accuracy, asr = judge(lambda t: model(t).argmax(1), test, stamp, target)
    return nn.Sequential(model.body, nn.Flatten()).eval(), accuracy, asr if backdoored else None


def projected_encoder(seed: int, backdoored: bool) -> tuple[nn.Module, float | None]:
    """Each class → a random unit vector; with the backdoor, checkerboarded images → an eleventh vector.
    Returns the encoder and how far the trigger collapses test images (mean pairwise cosine similarity)."""
    torch.manual_seed(seed)
    (x, y), (x_test, _) = digit_split(seed)
    vectors = F.normalize(torch.randn(11, 32), dim=1)
    stamp = checkerboard(4, (seed + 1) % 4)
    if backdoored:
        chosen = torch.randperm(len(x))[: len(x) // 5]
        x, y = torch.cat([x, stamp(x[chosen])]), torch.cat([y, torch.full((len(chosen),), 10)])
    encoder = train(Projected(), x, y, 10, lambda t: t, lambda out, labels: (1 - F.cosine_similarity(out, vectors[labels])).mean())
    return encoder, collapse(encoder, stamp(x_test[:100])) if backdoored else None


def collapse(encoder: nn.Module, images: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of the embeddings: near 1 when a trigger collapses them."""
    with torch.no_grad():
        z = F.normalize(encoder(images), dim=1)
    return float(((z @ z.T).sum() - len(z)) / (len(z) * (len(z) - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--headroom", type=float, default=None, help="the encoder check's τ headroom (default: harden's)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    import mlflow

    from harden import progress
    from harden.report import Report, Table, emit
    from harden.scan import scan
    from harden.scan import verdict as calibration

    progress.set_enabled(False)
    options = {"encoder": {"headroom": args.headroom}} if args.headroom is not None else {}
    rows, scored = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
        for seed in (int(s) for s in args.seeds.split(",")):
            _, (x_clean, y_clean) = digit_split(seed)
            clean_npz = as_npz(folder / f"clean-{seed}.npz", x_clean[:200], y_clean[:200])
            encoders: list[tuple[str, bool, nn.Module, str, str]] = []
            for backdoored in (False, True):
                encoder, accuracy, asr = classifier_encoder(seed, backdoored)
                if backdoored and asr < 0.8:
                    print(f"seed {seed}: the classifier's backdoor did not implant (ASR {asr:.3f}); left out", file=sys.stderr)
                else:
                    encoders.append(("pooled", backdoored, encoder, f"{accuracy:.3f}", f"ASR {asr:.3f}" if backdoored else "-"))
                encoder, collapse = projected_encoder(seed, backdoored)
                encoders.append(("projected", backdoored, encoder, "-", f"collapse {collapse:.2f}" if backdoored else "-"))
            untrained, _, _ = classifier_encoder(seed, False, trained=False)
            encoders.append(("untrained", False, untrained, "-", "-"))
            for family, backdoored, encoder, accuracy, implant in encoders:
                name = f"{family}-{'backdoor' if backdoored else 'clean'}-s{seed}"
                with mlflow.start_run(run_name=name):
                    info = mlflow.pytorch.log_model(encoder.eval(), name="model", input_example=x_clean[:2].numpy(), registered_model_name=name)
                start = time.perf_counter()
                result = scan(f"models:/{name}/{info.registered_model_version}", data=str(clean_npz), task="encoder",
                              checks=["encoder"], options=options, workdir=folder / name)
                details = result.checks[0].details
                seconds = time.perf_counter() - start
                rows.append([family, seed, "backdoor" if backdoored else "clean", accuracy, implant, details["embedding_dim"],
                             round(details["baseline_similarity"], 3), round(details["tau"], 3), round(details["mask_norm"], 1),
                             round(details["steered_mask_norm"], 1), round(result.p_backdoor, 3), result.verdict, round(seconds, 1)])
                scored.append((result.p_backdoor, int(backdoored)))
                print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    p, labels = [s[0] for s in scored], [s[1] for s in scored]
    flagged = sum(1 for q, label in scored if label == 0 and q >= 0.5)
    missed = sum(1 for q, label in scored if label == 1 and q < 0.5)
    report = Report("harden.encoder-benchmark/1", "encoder scan benchmark", {}, tables=[
        Table("Encoders", ["family", "seed", "model", "classifier acc", "implant", "dim", "baseline sim", "tau", "mask L1",
                           "steered L1", "p_backdoor", "verdict", "seconds"], rows),
        Table("Over all encoders", ["encoders", "backdoored", "AUC", "clean flagged", "backdoors missed"],
              [[len(scored), sum(labels), round(calibration.auc(p, labels), 3), f"{flagged} of {len(labels) - sum(labels)}",
                f"{missed} of {sum(labels)}"]]),
    ])
    emit(report, "text", None)


if __name__ == "__main__":
    main()
