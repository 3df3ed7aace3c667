"""A fine-tune-resistant ownership watermark (the "irreversible backdoor" idea, algorithms.md §7).

A secret key determines a trigger (a seeded random patch) and a target class. `embed`
implants it by training on stamped batches, then runs the shared MAML loop with the opposite goal to SOPHON: after simulated clean
fine-tuning the triggered images must still go to the target; the original-domain
steps train on clean images, key-triggered images relabelled to the target, and
images stamped with fresh random decoy patches that keep their label (so the model
answers this key, not any patch). `verify` measures the success rate on non-target
images and a one-sided binomial p-value against chance, where chance is the larger of
1/C and the rate that decoy patches derived from the key reach the target.

The key never leaves the process: runs and tags only ever see a salted SHA-256
commitment (and its salt), from which neither the key nor the trigger follows.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.stats import binom
from torch import nn

from harden.attacks.triggers import Trigger, make_trigger
from harden.data.pipeline import LabelledDataset, make_loader
from harden.errors import HardenError
from harden.evaluation import evaluate
from harden.sophon.maml import BatchLoss, LoopHook, OuterConfig, OuterResult, train_outer
from harden.training import TrainConfig, fit

MIN_KEY_LENGTH = 8
_DOMAIN = b"harden.watermark/1"


def _digest(key: str, purpose: str) -> bytes:
    if len(key) < MIN_KEY_LENGTH:
        raise HardenError(f"the watermark key must be at least {MIN_KEY_LENGTH} characters")
    return hashlib.sha256(_DOMAIN + b"\0" + purpose.encode() + b"\0" + key.encode()).digest()


@dataclass(frozen=True)
class WatermarkKey:
    """What a secret key determines. Holds key material: never log it."""

    trigger: Trigger
    target: int
    decoy_seed: int

    @classmethod
    def derive(cls, key: str, num_classes: int) -> "WatermarkKey":
        digest = _digest(key, "trigger")
        seed = int.from_bytes(digest[:8], "big") % 2**63
        return cls(make_trigger(f"random_patch:seed={seed}"), int.from_bytes(digest[8:12], "big") % num_classes,
                   int.from_bytes(_digest(key, "decoys")[:8], "big") % 2**63)

    def decoys(self, count: int) -> list[Trigger]:
        """Patches of the same kind from seeds the key implies, for the chance level of verification."""
        generator = torch.Generator().manual_seed(self.decoy_seed)
        return [make_trigger(f"random_patch:seed={int(s)}") for s in torch.randint(0, 2**62, (count,), generator=generator)]


def commitment(key: str, salt: str | None = None) -> tuple[str, str]:
    """(salt, SHA-256(salt ‖ key)): proves later which key was embedded without revealing it."""
    salt = salt or secrets.token_hex(16)
    _digest(key, "commitment")  # length check
    return salt, hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()


def _stamp_batch(images: torch.Tensor, labels: torch.Tensor, mark: WatermarkKey, poison_rate: float, decoy_rate: float):
    """Key-triggered images relabelled to the target, decoy-stamped images with their own label."""
    images, labels = images.clone(), labels.clone()
    eligible = torch.nonzero(labels != mark.target).flatten()
    n_poison = int(round(len(labels) * poison_rate))
    n_decoy = int(round(len(labels) * decoy_rate))
    poison, decoy = eligible[:n_poison], eligible[n_poison:n_poison + n_decoy]
    if len(poison):
        images[poison] = mark.trigger(images[poison])
        labels[poison] = mark.target
    if len(decoy):
        fresh = make_trigger(f"random_patch:seed={int(torch.randint(0, 2**62, (1,)))}")
        images[decoy] = fresh(images[decoy])
    return images, labels


def retention_loss(mark: WatermarkKey) -> BatchLoss:
    """Query loss: triggered non-target images should still reach the target after fine-tuning."""

    def loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels != mark.target
        if not keep.any():
            return net(images[:1]).sum() * 0.0
        triggered = mark.trigger(images[keep])
        return F.cross_entropy(net(triggered), torch.full((len(triggered),), mark.target, device=images.device))

    return loss


@dataclass
class Verification:
    success_rate: float  # triggered non-target images classified as the target
    n: int
    chance: float  # max(1/C, best decoy rate)
    p_value: float
    present: bool
    alpha: float
    min_success: float

    def to_dict(self) -> dict:
        return {"success_rate": self.success_rate, "n": self.n, "chance": self.chance, "p_value": self.p_value,
                "present": self.present, "alpha": self.alpha, "min_success": self.min_success}


@torch.no_grad()
def _target_rate(net: nn.Module, data: LabelledDataset, trigger: Trigger, target: int, device) -> tuple[int, int]:
    hits = total = 0
    for images, labels in make_loader(data, 256):
        keep = labels != target
        if keep.any():
            predictions = net(trigger(images[keep].to(device))).argmax(1)
            hits += int((predictions == target).sum())
            total += int(keep.sum())
    return hits, total


@torch.no_grad()
def verify(model: nn.Module, data: LabelledDataset, key: str, *, num_classes: int, decoys: int = 8, alpha: float = 1e-3,
           min_success: float = 0.5, device: str | torch.device = "cpu") -> Verification:
    """Is the watermark of `key` in `model`? Present when p < alpha and success ≥ min_success."""
    mark = WatermarkKey.derive(key, num_classes)
    net = getattr(model, "module", model).to(device).eval()
    hits, n = _target_rate(net, data, mark.trigger, mark.target, device)
    if n == 0:
        raise HardenError("verification data has no images outside the watermark's target class")
    control = max((_target_rate(net, data, t, mark.target, device)[0] / n for t in mark.decoys(decoys)), default=0.0)
    chance = min(max(1.0 / num_classes, control), 1.0 - 1e-9)
    p_value = float(binom.sf(hits - 1, n, chance))
    rate = hits / n
    return Verification(rate, n, chance, p_value, p_value < alpha and rate >= min_success, alpha, min_success)


@dataclass
class WatermarkResult:
    model: nn.Module
    acc_before: float
    acc_after: float
    success_before: float
    success_after: float
    outer: OuterResult


def embed(
    model: nn.Module,
    data: LabelledDataset,
    eval_data: LabelledDataset,
    key: str,
    *,
    num_classes: int,
    finetune_data: LabelledDataset | None = None,
    config: OuterConfig | None = None,
    poison_rate: float = 0.2,
    decoy_rate: float = 0.2,
    pretrain: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    on_check: LoopHook | None = None,
) -> WatermarkResult:
    """Embed the key's watermark into `model` (a trainable copy; changed in place).

    Stage 1 (`pretrain`, default 5 epochs) implants the mapping by ordinary training on
    stamped batches; stage 2 is the MAML loop that makes it survive fine-tuning, its
    guard measured from the stage-1 model. `finetune_data` is what the simulated
    downstream fine-tuning trains on (default: `data`); `config.alpha = 0` skips the
    simulation and leaves plain poisoning (the baseline the method must beat).
    """
    if not (0.0 < poison_rate and 0.0 <= decoy_rate and poison_rate + decoy_rate < 1.0):
        raise HardenError("poison and decoy rates must be positive fractions summing to less than 1")
    mark = WatermarkKey.derive(key, num_classes)
    success = lambda: verify(model, eval_data, key, num_classes=num_classes, decoys=0, device=device).success_rate  # noqa: E731
    acc_before, success_before = evaluate(model, eval_data, device=device).accuracy, success()

    def original_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        stamped, targets = _stamp_batch(images, labels, mark, poison_rate, decoy_rate)
        return F.cross_entropy(net(stamped), targets)

    config = config or OuterConfig()
    fit(model, data, pretrain or TrainConfig(epochs=5, lr=config.lr, batch_size=config.batch_size, optimizer=config.optimizer, seed=config.seed),
        loss_fn=original_loss, device=device, description="implanting watermark")
    outer = train_outer(model, data, eval_data, finetune_data if finetune_data is not None else data, config,
                        query_loss=retention_loss(mark), original_loss=original_loss, device=device, on_check=on_check)
    return WatermarkResult(model, acc_before, evaluate(model, eval_data, device=device).accuracy, success_before, success(), outer)
