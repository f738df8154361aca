"""
Many processes (torchrun): PyTorch's own distributed data parallel, behind the training loop and
the CLIs. A plain `python` run is one process, initialises nothing and takes none of these paths
(every helper is the identity there); under torchrun every process runs the same program on its
share of each batch and of each evaluation pass (docs/torchrun.md). Nothing in a method's
equations calls these: the loop (train.fit) turns each step's batch means into shares of the
global batch mean, the evaluation pass shards and gathers, and the CLIs (runs.py) start the
processes and decide who reports an error.
"""
import inspect
import os
import threading

import torch
import torch.distributed as dist


def distributed():
    """True under torchrun (the process group is initialised), also with a single process."""
    return dist.is_available() and dist.is_initialized()


def world():
    """(rank, number of processes): (0, 1) unless torch.distributed is initialised (torchrun)."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def launched_rank():
    """(rank, number of processes) as torchrun set them, also before the process group starts."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def end_processes():
    if distributed():
        dist.barrier()  # every process reaches the end before any leaves: torch 2.3's gloo teardown waits for all
        dist.destroy_process_group()


def comm_device():
    """Where collectives run: the process's GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier():
    if distributed():
        dist.barrier()


def rank0_first(fn):
    """fn() on rank 0 alone, then on the others: for work that fills a cache on disk (downloading
    a checkpoint, pretraining the stand-in), which the other processes then read. Under a plain
    run: fn()."""
    if not distributed():
        return fn()
    if dist.get_rank() == 0:
        with single_process():
            out = fn()
    dist.barrier()
    if dist.get_rank() != 0:
        out = fn()
    dist.barrier()
    return out


class single_process:
    """Within it this process computes alone (fit trains without DDP, passes are not sharded),
    as a plain run does: rank0_first's work on rank 0."""
    depth = 0

    def __enter__(self):
        single_process.depth += 1

    def __exit__(self, *exc):
        single_process.depth -= 1


def sharding():
    """Whether the current pass is split over processes."""
    return distributed() and single_process.depth == 0


def shard(n, rank, world_size):
    """The contiguous part of range(n) that process `rank` takes: n // W items each, the first
    n % W processes one more, so the parts in rank order are range(n) in order. Used for the
    evaluation passes and for each training batch (ShardedBatches)."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def gather_in_order(part, n):
    """Every process's part [len(shard), ...] of n items -> all n [n, ...] in index order, on
    every process, on part's device (all_gather needs equal sizes: parts are padded to the
    largest and the padding cut off again). NCCL gathers GPU tensors, gloo CPU ones."""
    world_size = world()[1]
    longest = len(shard(n, 0, world_size))
    padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=comm_device())
    padded[:len(part)] = part
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:len(shard(n, r, world_size))] for r, p in enumerate(parts)]).to(part.device)


def global_batch(local_n):
    """(n, start): the size of the global batch this process holds a slice of, and where its
    slice starts (ShardedBatches cuts every batch by `shard`). Plain run: (local_n, 0)."""
    if not sharding():
        return local_n, 0
    t = torch.tensor([local_n], device=comm_device())
    dist.all_reduce(t)
    n = int(t.item())
    return n, shard(n, dist.get_rank(), dist.get_world_size()).start


def global_mean_shares(terms):
    """A step's loss terms {name: (mean over this process's b samples, b)} -> {name: its share of
    the mean over the *global* batch of n}: mean * b * W / n, with every term's n from one
    all-reduce. DDP averages the W processes' gradients, so the step follows the gradient of the
    global batch mean, also when a short last batch does not split evenly (fit reports the mean
    of the shares over processes: the global loss). Plain run: the means themselves, bit for bit."""
    if not sharding():
        return {name: mean for name, (mean, _) in terms.items()}
    b = torch.tensor([b for _, b in terms.values()], device=comm_device())
    n = b.clone()
    dist.all_reduce(n)
    W = dist.get_world_size()
    return {name: mean * (int(b_k) * W / int(n_k)) for (name, (mean, _)), b_k, n_k in zip(terms.items(), b, n)}


def gather_batch(*parts):
    """This process's slices of a batch ([b, ...] each) -> the whole global batch's ([n, ...] each)
    in order, on every process (e.g. CoFT+'s keys and their image indices before they enter the
    queue). Plain run: the parts themselves."""
    if not sharding():
        return parts
    n = global_batch(len(parts[0]))[0]
    return tuple(gather_in_order(p, n) for p in parts)


def from_rank0(t):
    """Rank 0's tensor on every process (e.g. a selection computed on each process's GPU, where
    a kernel's atomics may round differently). Plain run: t."""
    if not sharding():
        return t
    t_comm = t.to(comm_device()).contiguous()
    dist.broadcast(t_comm, 0)
    return t_comm.to(t.device)


def across_processes(share):
    """A loss term of the global batch from each process's share (global_mean_shares): their mean over
    processes, the same number on every process. Plain run: share."""
    if not sharding():
        return share
    share = share.clone()
    dist.all_reduce(share)
    return share / dist.get_world_size()


@torch.no_grad()
def sync_buffers(model):
    """Every buffer as rank 0 has it (BatchNorm statistics without SyncBN differ between
    processes), before an evaluation or a checkpoint."""
    if sharding():
        for b in model.buffers():
            dist.broadcast(b, 0)



# -----------------------------------------------------------------------------
# The loop's data parallel step


# DDP's switch for broadcasting buffers before every forward (renamed in PyTorch 2.15)
NO_BUFFER_SYNC = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
    torch.nn.parallel.DistributedDataParallel.__init__).parameters else "broadcast_buffers": False}


class Step(torch.nn.Module):
    """A stage's step as a module, for DDP: forward(batch, draws) = step_fn(model, batch, draws)."""

    def __init__(self, model, step_fn):
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch, draws):
        return self.step_fn(self.model, batch, draws)


def data_parallel(model, step_fn, device):
    """The step fit runs under torchrun: the whole step as one DDP forward (DDP needs its forward
    to see every step), which averages the gradients in backward. Buffers are not broadcast at
    every step (a CoFT+ queue is no BatchNorm statistic: every process updates it identically);
    once per epoch all are made rank 0's (sync_buffers)."""
    wrapped = torch.nn.parallel.DistributedDataParallel(
        Step(model, step_fn), device_ids=[device.index] if torch.device(device).type == "cuda" else None,
        **NO_BUFFER_SYNC)
    return lambda _, batch, draws: wrapped(batch, draws)


# -----------------------------------------------------------------------------
# Who reports a failure (runs.run_cli)


def notice_key(rank):
    return f"failed/{rank}"  # in the job's store (torchrun's, which outlives the processes)


def leave_failure_notice():
    if distributed():
        try:
            dist.distributed_c10d._get_default_store().set(notice_key(dist.get_rank()), "1")
        except Exception:  # the store has gone with the process that held it: the job is ending anyway
            pass


def peer_failed():
    """Whether another process of this job has left a failure notice (read at once, no waiting).
    An unreachable store means its host process, a peer, has gone."""
    if not distributed():
        return False
    try:
        store = dist.distributed_c10d._get_default_store()
        return any(store.check([notice_key(r)]) for r in range(dist.get_world_size()) if r != dist.get_rank())
    except Exception:
        return True


def rank0_says_it():
    """A process other than rank 0 met an error that rank 0 meets too: wait until rank 0 has
    printed it (its failure notice), or until torchrun stops this process once rank 0 has
    exited. True once rank 0 has said it; False only if rank 0 did not meet it within the
    process group's timeout (then this process says it, named: one line all the same)."""
    if not distributed():  # before the job is formed (the flags): torchrun stops us after rank 0 exits
        threading.Event().wait()
    try:
        dist.distributed_c10d._get_default_store().wait([notice_key(0)], dist.default_pg_timeout)
        return True
    except dist.DistStoreError:  # the wait timed out
        return False
    except Exception:  # the store went with its host, rank 0, which has spoken
        return True
