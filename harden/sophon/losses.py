"""Suppression losses for the restricted domain (minimised on the simulated query batch).

All take logits and labels and work for any number of classes C (taken from the logits).
`inverse-ce` is the textbook −log(1 − p_y); `inverse-ce-logit` is the variant the
SOPHON reference code computes, CE(−z, y) = −log softmax(−z)_y (algorithms.md §6).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from harden.errors import HardenError

SuppressionLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SUPPRESSION_LOSSES: dict[str, SuppressionLoss] = {}


def register_loss(name: str) -> Callable[[SuppressionLoss], SuppressionLoss]:
    def decorate(fn: SuppressionLoss) -> SuppressionLoss:
        SUPPRESSION_LOSSES[name] = fn
        return fn

    return decorate


def get_loss(name: str) -> SuppressionLoss:
    if name not in SUPPRESSION_LOSSES:
        raise HardenError(f"unknown suppression loss {name!r}; known: {', '.join(SUPPRESSION_LOSSES)}")
    return SUPPRESSION_LOSSES[name]


@register_loss("kl-uniform")
def kl_uniform(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(uniform ‖ p) = −log C − mean_j log p_j: zero exactly when the prediction is uniform."""
    return (-math.log(logits.shape[1]) - F.log_softmax(logits, dim=1).mean(dim=1)).mean()


@register_loss("inverse-ce")
def inverse_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−log(1 − p_y), computed stably as logsumexp(z) − logsumexp(z without y)."""
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)).mean()


@register_loss("inverse-ce-logit")
def inverse_ce_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference code's CE(1 − z, y), i.e. cross-entropy on negated logits."""
    return F.cross_entropy(-logits, labels)


@register_loss("neg-ce")
def neg_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−CE: unbounded below, so it relies on gradient clipping to stay stable."""
    return -F.cross_entropy(logits, labels)
