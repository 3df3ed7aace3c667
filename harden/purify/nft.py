"""`nft`: neural mask fine-tuning, with masks folded back into the weights at the end.

Multiplicative masks on the weights, found without knowing the architecture: a probe
forward pass under a dispatch mode records which parameters feed which operators, in
execution order. That works the same for registry modules, pickled modules and pt2
GraphModules. Masks are applied by re-parameterising those weights
(`functional_call`), so the network itself is never edited, and folding them in
(γ' = γ⊙m for normalisation layers, W' = m⊙W, b' = m⊙b for conv/linear gates) yields the
plain architecture with no extra parameters. "Normalisation layers" are BatchNorm, as
published, and GroupNorm and LayerNorm, whose per-channel scale γ plays the same part in
networks without BatchNorm (the README's outside model: test accuracy 0.905 with conv/linear
masks only, 0.930 with its GroupNorm layers masked too; ASR 0.000 both ways).

Choices beyond the published method, each an option. The defaults were measured with
benchmarks/purify.py on the zoo's BadNets, Blend and SIG models: one mask per BatchNorm
channel (depth bounds, 30% stamped before mixing) left 0.06–0.65 ASR on them.
- `granularity`: `weight` (default) gives every conv/linear weight its own mask (normalisation
  layers stay per channel), as adversarial weight masking does; `channel` (published) is one
  mask per output channel. A channel mask cannot switch off a patch whose detectors also
  see digits; a weight mask can reshape the detector, and it still folds into W' = m⊙W.
- `placement`: `bn+conv` (default) masks normalisation γ and conv/linear weights; `auto` masks
  normalisation γ when the model has normalisation layers and otherwise conv/linear; `bn`
  (normalisation layers only), `conv`. The classifier head is never masked.
- `bounds`: `none` (default) allows masks in [0, 1]; `index` is the reference (layer k's
  bound 0.8·e^(−0.5k), which keeps a shallow network's first layers above 0.11); `depth`
  spreads that schedule over the network's own depth as if it had ResNet-18's 19 layers.
- `trigger_fraction`: share of each MixUp batch stamped with the reversed triggers, true
  labels (default 0.5); 0 gives the published, trigger-free NFT. The triggers are stamped
  after mixing, so the masks learn to ignore them at full strength, not at the weight λ.
- `refresh_every`: every N optimiser steps (default 30) the bounded additive triggers are
  re-optimised against the masked network (`TriggerChaser`, shared with trigger-unlearn),
  so the masks chase what is left of a full-image backdoor; 0 never.
- `epsilon`: bound of the additive triggers NFT stamps (default 0.15). The reversal finds them
  at 0.1; the chaser re-bounds them once at the start, and NFT unlearns those. Masks that learn
  to ignore a δ of 0.1 can still pass a stronger full-image signal: the zoo's small-CNN SIG s1
  backdoor (a ±40/255 ≈ 0.157 sinusoid) kept 0.10–0.31 ASR on every draw of the clean set at 0.1.
  The guardrail and checkpoint selection keep measuring the reversal's own 0.1 triggers.
- `mixup_alpha`: MixUp's λ ~ Beta(α, α). The reference draws λ uniformly (α = 1); the
  default 0.2 keeps most batches close to one image. On the zoo's 12 BadNets/Blend/SIG
  models it took the runs that met the target (ASR ≤ 3%, ≤ 2 points of accuracy lost)
  from 5 to 10, and 400 steps then did as well as 600; 0 turns MixUp off.
- `anchor`: loss weight of the unstamped images of the reversed triggers' target classes
  (default 2; 1 weighs every image alike, as published). Every stamped image teaches "this
  pattern does not mean class t", which pulls class t's logit down on every input, and a
  shrink-only mask pays for the unlearning with the target class's own recall: on the zoo's
  small-CNN BadNets s1 model, all 7 test errors after NFT were digits of the target class
  (2 with `anchor=2`). The target class's clean images, a tenth of each batch, are the only
  counterweight.
- `bn_mode`: `freeze` (default) keeps the BatchNorm statistics the model was trained with;
  `update` re-estimates them on the MixUp batches as the reference does (in a pt2 graph too,
  through its BatchNorm operators' training flag: `PixelModel.train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from harden.errors import HardenError
from harden.models.wrappers import PixelModel
from harden.purify.base import BestCheckpoint, Method, MethodOutput, PurifyContext, one_of, register_method
from harden.purify.triggers import TriggerChaser, stamp_fraction
from harden.training import TrainConfig, fit

_ATEN = torch.ops.aten
# operator → (site kind, argument index of the weight, of the bias or None)
_SITE_OPS = {
    _ATEN.native_batch_norm: ("norm", 1, 2),
    _ATEN._native_batch_norm_legit: ("norm", 1, 2),
    _ATEN._native_batch_norm_legit_no_training: ("norm", 1, 2),
    _ATEN.cudnn_batch_norm: ("norm", 1, 2),
    _ATEN._batch_norm_with_update: ("norm", 1, 2),
    _ATEN._batch_norm_no_update: ("norm", 1, 2),
    _ATEN.native_group_norm: ("norm", 1, 2),
    _ATEN.native_layer_norm: ("norm", 2, 3),
    _ATEN.convolution: ("conv", 1, 2),
    _ATEN.addmm: ("linear", 2, 0),
    _ATEN.mm: ("linear", 1, None),  # a linear layer without bias
}
_REFERENCE_DEPTH = 19  # masked BatchNorm layers of the reference ResNet-18
PLACEMENTS = ("auto", "bn", "conv", "bn+conv")
BOUNDS = ("depth", "index", "none")
GRANULARITIES = ("channel", "weight")


@dataclass(frozen=True)
class MaskSite:
    """A parameter whose output channels get one mask each."""

    kind: str  # norm (BatchNorm, GroupNorm, LayerNorm γ) | conv | linear
    weight: str
    bias: str | None
    channels: int


class _SiteRecorder(TorchDispatchMode):
    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.calls: list[tuple[str, str, str | None]] = []

    def _name(self, value) -> str | None:
        if isinstance(value, torch.Tensor):
            return self.names.get(value.untyped_storage().data_ptr())
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        entry = _SITE_OPS.get(func.overloadpacket)
        if entry is not None:
            kind, weight_at, bias_at = entry
            weight = self._name(args[weight_at]) if len(args) > weight_at else None
            if weight is not None:
                bias = self._name(args[bias_at]) if bias_at is not None and len(args) > bias_at else None
                self.calls.append((kind, weight, bias))
        return func(*args, **(kwargs or {}))


def find_mask_sites(model: PixelModel, example: torch.Tensor, placement: str = "auto") -> list[MaskSite]:
    """Parameters of `model.net` to mask, in execution order; the last linear layer (the head) is left out."""
    if placement not in PLACEMENTS:
        raise HardenError(f"NFT placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
    params = dict(model.net.named_parameters())
    recorder = _SiteRecorder({p.untyped_storage().data_ptr(): name for name, p in params.items()})
    with torch.no_grad(), recorder:
        model(example)
    sites, seen = [], set()
    for kind, weight, bias in recorder.calls:
        if weight in seen:
            continue
        seen.add(weight)
        sites.append(MaskSite(kind, weight, bias, int(params[weight].shape[0])))
    linear = [i for i, s in enumerate(sites) if s.kind == "linear"]
    if linear:
        sites.pop(linear[-1])
    has_norm = any(s.kind == "norm" for s in sites)
    wanted = {"auto": {"norm"} if has_norm else {"conv", "linear"}, "bn": {"norm"}, "conv": {"conv", "linear"},
              "bn+conv": {"norm", "conv", "linear"}}[placement]
    chosen = [s for s in sites if s.kind in wanted]
    if not chosen:
        raise HardenError(f"NFT found no layers to mask with placement {placement!r} (model has: {sorted({s.kind for s in sites}) or 'none'})")
    return chosen


def lower_bounds(count: int, rule: str) -> list[float]:
    """Per-layer lower bound of the masks, shallowest layer first."""
    if rule == "none":
        return [0.0] * count
    scale = _REFERENCE_DEPTH / count if rule == "depth" else 1.0
    if rule not in BOUNDS:
        raise HardenError(f"NFT bounds {rule!r}: expected one of {', '.join(BOUNDS)}")
    return [0.8 * math.exp(-0.5 * k * scale) for k in range(1, count + 1)]


def mixup_weight(alpha: float, generator: torch.Generator) -> float:
    """MixUp's λ ~ Beta(α, α), drawn through the seeded generator so runs repeat.

    α = 1 is the published uniform; a small α keeps most batches close to one image
    (λ near 0 or 1), which on a few hundred images cost less accuracy; 0 turns MixUp off."""
    if alpha <= 0:
        return 1.0
    return float(beta.ppf(float(torch.rand((), generator=generator)), alpha, alpha))


def anchored_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, stamped: torch.Tensor, targets: torch.Tensor,
                           anchor: float) -> torch.Tensor:
    """Cross-entropy with the unstamped rows of a target class (`targets`) weighted by `anchor`, the rest by 1."""
    weights = torch.where(torch.isin(labels, targets) & ~stamped, anchor, 1.0)
    return (weights * F.cross_entropy(logits, labels, reduction="none")).sum() / weights.sum()


class MaskedNetwork(nn.Module):
    """`model` (a PixelModel) seen through masks on the chosen sites: per output channel, or per weight."""

    def __init__(self, model: PixelModel, sites: list[MaskSite], bounds: list[float], bn_mode: str = "freeze", granularity: str = "channel"):
        super().__init__()
        self.model = model
        self.sites = sites
        self.bn_mode = bn_mode
        if granularity not in GRANULARITIES:
            raise HardenError(f"NFT granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
        params = dict(model.net.named_parameters())
        shapes = [params[s.weight].shape if granularity == "weight" and s.kind != "norm" else (s.channels,) for s in sites]
        self.masks = nn.ParameterList([nn.Parameter(torch.ones(shape)) for shape in shapes])
        self.bounds = bounds
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "MaskedNetwork":
        self.training = mode
        self.model.train(mode and self.bn_mode == "update")
        return self

    def _masked_parameters(self) -> dict[str, torch.Tensor]:
        """Masked values of the masked parameters, keyed by their names inside `model.net`."""
        params = dict(self.model.net.named_parameters())
        out = {}
        for site, mask in zip(self.sites, self.masks):
            weight = params[site.weight]
            per_channel = mask.ndim < weight.ndim  # else one mask per weight (a norm layer's γ is both)
            out[site.weight] = weight * (mask.view(-1, *([1] * (weight.ndim - 1))) if per_channel else mask)
            if site.kind != "norm" and site.bias is not None and per_channel:
                out[site.bias] = params[site.bias] * mask  # β stays unmasked for norm layers, as published for BatchNorm
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        masked = {f"net.{name}": value for name, value in self._masked_parameters().items()}
        return torch.func.functional_call(self.model, masked, (images,))

    @torch.no_grad()
    def clamp(self) -> None:
        for mask, low in zip(self.masks, self.bounds):
            mask.clamp_(low, 1.0)

    @torch.no_grad()
    def fold(self) -> PixelModel:
        """Write the masks into the weights and return the plain model (no extra parameters)."""
        params = dict(self.model.net.named_parameters())
        for name, value in self._masked_parameters().items():
            params[name].copy_(value)
        for parameter in self.model.parameters():
            parameter.requires_grad_(True)
        return self.model.eval()

    def mask_summary(self) -> list[dict[str, float]]:
        return [{"layer": s.weight, "kind": s.kind, "channels": s.channels, "masks": m.numel(), "lower_bound": low,
                 "mean": float(m.mean()), "min": float(m.min()), "below_0.5": int((m < 0.5).sum())}
                for s, m, low in zip(self.sites, (mask.detach() for mask in self.masks), self.bounds)]


@register_method
class NeuralMaskFineTuning(Method):
    name = "nft"
    description = "neural mask fine-tuning (per-weight masks, MixUp with reversed triggers, pull-to-one regulariser), folded into the weights"
    defaults = {"steps": 400, "rounds": 5, "batch_size": 128, "lr": 0.05, "final_lr": 0.02, "regulariser": 1e-3, "bounds": "none",
                "placement": "bn+conv", "bn_mode": "freeze", "trigger_fraction": 0.5, "granularity": "weight",
                "refresh_every": 30, "refresh_steps": 10, "epsilon": 0.15, "mixup_alpha": 0.2, "anchor": 2.0}
    rules = {"placement": one_of(*PLACEMENTS), "bounds": one_of(*BOUNDS), "granularity": one_of(*GRANULARITIES)}

    def run(self, ctx: PurifyContext) -> MethodOutput:
        params = dict(ctx.settings)
        model = ctx.source.trainable().to(ctx.device).eval()
        sites = find_mask_sites(model, ctx.validation[0][0][None].to(ctx.device), params["placement"])
        masked = MaskedNetwork(model, sites, lower_bounds(len(sites), params["bounds"]), params["bn_mode"], params["granularity"]).to(ctx.device)
        per_class = max(len(ctx.train) / ctx.source.num_classes, 1.0)
        generator = ctx.generator(2)
        chaser = TriggerChaser(ctx.triggers, masked, ctx.train, seed=ctx.seed, interval=params["refresh_every"],
                               steps=params["refresh_steps"], device=ctx.device, epsilon=params["epsilon"])
        targets = torch.tensor(sorted({t.target for t in ctx.triggers}), dtype=torch.long, device=ctx.device)

        def after_step() -> None:
            masked.clamp()
            chaser.step()

        def loss_fn(net, images, labels):
            lam = mixup_weight(params["mixup_alpha"], generator)
            order = torch.randperm(len(images), generator=generator).to(images.device)
            mixed, stamped = stamp_fraction(lam * images + (1 - lam) * images[order], chaser.triggers, params["trigger_fraction"], generator)
            logits = net(mixed)
            loss = (lam * anchored_cross_entropy(logits, labels, stamped, targets, params["anchor"])
                    + (1 - lam) * anchored_cross_entropy(logits, labels[order], stamped, targets, params["anchor"]))
            pull = sum((1 - m).abs().sum() for m in masked.masks)
            return loss + params["regulariser"] / per_class * pull

        steps_per_round = max(params["steps"] // params["rounds"], 1)
        rng = np.random.default_rng(ctx.seed)
        resampled = ctx.train.subset(rng.integers(0, len(ctx.train), steps_per_round * params["batch_size"]))
        checkpoint = BestCheckpoint(masked, ctx)
        config = TrainConfig(epochs=params["rounds"], lr=params["lr"], batch_size=params["batch_size"], optimizer="sgd",
                             seed=ctx.seed, schedule="cosine", final_lr_fraction=params["final_lr"] / params["lr"])
        fit(masked, resampled, config, loss_fn=loss_fn, device=ctx.device, parameters=list(masked.masks),
            on_epoch_end=checkpoint.update, after_step=after_step, description="NFT round")
        checkpoint.restore()
        params.update(masks=masked.mask_summary(), triggers=[t.to_dict() for t in ctx.triggers])
        return MethodOutput(masked.fold(), params, checkpoint.history)
