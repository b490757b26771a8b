"""One CPU, one GPU or many processes launched by ``torchrun``: device choice, process group,
and batch norm synchronised across processes (on CPU too, where ``nn.SyncBatchNorm`` does not
run), so that a global batch split over N processes trains exactly like one process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from umr.nets import batch_norm_with_running_stats

__all__ = ["Context", "setup", "cleanup", "convert_batchnorm", "SyncBatchNormAnyDevice", "all_reduce_sum", "all_gather_rows"]


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceError(RuntimeError):
    """The device asked for is not there; the message names the flag."""


def setup(device: str = "auto") -> Context:
    """Pick the device ('auto': CUDA if available) and, under torchrun (WORLD_SIZE > 1), join the
    process group: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was given but torch sees no CUDA device; use --device cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Context(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity without a process group)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows (first dimension) of every process's ``tensor``, concatenated in rank order; the
    processes may hold different numbers of rows (identity without a process group)."""
    if not dist.is_initialized():
        return tensor
    world = dist.get_world_size()
    count = torch.tensor([len(tensor)], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)])


class SyncBatchNormAnyDevice(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch over all processes.

    Mean and variance are all-reduced with the differentiable ``torch.distributed.nn``
    all_reduce, so the gradients are the global batch's too (works with gloo and NCCL).
    Without a process group it is plain batch norm; a global batch of one value per channel
    uses the running statistics.
    """

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            count = x.numel() // x.shape[1]
            if self.training and count == 1:
                return batch_norm_with_running_stats(self, x)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                self.momentum, self.eps)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        count = all_reduce(torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device))
        if count.item() == 1:
            return batch_norm_with_running_stats(self, x)
        mean = all_reduce(x.sum(dims)) / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            unbiased = var.detach() * count / (count - 1)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d by :class:`SyncBatchNormAnyDevice`, keeping its state."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        new = SyncBatchNormAnyDevice(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        state = module.state_dict()
        new.load_state_dict(state)
        reference = state.get("running_mean", module.weight)
        return new.to(reference.device, reference.dtype) if reference is not None else new
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child))
    return module
