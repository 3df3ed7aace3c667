"""Data-parallel training under `torchrun`: one process per device, same result as one process.

`torchrun --nproc-per-node N -m harden <command> ...` starts N copies of a command; each
calls `init()`, which reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) and joins the process group: NCCL with one GPU per process
(cuda:LOCAL_RANK) when CUDA is present, gloo on CPU. Without torchrun everything here is
a no-op and `context()` describes a single process, so callers need no branches.

How a command uses it (purify, sophon)::

    from harden import distributed
    from harden.training import fit

    with distributed.launched(device) as dist:     # joins the group; barrier + teardown on exit
        fit(model, data, config, device=dist.device)  # shards every global batch across ranks
        if dist.is_main:                              # side effects once: MLflow, registry, reports
            tracking.log_metrics(...)

What `fit` does with it (`train_step` below): every rank builds the *same* global batches a
single process would draw (same seed, same sampler), takes its share (`batch[rank::world]`),
and scales its loss by its share of the batch; gradients are summed across ranks in one
flat all-reduce. The update is therefore the single-process update up to float rounding,
also for a short last batch (no DistributedSampler padding or dropped samples). BatchNorm
normalises with per-rank batch statistics (as plain DDP does; SyncBatchNorm is GPU-only);
its running statistics are averaged across ranks after every step so all ranks stay equal.
Progress bars and `on_epoch_end` run on rank 0 only.
"""

from __future__ import annotations

import ctypes
import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from harden.data.pipeline import make_loader


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank among world_size, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 does the side effects: MLflow runs and registration, reports, progress bars."""
        return self.rank == 0


_current = {"context": None}


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a single process; readable before `init()`."""
    return int(os.environ.get("RANK", "0")) == 0


def init(device: str | torch.device | None = None, timeout_s: float = 600.0) -> DistContext:
    """Join torchrun's process group (idempotent); a single process gets a trivial context."""
    import torch.distributed as dist

    if _current["context"] is not None:
        return _current["context"]
    requested = torch.device(device) if device is not None else None
    if not launched_by_torchrun():
        context = DistContext(device=requested or torch.device("cpu"))
    else:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and (requested is None or requested.type == "cuda")
        if use_cuda:
            torch.cuda.set_device(local)
        backend = "nccl" if use_cuda else "gloo"
        target = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=target if use_cuda else None)
        context = DistContext(rank, world, local, target, backend)
    _current["context"] = context
    return context


def context() -> DistContext:
    """The context `init()` set up, or a single CPU process when it was never called."""
    return _current["context"] or DistContext()


def barrier() -> None:
    if context().enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then leave the process group."""
    import torch.distributed as dist

    if context().enabled and dist.is_initialized():
        final_barrier = dist.barrier(async_op=True)
        final_barrier.wait()
        _keep_alive_until_exit(final_barrier)
        dist.destroy_process_group()
    _current["context"] = None


def _keep_alive_until_exit(work: object) -> None:
    """Never free the last collective's handle, so gloo's worker thread never frees it either.

    `wait()` returns as soon as the barrier completes, but gloo's worker thread drops its own
    reference to the work (and to the earlier collectives the barrier waited on, whose tensors
    belong to Python) a moment later. When that moment falls after the interpreter has started
    to exit, the thread cannot take the GIL and the process aborts ("terminate called without
    an active exception", SIGABRT; 2 of 30 launches of benchmarks/torchrun_exit.py, cf.
    pytorch/pytorch#179291).
    One deliberately leaked reference per process makes the worker's release a plain decrement.
    """
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(work))


@contextmanager
def launched(device: str | torch.device | None = None) -> Iterator[DistContext]:
    """`init()` for the duration of a command, with a clean teardown even on errors."""
    ctx = init(device)
    try:
        yield ctx
    finally:
        shutdown()


def global_batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[list[int]]:
    """The index batches a single process's shuffled loader draws (same seed, same sampler)."""
    indices = _Indices(len(dataset))  # type: ignore[arg-type]
    for batch in make_loader(indices, batch_size, shuffle=True, seed=seed):
        yield batch.tolist()


class _Indices(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def local_share(batch: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's part of a global batch; shares differ by at most one sample."""
    return list(batch[ctx.rank::ctx.world_size])


def collate(dataset: Dataset, indices: Sequence[int]):
    return default_collate([dataset[i] for i in indices])


def broadcast_parameters(model: nn.Module) -> None:
    """Start every rank from rank 0's weights and buffers."""
    import torch.distributed as dist

    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(params: Sequence[nn.Parameter], average: bool = False) -> None:
    """Sum (or, with `average`, average) gradients across ranks in one flat buffer.

    A rank whose share was empty contributes zeros; a parameter no rank touched keeps
    `grad=None`, so the optimizer skips it exactly as it would in a single process."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    used = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1) for g in grads), used])
    dist.all_reduce(flat)
    if average:
        flat[:-len(params)] /= context().world_size
    offset = 0
    for index, p in enumerate(params):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone() if flat[-len(params) + index] > 0 else None
        offset += n


def average_buffers(model: nn.Module) -> None:
    """Average floating buffers (BatchNorm running statistics) so all ranks hold the same model."""
    import torch.distributed as dist

    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    flat /= context().world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def sum_across_ranks(*values: float) -> list[float]:
    """Sum scalars over all ranks (e.g. loss totals and sample counts for the epoch mean)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=context().device)
    dist.all_reduce(tensor)
    return tensor.tolist()
