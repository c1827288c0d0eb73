"""Multi-process helpers for scripts started by ``accelerate launch`` or ``torchrun``.

The launchers set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``);
plain ``python -m ...`` sets none of them and every helper here is then a no-op (world size 1),
so a script behaves exactly as before when run alone.

Extraction scripts use :func:`launcher_chunks` (rank r takes shard r of WORLD_SIZE, the same
contiguous :func:`common.cli.shard`) and :func:`barrier` (a CPU ``gloo`` group, so waiting for
slower ranks never hits a GPU collective's timeout). Training scripts use ``accelerate.Accelerator``.
"""

from __future__ import annotations

import datetime
import os

import torch

BARRIER_TIMEOUT = datetime.timedelta(hours=float(os.environ.get("BARRIER_TIMEOUT_HOURS", "24")))


def world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) when not launched."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    return rank, size, local


def launcher_chunks(num_chunks: int | None, chunk_idx: int) -> tuple[int, int, bool]:
    """The shard to take: under a launcher with no explicit ``num_chunks`` (> 1), (WORLD_SIZE, RANK, True);
    else the given (num_chunks, chunk_idx, False)."""
    rank, size, _ = world()
    if size > 1 and int(num_chunks or 1) == 1:
        return size, rank, True
    return int(num_chunks or 1), int(chunk_idx), False


def local_device(name: str | torch.device | None) -> str | torch.device | None:
    """``auto``/``cuda`` become ``cuda:LOCAL_RANK`` under a launcher (one GPU per process, made current)."""
    _, size, local = world()
    if size > 1 and torch.cuda.is_available() and str(name).lower() in ("auto", "none", "cuda"):
        torch.cuda.set_device(local % torch.cuda.device_count())
        return f"cuda:{local % torch.cuda.device_count()}"
    return name


def init_group() -> bool:
    import torch.distributed as dist

    if not dist.is_available() or world()[1] <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return True


def barrier() -> None:
    """Wait for every rank (CPU gloo group created on first use); no-op in a single process."""
    if init_group():
        import torch.distributed as dist

        if dist.get_backend() == "gloo":
            dist.barrier()
        else:  # a group made by someone else (e.g. nccl): a CPU-side collective through a gloo subgroup
            group = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
            dist.barrier(group=group)


def _cpu_all_reduce(value: float, op_name: str) -> float:
    """``value`` reduced over every rank with the named ``ReduceOp`` through a CPU gloo collective."""
    if not init_group():
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    op = getattr(dist.ReduceOp, op_name)
    if dist.get_backend() == "gloo":
        dist.all_reduce(t, op=op)
    else:
        dist.all_reduce(t, op=op, group=dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT))
    return float(t)


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every rank; ``flag`` itself in one process."""
    return bool(_cpu_all_reduce(float(bool(flag)), "MIN"))


def all_sum(value: float) -> float:
    """The sum of ``value`` over every rank; ``value`` itself in one process."""
    return _cpu_all_reduce(float(value), "SUM")


def destroy() -> None:
    """Tear down the group made by :func:`barrier` (call once at the end of a launched script)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def make_accelerator(device_name: str | None = "auto"):
    """An ``accelerate.Accelerator``: DDP under ``accelerate launch``/torchrun, a pass-through in one process.

    Device placement stays with the caller, so one process keeps honouring ``--device`` (e.g.
    cuda:1); under a launcher use ``accelerator.device`` (cuda:LOCAL_RANK, or the CPU with gloo).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    name = str(local_device(device_name))
    cpu = name == "cpu" or (name in ("auto", "None") and not torch.cuda.is_available())
    # some ranks may skip a head in a step (e.g. L5's next-state terms on one-token answers)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=cpu, device_placement=False, kwargs_handlers=[ddp])
