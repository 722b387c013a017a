"""One run on several processes, started by `torchrun` or by `srun` under SLURM (docs/distributed.md).

Every rank builds the same networks from the same seed and walks the same global batch order; each
trains on its own share of every global batch (`EpochOrder.shard`: rows [rank * b, (rank + 1) * b)
of `trainer.batch_size` per domain, b = batch_size / world size). The ranks stay in step through two
collectives, both outside the methods:
- `average_gradients`, called by `Method.step_optimizers` before every optimizer step: the gradients
  of the parameters about to be stepped, averaged over the ranks in one all-reduce (the average
  DistributedDataParallel computes). Hooking the step instead of wrapping the networks in DDP is what
  lets every method run unchanged: DDP's reducer expects each wrapped module to be forwarded once per
  backward with the same parameters in use, which MCD's three updates per step, ADDA's stages,
  AdvEnt's frozen discriminator, FixMatch's second pass and every `separate_forward` method break.
- `broadcast_buffers` after every step: BatchNorm's running statistics (and any other buffer) follow
  rank 0's, as DDP's `broadcast_buffers` does, so evaluation, checkpoints and SHOT's target passes
  see one model. With `trainer.sync_bn` the batch statistics themselves are computed over all ranks.
Rank 0 alone evaluates, logs and writes files; the other ranks wait for it at the next all-reduce.
"""

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from da_runner.world import World, from_environment

# Rank 0 evaluates while the others wait at the next collective: generous, for large evaluation sets.
TIMEOUT = datetime.timedelta(minutes=60)


def init() -> World:
    """Join the run's process group (once per process; nothing for one process) and return the world.

    The rendezvous is torch's env:// one: torchrun sets MASTER_ADDR and MASTER_PORT; under srun they
    default to the node that launched the job step and a port derived from the job id, so every task
    of one job agrees on them without a shared file. The group runs gloo for CPU tensors and, where
    CUDA is present, NCCL for GPU tensors."""
    world = from_environment()
    if world.size == 1 or (dist.is_available() and dist.is_initialized()):
        return world
    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    job_id = os.environ.get("SLURM_JOB_ID", os.environ.get("SUBMITIT_LOCAL_JOB_ID", "0"))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(job_id) % 20000))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    return world


def finish(succeeded: bool) -> None:
    """Leave the process group at the end of the run. After a run that ended normally every rank first
    waits for the others (rank 0 is still evaluating and writing when the others are done): a rank that
    tears its connections down while a peer still uses them can abort in gloo's threads as it exits.
    After a failure no rank waits, since the others may never arrive; each leaves, and the launcher
    stops the rest."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients(params) -> None:
    """Replace the gradient of each parameter in `params` by its mean over the ranks, in one
    all-reduce over the concatenated gradients. Every rank must call it with the same parameters in
    the same order (they run the same code); parameters without a gradient are left out on every rank."""
    size = world_size()
    if size == 1:
        return
    grads = [p.grad for p in dict.fromkeys(params) if p.grad is not None]  # dict: each parameter once, in order
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics and step counts)."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def any_rank(flag: torch.Tensor) -> bool:
    """True when `flag` (a 0-dim bool tensor) is true on any rank: a decision every rank takes alike."""
    if world_size() == 1:
        return bool(flag)
    value = flag.to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_main(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def use_sync_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm layer replaced by SyncBatchNorm (batch statistics over all ranks);
    the parameters stay the same objects, so optimizers built before still hold them."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
