"""Why the watermark does not survive a re-initialised head: two measurements on the sophon benchmark's task.

benchmarks/sophon.py shows the key's trigger → target mapping surviving head-kept and
head-only fine-tuning but not full fine-tuning with a re-initialised head. This script
measures two ways around that, both on digits with the attacker's `standard` recipes:

1. Feature injection, an upper bound for watermarks that write a fixed vector into the
   features the head reads: fine-tune an unprotected model with a re-initialised head,
   then add s × (class t's feature centroid − the mean centroid), taken *before*
   fine-tuning, to the fine-tuned features of images of other classes. If even a perfect
   injection of that direction does not reach class t through the new head, no
   trigger that only reproduces pre-fine-tuning target features can.
2. Head-agnostic verification: a new head's class numbering is the attacker's, so
   verification could ask only that the key's trigger sends images to *one* class,
   whichever it is. Measured on a watermarked model after the attack: the share of
   triggered images in their most common class, for the key and for decoy patches
   (the chance level such a test would have to beat).

    nice -n 5 .venv/bin/python benchmarks/watermark_limits.py [--loops 200]
"""

from __future__ import annotations

import argparse
import copy

import torch
from sophon import SPEC, source_model

from harden.data import load_data, split
from harden.report import Report, Table, emit
from harden.runtime import seed_everything
from harden.sophon import InnerLoop, OuterConfig
from harden.sophon.attack_suite import BUDGETS, finetune
from harden.sophon.data import in_memory
from harden.sophon.heads import find_head
from harden.sophon.strategies import STRATEGIES
from harden.sophon.watermark import WatermarkKey, embed, verify

SCALES = (1, 2, 4, 8)


def _head(net: torch.nn.Module) -> torch.nn.Module:
    """The module holding the head's weight (`find_head` returns parameters)."""
    weight = find_head(net)[0]
    return next(m for m in net.modules() if getattr(m, "weight", None) is weight)


@torch.no_grad()
def _features(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the head reads (the input of the last linear layer), in eval mode."""
    box = {}
    hook = _head(net).register_forward_pre_hook(lambda _, inputs: box.setdefault("features", inputs[0]))
    net.eval()(images)
    hook.remove()
    return box["features"]


def _tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    loaded = in_memory(data)
    return loaded.images, torch.as_tensor(loaded.labels)


def _attacked(net: torch.nn.Module, recipe, ft_data, test_data, seed: int) -> torch.nn.Module:
    """A copy of `net` after the attacker's re-initialised-head fine-tuning with `recipe`."""
    attacked = copy.deepcopy(net)
    budget = BUDGETS["standard"]
    finetune(attacked, STRATEGIES["reinit-head"], recipe, budget.epochs, budget.batch_size, ft_data, test_data, seed=seed)
    return attacked.eval()


def _injection_rows(source, ft_data, test_data, seed: int) -> list[list]:
    images, labels = _tensors(test_data)
    before = _features(source, images)
    centroids = torch.stack([before[labels == c].mean(0) for c in range(10)])
    directions = centroids - centroids.mean(0)
    rows = []
    for recipe in BUDGETS["standard"].recipes:
        attacked = _attacked(source, recipe, ft_data, test_data, seed)
        after = _features(attacked, images)
        head = _head(attacked)
        for scale in SCALES:
            with torch.no_grad():
                rates = [float((head(after[labels != t] + scale * directions[t]).argmax(1) == t).float().mean()) for t in range(10)]
            rows.append([f"{recipe.optimizer} lr {recipe.lr:g}", scale, round(min(rates), 3), round(sum(rates) / 10, 3)])
    return rows


@torch.no_grad()
def _modal_share(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, trigger) -> tuple[int, float]:
    """The most common class of the triggered images and the share of other classes' images sent there."""
    predictions = net(trigger(images)).argmax(1)
    modal = int(torch.bincount(predictions, minlength=10).argmax())
    return modal, float((predictions[labels != modal] == modal).float().mean())


def _agreement_rows(source, orig_train, orig_test, ft_data, test_data, loops: int, seed: int) -> list[list]:
    key = "benchmark-owner-key-0"
    mark = WatermarkKey.derive(key, 10)
    images, labels = _tensors(test_data)
    config = OuterConfig(InnerLoop(steps=40), loops=loops, lr=1e-3, seed=seed)
    marked = embed(copy.deepcopy(source), orig_train, orig_test, key, num_classes=10, config=config).model
    rows = []
    for recipe in BUDGETS["standard"].recipes:
        attacked = _attacked(marked, recipe, ft_data, test_data, seed)
        modal, share = _modal_share(attacked, images, labels, mark.trigger)
        decoys = [_modal_share(attacked, images, labels, decoy)[1] for decoy in mark.decoys(8)]
        target = verify(attacked, test_data, key, num_classes=10, decoys=0).success_rate
        rows.append([f"{recipe.optimizer} lr {recipe.lr:g}", round(target, 3), modal, round(share, 3), round(max(decoys), 3)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, default=200, help="MAML loops of the watermark embedding (part 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    seed_everything(args.seed)
    original = in_memory(load_data("digits", SPEC))
    orig_train, orig_test = split(original, [0.7, 0.3], seed=args.seed)
    ft_data, verify_data = split(orig_test, [0.5, 0.5], seed=args.seed + 2)
    source = source_model(orig_train, args.seed)
    tables = [
        Table("1. Re-initialised head: pre-fine-tuning class direction injected into the fine-tuned features "
              f"(share of other classes' images sent to the class; {len(verify_data)} images)",
              ["attacker's recipe", "scale s", "worst class", "mean over classes"],
              _injection_rows(source, ft_data, verify_data, args.seed)),
        Table("2. Watermarked model (key 0) after re-initialised-head fine-tuning: target rate, and the share in the most common class",
              ["attacker's recipe", "key → target", "key's modal class", "key: modal share", "best of 8 decoys: modal share"],
              _agreement_rows(source, orig_train, orig_test, ft_data, verify_data, args.loops, args.seed)),
    ]
    emit(Report("harden.bench.watermark-limits/1", "Watermark under a re-initialised head: two limits", {}, tables), "text")


if __name__ == "__main__":
    main()
