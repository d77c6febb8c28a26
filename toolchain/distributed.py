"""Data-parallel training under ``torchrun``: the process group and the few collectives rcomp needs.

``torchrun --nproc_per_node N -m rcomp train ...`` starts N copies of the command and tells each
its place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``).
Outside torchrun ``WORLD_SIZE`` is unset (or 1) and every function here is a no-op, so the
single-process code paths do not change.

What the trainer relies on (see :mod:`rcomp.train`):

* one process group per process, NCCL when training on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``)
  and gloo on CPU, created once and destroyed at exit;
* :func:`is_main` answers from the environment *before* the group exists, so the pipeline can keep
  every file operation (output folder, checkpoints, reports) on rank 0 from the start;
* reductions in float64, so summed counts (correct predictions, examples) are exact;
* :func:`average_buffers` makes BatchNorm running statistics identical on every rank.
"""

from __future__ import annotations

import atexit
import inspect
import os
from dataclasses import dataclass

from rcomp.errors import RcompError


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise RcompError(f"environment variable {name}={value!r}: expected an integer (set by torchrun)") from None


def world() -> World:
    """The running process group if there is one, else what torchrun's environment says."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise RcompError(f"RANK={rank} / WORLD_SIZE={size}: not a valid torchrun environment")
    return World(rank, size, _env_int("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0 (or no torchrun at all): the one process that writes files and logs."""
    if _initialized():
        return world().is_main
    return _env_int("RANK", 0) == 0


def main_only(log):
    """``log`` on rank 0, a no-op elsewhere: N ranks print one log, not N interleaved ones."""
    return log if is_main() else (lambda *_args, **_kwargs: None)


def resolve_device(name: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` as given, ``auto`` as CUDA when there is one: rcomp's one reading of a
    device name, so the CLI and the trainer refuse the same names (RcompError, exit 2)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise RcompError(f"device {name!r}: expected cpu, cuda, cuda:N or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RcompError(f"device {name!r}: CUDA is not available on this machine (use cpu or auto)")
    return name


def device_for(name: str, w: World | None = None) -> str:
    """The device of this rank: ``cuda`` (or ``cuda:N``) becomes ``cuda:LOCAL_RANK`` under torchrun."""
    w = w or world()
    if w.active and name.startswith("cuda"):
        return f"cuda:{w.local_rank}"
    return name


def init(device: str) -> World:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) unless there is none or it exists."""
    import torch
    import torch.distributed as dist

    w = world()
    if not w.active or _initialized():
        return w
    if not dist.is_available():
        raise RcompError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda and w.local_rank >= torch.cuda.device_count():
        raise RcompError(f"LOCAL_RANK {w.local_rank} needs a GPU but this node has {torch.cuda.device_count()}; "
                         "use --nproc_per_node <= the number of GPUs")
    if cuda:
        torch.cuda.set_device(w.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(cleanup)
    return world()


def cleanup() -> None:
    """Leave the process group (registered at exit by :func:`init`; safe to call twice)."""
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def _initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # the light runtime install has no torch
        return False
    return dist.is_available() and dist.is_initialized()


def _comm_device():
    """Where collective tensors live: the rank's GPU for NCCL, the CPU for gloo."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (exact for counts)."""
    if not _initialized():
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def average_tensors(tensors: list) -> None:
    """Average each tensor over the ranks in place: gradients computed outside DDP's own backward."""
    if not _initialized():
        return
    import torch.distributed as dist

    size = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t)
        t.div_(size)


def all_true(flag: bool) -> bool:
    """True when ``flag`` holds on every rank: one rank's fault stops all of them at the same step."""
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (pickled), e.g. the checkpoint only rank 0 reads from disk."""
    if not _initialized():
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0, device=_comm_device())
    return holder[0]


def average_buffers(module) -> None:
    """Average floating buffers (BatchNorm running mean/var) over ranks, copy the others from rank 0.

    Each rank updates its running statistics from its own shard (per-rank BatchNorm, DDP with
    ``broadcast_buffers=False``); averaging them at the end of an epoch, as timm's ``distribute_bn``
    does, gives every rank the same evaluation model and statistics from all of the data.
    """
    if not _initialized():
        return
    import torch
    import torch.distributed as dist

    size = dist.get_world_size()
    with torch.no_grad():
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(size)
            else:
                dist.broadcast(buf, src=0)


def wrap(module, device):
    """``module`` in DistributedDataParallel when a process group runs, else ``module`` itself.

    Only parameters that require gradients are reduced, so the trainer wraps again after it
    freezes the masks. BatchNorm stays per rank (no SyncBatchNorm: converting replaces the norm
    modules that carry the channel-mask hooks); buffers are averaged per epoch instead of being
    broadcast at every forward.
    """
    if not _initialized():
        return module
    import torch
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device(device)
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, **_no_forward_buffer_sync(DistributedDataParallel))


def _no_forward_buffer_sync(ddp_class) -> dict:
    """``forward_sync_buffers=False`` where torch has it (newer), else ``broadcast_buffers=False``.

    Both keep the sync at construction (every rank starts from rank 0's buffers) and skip it at each forward.
    """
    params = inspect.signature(ddp_class.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
