"""Encoders (`--task encoder`): RECEIVE's reversed trigger, a kNN view for metrics, and its unlearning loss.

An encoder has no labels to attack, so harden measures it the way a downstream user
would meet it: a k-nearest-neighbour classifier over the embeddings of the clean
training split. Accuracy, the known trigger's ASR and the reversed trigger's ASR are
then the classifier metrics of that view, and the guardrail works unchanged. The
reversed trigger's "target" is the class its stamped images collapse onto.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harden.data.pipeline import LabelledDataset, make_loader
from harden.purify.triggers import ReversedTrigger, stamp_fraction
from harden.scan.encoder import EncoderConfig, above_baseline, clean_similarity, invert, probe_images

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class KnnView(nn.Module):
    """`encoder` followed by a cosine k-NN vote over reference embeddings: logits = votes per class."""

    def __init__(self, encoder: nn.Module, reference: LabelledDataset, num_classes: int, k: int = 5, device: torch.device = torch.device("cpu")):
        super().__init__()
        self.encoder, self.k, self.num_classes = encoder, k, num_classes
        with torch.no_grad():
            encoder.eval()
            chunks = [(F.normalize(encoder(x.to(device)).flatten(1), dim=1), y.to(device)) for x, y in make_loader(reference, 256)]
        self.register_buffer("keys", torch.cat([c[0] for c in chunks]))
        self.register_buffer("values", torch.cat([c[1] for c in chunks]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        queries = F.normalize(self.encoder(images).flatten(1), dim=1)
        nearest = (queries @ self.keys.T).topk(min(self.k, len(self.keys)), dim=1).indices
        return F.one_hot(self.values[nearest], self.num_classes).sum(1).float()


def encoder_trigger(encoder: nn.Module, train: LabelledDataset, num_classes: int, *, config: EncoderConfig | None = None,
                    device: torch.device = torch.device("cpu"), seed: int = 0) -> ReversedTrigger:
    """RECEIVE inversion on the training split; the target is the class the stamped images land in."""
    config = config or EncoderConfig()
    images = probe_images(train, config.samples, seed).to(device)
    encoder = encoder.to(device).eval()
    frozen = [p for p in encoder.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        found = invert(encoder, images, above_baseline(config, clean_similarity(encoder, images, config.batch_size)), seed)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    trigger = ReversedTrigger(-1, found.mask.detach()[None].cpu(), found.pattern.detach().cpu(), found.norm, found.similarity)
    with torch.no_grad():
        votes = KnnView(encoder, train, num_classes, device=device)(trigger(images)).argmax(1)
    trigger.target = int(votes.mode().values)
    return trigger


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A cheap, label-preserving view: a random shift of up to 1/8 of the side and a brightness change."""
    limit = max(1, images.shape[-1] // 8)
    dy, dx = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=generator))
    scale = (0.8 + 0.4 * torch.rand(len(images), 1, 1, 1, generator=generator)).to(images.device)
    return (torch.roll(images, (dy, dx), dims=(2, 3)) * scale).clamp(0, 1)


def _nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    z = F.normalize(torch.cat([a, b]).flatten(1), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    count = len(a)
    targets = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(z.device)
    return F.cross_entropy(similarity, targets)


def receive_unlearning_loss(triggers: list, fraction: float, beta: float, distill: float, teacher: Callable[[torch.Tensor], torch.Tensor],
                            generator: torch.Generator) -> LossFn:
    """RECEIVE stage 2: NT-Xent between two views of the unstamped images plus β·(−cos) between each stamped
    image's embedding and its clean embedding; `distill` keeps clean embeddings near the source encoder's."""
    def loss(encoder: nn.Module, images: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        stamped, rows = stamp_fraction(images, triggers, fraction, generator)
        total = images.new_zeros(())
        clean = images[~rows]
        if len(clean) > 1:
            total = total + _nt_xent(encoder(_augment(clean, generator)), encoder(_augment(clean, generator)))
        if rows.any():
            total = total - beta * F.cosine_similarity(encoder(stamped[rows]).flatten(1), encoder(images[rows]).flatten(1)).mean()
        if distill > 0:
            total = total - distill * F.cosine_similarity(encoder(images).flatten(1), teacher(images).flatten(1)).mean()
        return total

    return loss
