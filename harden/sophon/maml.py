"""First-order MAML over simulated fine-tuning, alternated with original-domain steps.

The skeleton shared by SOPHON (make fine-tuning on the restricted domain fail) and the
fine-tune-resistant watermark (make the trigger survive fine-tuning): only the query
loss (what fine-tuning should end up at) and the original-domain loss differ.

Per outer loop: (1) `outer_gradient` clones the model, applies a sampled fine-tuning
strategy, runs K inner optimiser steps on support batches and accumulates the first-
order gradient of the query loss at every step; one clipped step of the FTS optimiser
applies it. (2) NTR steps of the original-domain loss with a second optimiser on the
same parameters (lr multipliers α, β; the losses alternate, never summed). (3) Every
`eval_every` loops a guard checks original accuracy on a fixed cached subset against
its starting value and rolls back (or stops) when it falls more than `max_acc_drop`.

Under `torchrun` (after `harden.distributed.init()`) every rank simulates its own
trajectories (its own support batches and strategy draws) and the outer gradient is their
average, so N ranks imagine N times as many attackers per outer step in the same wall time;
the original-domain batches are sharded across ranks as in `harden.training.fit`. All
ranks hold the same weights throughout, so the guard decides the same everywhere.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harden import distributed
from harden.data.pipeline import LabelledDataset, TensorDataset, make_loader
from harden.sophon.data import in_memory
from harden.errors import HardenError
from harden.evaluation import evaluate
from harden.runtime import training_layout
from harden.sophon.heads import find_head
from harden.sophon.strategies import get_strategies
from harden.training import cross_entropy, make_optimizer

# (model, images, labels) -> scalar loss to minimise.
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
LoopHook = Callable[[dict], None]


class BatchStream:
    """Endless shuffled batches: a new permutation each pass, never a short trajectory."""

    def __init__(self, dataset: LabelledDataset, batch_size: int, seed: int = 0, device: str | torch.device = "cpu"):
        if len(dataset) < 2:
            raise HardenError("need at least 2 samples to draw training batches")
        self.dataset, self.batch_size, self.seed, self.device = dataset, min(batch_size, len(dataset)), seed, device
        self.epoch = 0
        self._iter: Iterator = iter(())

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self._iter, None)
        if batch is None:
            self._iter = iter(make_loader(self.dataset, self.batch_size, shuffle=True, seed=self.seed + self.epoch, drop_last=True))
            self.epoch += 1
            batch = next(self._iter)
        images, labels = batch
        return images.to(self.device), labels.to(self.device)


@dataclass
class InnerLoop:
    """One simulated fine-tuning trajectory (the attacker the defender imagines)."""

    # (optimiser, lr) pairs; each trajectory samples one, like it samples a strategy.
    optimizers: tuple[tuple[str, float], ...] = (("sgd", 0.01), ("adam", 0.001))
    steps: int = 40
    batch_size: int = 64
    query_fraction: float = 0.15  # reference: 130 support / 20 query of 150
    query_every_step: bool = True
    strategies: tuple[str, ...] = ("full", "reinit-head", "head-only")
    trajectories: int = 1

    def validate(self) -> None:
        get_strategies(self.strategies)
        if not 0.0 < self.query_fraction < 1.0:
            raise HardenError(f"query fraction {self.query_fraction} must be in (0, 1)")
        if self.steps < 1 or self.trajectories < 1:
            raise HardenError("inner steps and trajectories must be at least 1")
        if not self.optimizers:
            raise HardenError("the inner loop needs at least one optimiser")
        for name, lr in self.optimizers:
            make_optimizer(name, [nn.Parameter(torch.zeros(1))], lr)


def outer_gradient(model: nn.Module, stream: BatchStream, inner: InnerLoop, query_loss: BatchLoss,
                   generator: torch.Generator | None = None) -> tuple[list[torch.Tensor | None], float]:
    """First-order MAML gradient of the query loss, averaged over trajectories and query steps.

    The whole outer-gradient computation lives here so that a distributed run only has
    to all-reduce the returned list. `generator` draws each trajectory's strategy and
    optimiser (ranks of a distributed run use different ones). A re-initialised head's query gradient says nothing
    about the model's own head, so it is not routed back (head gradients flow only when
    the trajectory kept the head).
    """
    strategies = get_strategies(inner.strategies)
    params = list(model.parameters())
    grads: list[torch.Tensor | None] = [None] * len(params)
    total, count = 0.0, 0
    queries = inner.steps if inner.query_every_step else 1
    for _ in range(inner.trajectories):
        strategy = strategies[int(torch.randint(len(strategies), (1,), generator=generator))]
        name, lr = inner.optimizers[int(torch.randint(len(inner.optimizers), (1,), generator=generator))]
        clone = copy.deepcopy(model).train()
        moving = strategy.prepare(clone)
        clone_params = list(clone.parameters())
        fresh = {id(p) for p in find_head(clone)} if strategy.reinit_head else set()
        routed = [i for i, p in enumerate(clone_params) if id(p) not in fresh]
        optimizer = make_optimizer(name, moving, lr)
        for step in range(inner.steps):
            images, labels = stream.next()
            images = training_layout(model, images)
            n_query = max(1, int(round(len(labels) * inner.query_fraction)))
            clone.zero_grad(set_to_none=True)
            F.cross_entropy(clone(images[n_query:]), labels[n_query:]).backward()
            optimizer.step()
            if inner.query_every_step or step == inner.steps - 1:
                clone.zero_grad(set_to_none=True)
                loss = query_loss(clone, images[:n_query], labels[:n_query])
                loss.backward()
                total, count = total + float(loss.detach()), count + 1
                weight = 1.0 / (queries * inner.trajectories)
                for i in routed:
                    grad = clone_params[i].grad
                    if grad is not None:
                        grads[i] = grad * weight if grads[i] is None else grads[i] + grad * weight
    return grads, total / max(count, 1)


@dataclass
class OuterConfig:
    inner: InnerLoop = field(default_factory=InnerLoop)
    loops: int = 300
    lr: float = 1e-3  # η; FTS lr = α·η, NTR lr = β·η
    alpha: float = 1.0
    beta: float = 1.0
    optimizer: str = "adam"
    clip: float = 0.5  # max L2 norm of the FTS gradient
    ntr_steps: int = 1
    batch_size: int = 64  # original-domain batch
    max_acc_drop: float = 0.03  # allowed drop of original accuracy below its start (fraction, i.e. 0.03 = 3 points)
    guard: str = "rollback"
    max_rollbacks: int = 3
    eval_every: int = 10
    eval_size: int = 512
    seed: int = 0

    def validate(self) -> None:
        self.inner.validate()
        if self.guard not in GUARDS:
            raise HardenError(f"unknown guard {self.guard!r}; known: {', '.join(GUARDS)}")
        if self.loops < 1 or self.eval_every < 1 or self.ntr_steps < 0:
            raise HardenError("loops and eval interval must be at least 1, NTR steps at least 0")
        if not 0.0 <= self.max_acc_drop <= 1.0:
            raise HardenError(f"max accuracy drop {self.max_acc_drop} must be a fraction in [0, 1]")
        make_optimizer(self.optimizer, [nn.Parameter(torch.zeros(1))], self.lr)


@dataclass
class GuardAction:
    """What the guard does once it has restored the last checkpoint that passed."""

    description: str
    stop: bool
    fts_lr_factor: float = 1.0


GUARDS: dict[str, GuardAction] = {
    "stop": GuardAction("restore the last passing checkpoint and stop", stop=True),
    "rollback": GuardAction("restore the last passing checkpoint, halve the FTS lr and continue", stop=False, fts_lr_factor=0.5),
}


@dataclass
class OuterResult:
    model: nn.Module
    acc_start: float  # on the cached guard subset
    acc_end: float
    loops_done: int
    rollbacks: int
    stopped_by_guard: bool
    history: list[dict]
    duration_s: float


def _accuracy(model: nn.Module, data: TensorDataset, device) -> float:
    return evaluate(model, data, device=device).accuracy


def train_outer(
    model: nn.Module,
    original: LabelledDataset,
    original_eval: LabelledDataset,
    simulated: LabelledDataset,
    config: OuterConfig,
    *,
    query_loss: BatchLoss,
    original_loss: BatchLoss = cross_entropy,
    device: str | torch.device = "cpu",
    on_check: LoopHook | None = None,
) -> OuterResult:
    """Run the alternating outer loop on `model` in place (see module docstring)."""
    config.validate()
    start = time.perf_counter()
    model.to(device)
    dist = distributed.context()
    if dist.enabled:
        distributed.broadcast_parameters(model)
    guard_set = in_memory(original_eval, config.eval_size, config.seed)
    rank_seed = config.seed + 7919 * dist.rank  # each rank simulates different attackers
    fts_stream = BatchStream(simulated, config.inner.batch_size, rank_seed, device)
    ntr_stream = BatchStream(original, config.batch_size, config.seed + 1, device)
    trajectory_rng = torch.Generator().manual_seed(rank_seed)
    params = list(model.parameters())
    fts = make_optimizer(config.optimizer, params, config.alpha * config.lr)
    ntr = make_optimizer(config.optimizer, params, config.beta * config.lr)
    acc_start = acc = _accuracy(model, guard_set, device)
    good_state = copy.deepcopy(model.state_dict())
    history: list[dict] = []
    rollbacks, stopped, loops_done, query_losses = 0, False, 0, []
    for loop in range(config.loops):
        if config.alpha > 0:  # α = 0 leaves only the original-domain steps (an ablation baseline)
            model.eval()  # the FTS step only reads the model; its clones train
            grads, query_value = outer_gradient(model, fts_stream, config.inner, query_loss, trajectory_rng)
            for param, grad in zip(params, grads):
                param.grad = grad
            if dist.enabled:
                distributed.all_reduce_gradients(params, average=True)
                query_value = distributed.sum_across_ranks(query_value)[0] / dist.world_size
            query_losses.append(query_value)
            nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], config.clip)
            fts.step()
            fts.zero_grad(set_to_none=True)
        model.train()
        for _ in range(config.ntr_steps):
            images, labels = ntr_stream.next()
            images = training_layout(model, images)
            share = slice(dist.rank, None, dist.world_size)  # the whole batch in a single process
            ntr.zero_grad(set_to_none=True)
            if len(labels[share]):
                (original_loss(model, images[share], labels[share]) * (len(labels[share]) / len(labels))).backward()
            if dist.enabled:
                distributed.all_reduce_gradients(params)
            ntr.step()
            if dist.enabled:
                distributed.average_buffers(model)
        loops_done = loop + 1
        if loops_done % config.eval_every and loops_done != config.loops:
            continue
        acc = _accuracy(model, guard_set, device)
        passed = acc >= acc_start - config.max_acc_drop
        history.append({"loop": loops_done, "query_loss": float(np.mean(query_losses)) if query_losses else None,
                        "original_accuracy": acc, "passed": passed})
        query_losses = []
        if on_check is not None:
            on_check(history[-1])
        if passed:
            good_state = copy.deepcopy(model.state_dict())
            continue
        model.load_state_dict(good_state)
        acc = _accuracy(model, guard_set, device)
        rollbacks += 1
        action = GUARDS[config.guard]
        for group in fts.param_groups:
            group["lr"] *= action.fts_lr_factor
        if action.stop or rollbacks > config.max_rollbacks:
            stopped = True
            break
    model.eval()
    return OuterResult(model, acc_start, acc, loops_done, rollbacks, stopped, history, round(time.perf_counter() - start, 3))
