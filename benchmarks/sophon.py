"""SOPHON, the fine-tuning attack suite and the fine-tune-resistant watermark on digits → inverted digits.

Task (built in, nothing downloads): scikit-learn's digits at 1x16x16. Original domain
`digits` (70% train / 30% test); restricted domain `digits-inverted` (the same digits,
dark on white), split half for the defender and half for the attacker, who labels
only --per-class images per class and is tested on the rest. A small CNN
(small_cnn, width 16) trained on the original domain is the unprotected model.

Prints: original accuracy before/after SOPHON; per fine-tuning strategy of the
`standard` budget the attacker's best restricted accuracy on the protected model,
the unprotected model and training from scratch; wall time and peak memory; the
watermark's success after the standard fine-tuning attacks (vs the poisoning-only
baseline) and its false-verification rate on clean models and wrong keys.

    nice -n 5 .venv/bin/python benchmarks/sophon.py [--threads 1] [--loops 300]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from harden.data import load_data, split
from harden.models import InputSpec, create_model
from harden.report import Report, Table, emit
from harden.runtime import measure, seed_everything
from harden.sophon import InnerLoop, OuterConfig, harden_model
from harden.sophon.attack_suite import BUDGETS, finetune_test
from harden.sophon.data import in_memory, take_per_class
from harden.sophon.watermark import embed, verify
from harden.training import TrainConfig, fit

SPEC = InputSpec(1, 16, 16)


def source_model(train, seed: int) -> torch.nn.Module:
    seed_everything(seed)
    net = create_model("small_cnn", num_classes=10, in_channels=1, width=16)
    fit(net, train, TrainConfig(epochs=8, lr=3e-3, batch_size=64, seed=seed))
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--loops", type=int, default=300)
    parser.add_argument("--inner-steps", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss", default="kl-uniform")
    parser.add_argument("--per-class", type=int, default=5, help="attacker's labelled restricted images per class")
    parser.add_argument("--wm-loops", type=int, default=200)
    parser.add_argument("--wm-alpha", type=float, default=1.0)
    parser.add_argument("--wm-strategies", default="full,reinit-head,head-only", help="strategies the watermark's simulation samples")
    parser.add_argument("--wm-keys", type=int, default=3, help="watermark keys embedded (each its own patch and target)")
    parser.add_argument("--clean-models", type=int, default=5)
    parser.add_argument("--keys", type=int, default=40)
    parser.add_argument("--part", choices=("all", "sophon", "watermark"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    original = in_memory(load_data("digits", SPEC))
    restricted = in_memory(load_data("digits-inverted", SPEC))
    orig_train, orig_test = split(original, [0.7, 0.3], seed=args.seed)
    defender, attacker = split(restricted, [0.5, 0.5], seed=args.seed + 1)
    attack_train = take_per_class(attacker, args.per_class, args.seed)
    attack_test = attacker.subset(np.setdiff1d(np.arange(len(attacker)), attack_train.indices))
    source = source_model(orig_train, args.seed)
    budget = BUDGETS["standard"]

    tables = _sophon_tables(args, source, orig_train, orig_test, defender, attack_train, attack_test, budget) if args.part != "watermark" else []
    if args.part != "sophon":
        tables += _watermark_tables(args, source, orig_train, orig_test, budget)
    emit(Report("harden.bench.sophon/1", f"SOPHON / finetune-test / watermark benchmark (torch threads {torch.get_num_threads()})",
                {}, tables), "text")


def _sophon_tables(args, source, orig_train, orig_test, defender, attack_train, attack_test, budget) -> list[Table]:
    """SOPHON on the source model, then the standard attack grid on protected, unprotected and scratch."""
    config = OuterConfig(InnerLoop(steps=args.inner_steps), loops=args.loops, lr=args.lr, alpha=args.alpha, seed=args.seed)
    with measure(torch.device("cpu")) as cost:
        result = harden_model(copy.deepcopy(source), orig_train, orig_test, defender, loss=args.loss, config=config)
    start = time.perf_counter()
    suite = finetune_test(result.model, attack_train, attack_test, budget=budget, baseline=source, seed=args.seed)
    suite_s = time.perf_counter() - start
    rows = [[s, suite.best_accuracy("model", s), suite.best_accuracy("baseline", s), suite.scratch_accuracy] for s in budget.strategies]
    best, scratch, baseline = suite.best_attack_accuracy, suite.scratch_accuracy, suite.baseline_accuracy
    return [
        Table("SOPHON: original domain (digits test, n=%d)" % len(orig_test), ["metric", "value"], [
            ["accuracy before", round(result.acc_before, 4)], ["accuracy after", round(result.acc_after, 4)],
            ["drop (points)", round(100 * result.acc_drop, 2)], ["outer loops / rollbacks", f"{result.outer.loops_done} / {result.outer.rollbacks}"],
            ["hardening wall time (s)", cost.duration_s], ["peak RSS (MB)", cost.peak_memory_mb],
            ["attack suite wall time (s)", round(suite_s, 1)]]),
        Table(f"Restricted domain (digits-inverted, {args.per_class}/class train, n_test={len(attack_test)}): attacker's best accuracy, "
              f"budget standard ({len(budget.recipes)} recipes x {budget.epochs} epochs)",
              ["strategy", "protected", "unprotected", "scratch"], [[r[0], *[round(v, 4) for v in r[1:]]] for r in rows]),
        Table("Targets", ["target", "value", "met"], [
            ["original ACC drop <= 3 points", round(100 * result.acc_drop, 2), result.acc_drop <= 0.03],
            ["best attack on protected <= scratch + 5 points", round(100 * (best - scratch), 2), best - scratch <= 0.05],
            ["unprotected beats scratch by >= 20 points", round(100 * (baseline - scratch), 2), baseline - scratch >= 0.20],
            ["hardening run < 600 s", cost.duration_s, cost.duration_s < 600]]),
    ]


def _watermark_tables(args, source, orig_train, orig_test, budget) -> list[Table]:
    """Watermarks of --wm-keys keys embedded in the source model; the attacker fine-tunes on clean original-domain data.

    The key decides the patch's pattern, position and target class, and survival varies
    a lot with them, so every figure is over all keys × recipes, never one lucky key.
    """
    keys_embedded = [f"benchmark-owner-key-{k}" for k in range(args.wm_keys)]
    ft_data, verify_data = split(orig_test, [0.5, 0.5], seed=args.seed + 2)
    check = lambda net, k: verify(net, verify_data, k, num_classes=10)  # noqa: E731
    rows, timings, marked_models = [], [], {}
    for name, alpha in (("watermark (MAML)", args.wm_alpha), ("poisoning only (alpha=0)", 0.0)):
        inner = InnerLoop(steps=args.inner_steps, strategies=tuple(args.wm_strategies.split(",")))
        config = OuterConfig(inner, loops=args.wm_loops, lr=args.lr, alpha=alpha, seed=args.seed)
        before, runs = [], []
        for key in keys_embedded:
            with measure(torch.device("cpu")) as cost:
                marked = embed(copy.deepcopy(source), orig_train, orig_test, key, num_classes=10, config=config).model
            marked_models.setdefault(name, marked)
            timings.append([name, key, cost.duration_s])
            before.append(check(marked, key).success_rate)
            runs += finetune_test(marked, ft_data, verify_data, budget=budget, scratch=False, seed=args.seed,
                                  probe=lambda net, k=key: check(net, k).to_dict()).runs
        for strategy in budget.strategies:
            mine = [r for r in runs if r.strategy == strategy]
            success = [r.probe["success_rate"] for r in mine]
            rows.append([name, strategy, round(min(before), 4), round(min(success), 4), round(float(np.mean(success)), 4),
                         f"{sum(r.probe['present'] for r in mine)}/{len(mine)}", round(max(r.accuracy[-1] for r in mine), 4)])
    clean = [source] + [source_model(orig_train, args.seed + 100 + i) for i in range(args.clean_models - 1)]
    keys = [f"never-embedded-key-{i:04d}" for i in range(args.keys)]
    clean_hits = sum(check(net, k).present for net in clean for k in keys)
    wrong_hits = sum(check(marked_models["watermark (MAML)"], k).present for k in keys)
    return [
        Table(f"Watermark success after standard fine-tuning attacks ({len(keys_embedded)} keys; clean digits, {len(ft_data)} images, "
              f"{budget.epochs} epochs, {len(budget.recipes)} recipes per strategy and key; verified on {len(verify_data)} images)",
              ["model", "attack strategy", "min success before", "min success after", "mean success after", "verified after", "attacker clean acc"],
              rows),
        Table("Watermark embedding wall time (s)", ["model", "key", "seconds"], timings),
        Table("False verification (alpha 1e-3, min success 0.5, 8 decoys)", ["models", "trials", "false positives", "rate"], [
            [f"{len(clean)} clean models x {len(keys)} keys", len(clean) * len(keys), clean_hits, round(clean_hits / (len(clean) * len(keys)), 4)],
            [f"model watermarked with key 0 x {len(keys)} wrong keys", len(keys), wrong_hits, round(wrong_hits / len(keys), 4)]]),
    ]


if __name__ == "__main__":
    main()
