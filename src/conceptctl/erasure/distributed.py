"""Data-parallel erasure over several processes started by ``accelerate launch`` (or torchrun).

Every process holds the whole model and draws the *same* global batch from the same seeded
generator (indices, timesteps and noise), then works on its own contiguous share of it. The
gradients are combined so that the update is the one a single process would make on the whole
batch, up to floating-point summation order:

* losses that are means over the batch: each process weights its gradient by its share of the
  batch (``share`` = local size / global size) and the weighted gradients are summed;
* DoCo: the unlearning gradient g_u and the preserving gradient g_p are summed *separately*,
  and gradient surgery runs on the summed pair. Surgery is not linear (it projects when
  g_u · g_p < 0), so surgery on each process's gradients followed by averaging is a different
  update; it is also what a plain DDP wrapper would force, which is why none is used;
* DoCo's discriminator sees the whole batch on every process (the predicted clean latents are
  gathered; it is small), so it stays identical everywhere — BatchNorm statistics included — and
  the adversarial loss is that of the whole batch.

Accelerate starts the processes and sets up the process group (gloo on CPUs, NCCL on GPUs); the
collectives here are plain ``torch.distributed`` calls on that group. Only the main process
writes checkpoints and the artifact; anchor images are drawn by all processes, each its share.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch


def launched_processes() -> int:
    """How many processes the launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_launched_process() -> bool:
    """Whether this is the launcher's first process (True when run directly): known before any
    process group exists, for callers that must decide before the work what to write."""
    return int(os.environ.get("RANK", "0")) == 0


class ProcessGroup(Protocol):
    """What training, anchor drawing and evaluation ask of the processes of a run: which share
    of a batch is this process's, and the collectives that combine the shares. Implemented by
    :class:`SingleProcess` (one process: identities) and :class:`DataParallel`."""

    rank: int
    world: int
    is_main: bool

    def shard(self, size: int) -> slice: ...
    def shares(self, size: int) -> list[int]: ...
    def sum_(self, tensors) -> None: ...  # in place, over the processes
    def gather(self, tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor: ...
    def broadcast_(self, tensors) -> None: ...  # the main process's values, in place
    def broadcast_object(self, value): ...
    def max(self, value: float) -> float: ...
    def barrier(self) -> None: ...


class SingleProcess:
    """The one-process case: every operation is the identity, so nothing changes."""

    rank = 0
    world = 1
    is_main = True
    backend = None

    def shard(self, size: int) -> slice:
        return slice(0, size)

    def shares(self, size: int) -> list[int]:
        return [size]

    def sum_(self, tensors) -> None:
        pass

    def gather(self, tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        return tensor

    def broadcast_(self, tensors) -> None:
        pass

    def broadcast_object(self, value):
        return value

    def max(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        pass


class DataParallel(SingleProcess):
    """Several processes in one ``torch.distributed`` group (set up by accelerate)."""

    def __init__(self, rank: int, world: int, backend: str, device: torch.device) -> None:
        self.rank, self.world, self.backend = rank, world, backend
        self.is_main = rank == 0
        # Where collectives run: NCCL only moves GPU tensors, gloo CPU ones.
        self.comm_device = device if backend == "nccl" else torch.device("cpu")

    def shares(self, size: int) -> list[int]:
        """Contiguous shares of a batch of ``size``: the first ``size % world`` get one more."""
        base, extra = divmod(size, self.world)
        return [base + (r < extra) for r in range(self.world)]

    def shard(self, size: int) -> slice:
        sizes = self.shares(size)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    # Tensors are summed in flat buckets of about this many elements: few collectives, and a
    # bounded extra buffer (1 GiB of fp32) even when every UNet parameter trains.
    BUCKET = 2**28

    def sum_(self, tensors) -> None:
        """Sum each tensor over the processes, in place, a bucket of tensors per collective."""
        bucket: list[torch.Tensor] = []
        size = 0
        for t in tensors:
            if bucket and size + t.numel() > self.BUCKET:
                self._sum_bucket(bucket)
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            self._sum_bucket(bucket)

    def _sum_bucket(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        # Summed in fp32 whatever the tensors' dtype (fp16 gradients would lose bits).
        flat = torch.cat([t.reshape(-1).to(self.comm_device, torch.float32) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def gather(self, tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        """Concatenate every process's ``tensor`` along dim 0 in rank order (the global batch
        order, since shares are contiguous). ``sizes``: each process's row count, when unequal."""
        import torch.distributed as dist

        sizes = sizes or [tensor.shape[0]] * self.world
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]), device=self.comm_device)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        whole = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
        return whole.to(tensor.device)

    def broadcast_(self, tensors) -> None:
        """Overwrite each tensor with the main process's value."""
        import torch.distributed as dist

        for t in tensors:
            moved = t.data.to(self.comm_device)
            dist.broadcast(moved, src=0)
            if moved is not t.data:
                t.data.copy_(moved)

    def broadcast_object(self, value):
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def max(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def setup(device: str) -> tuple[ProcessGroup, str]:
    """The process group for this run and the device this process trains on.

    ``device`` is the resolved device setting (``cpu``, ``cuda``, …). Under a launcher with
    several processes, accelerate initialises the group; on a CPU-only run it must be told so
    (``cpu=True``), or it silently reports one process per rank and each would train alone —
    which is checked here and refused.
    """
    world = launched_processes()
    if world <= 1:
        return SingleProcess(), device
    from accelerate import PartialState

    from conceptctl.errors import UsageError

    cpu = torch.device(device).type == "cpu"
    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        raise UsageError(
            f"the launcher started {world} processes but accelerate set up "
            f"{state.num_processes}; they would train separately",
            hint="launch with 'accelerate launch --multi_gpu --num_processes N -m conceptctl "
            "erase …' (also on CPUs) or torchrun",
        )
    device = "cpu" if cpu else str(state.device)
    parallel = DataParallel(state.process_index, state.num_processes, str(state.backend),
                            torch.device(device))
    return parallel, device
