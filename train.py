"""
What every method's run shares (coft.py, craft.py, vecaf.py and the stand-in's pretraining call
these instead of copying them): checked flags, seeded loaders whose numbers do not depend on the
worker count, the evaluation pass, one precision setting, the plain AMP training loop with exact
resume and a stop on a non-finite loss, run folders whose saved stages are reused only under the
settings that made them, and the results table. A library, not a script; it imports nothing from
the project, and every function takes explicit values (never a method's parsed flags).

The rule for run folders (README, "Runs and resuming"):
  * --out holds one run. config.json records its settings (every flag that can change a number,
    plus fingerprints of the data and the backbone); stages/<tag>.pt is a finished stage and
    stages/<tag>.ckpt its last epoch checkpoint, each carrying the *record* of the settings that
    determine it.
  * A folder that holds a run is never written to by another run: without --resume it is refused;
    with --resume its config.json must equal the new settings (else one line lists what differs),
    and every stage file or checkpoint is used only if its record matches.
  * --restart discards the folder's run (config, stages, outputs) and starts over.
"""
import argparse
import inspect
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist



class RunError(Exception):
    """A problem with a run the user can fix (flags, the --out folder, a diverged loss): the CLI
    prints its one-line message, no traceback."""


# -----------------------------------------------------------------------------
# Flags: checked when parsed, before any work


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors ("error: argument --K: must be >= 1, got -1")."""

    def error(self, message):
        if launched_rank()[0] == 0 or not rank0_says_it():  # torchrun: every process parses the same flags
            print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def error_line(e):
    """A CLI's one-line message for an error the user can fix. Raised in a DataLoader worker, the
    message carries the worker's traceback: its last line is the error itself."""
    return str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")


def number(kind=float, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` within [low, high] (open ends where asked), else a clear message."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low)) \
                or (high is not None and (x >= high if high_open else x > high)):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(s for s in (lo, hi) if s)}, got {text}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def run_flags(p):
    """The flags every method's CLI has, with the same meaning: where and how a run goes."""
    a = p.add_argument
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--precision", default="auto", choices=PRECISIONS,
      help="auto: bf16 autocast on GPUs that support it, fp16 + loss scaling on older GPUs, fp32 on CPUs; "
           "bf16 on a CPU is opt-in (fast with AVX512-BF16/AMX, and it changes the numbers)")
    a("--workers", type=number(int, 0), default=None, help="DataLoader workers (default: 8 on CUDA, 0 on CPU)")
    a("--resume", action="store_true",
      help="continue the run in --out (same flags): finished stages are reused, the last epoch checkpoint resumed")
    a("--restart", action="store_true", help="discard the run in --out (config, stages, results) and start over")
    a("--log-every", type=number(int, 0), default=20, help="progress line every N steps (0: none)")
    a("--eval-batch", type=number(int, 1), default=256,
      help="evaluation batch per process (never changes a number)")


def default_workers(device):
    """--workers left out: 8 loader processes feeding a GPU, none on a CPU (the main process
    decodes while the CPU also computes)."""
    return min(8, os.cpu_count() or 1) if str(device).startswith("cuda") else 0


# -----------------------------------------------------------------------------
# Seeds and loaders


def seed_of(*keys):
    """A random stream's seed from (run seed, stage, epoch, ...): ints and strings mixed by a
    fixed polynomial hash (strings by CRC-32, never Python's per-process hash), so each stage,
    branch, epoch, cycle and sample draws its own stream and a rerun draws the same one."""
    h = 0
    for k in keys:
        k = zlib.crc32(k.encode()) if isinstance(k, str) else int(k)
        h = (h * 1_000_003 + k + 1) % (1 << 63)
    return h


class SeededSamples(torch.utils.data.Dataset):
    """Sample i of `dataset` drawn with the global torch RNG seeded from (seed, i) and restored
    afterwards: every random augmentation is a function of (stream seed, sample index) alone, the
    same in the main process and in any DataLoader worker, so results do not depend on --workers
    (nor, later, on the number of processes)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            # the CPU generator only (augmentations run on the CPU): torch.manual_seed would also queue
            # a CUDA seeding, recording a stack trace on every call (~0.1 ms) while CUDA is not initialised
            torch.default_generator.manual_seed(seed_of(self.seed, i))
            return self.dataset[i]


def loader(dataset, batch, seed, shuffle=False, workers=0, pin_memory=False, drop_last=False):
    """A DataLoader whose order and augmentations depend only on `seed` (give each stage, branch,
    epoch and cycle its own, e.g. seed_of(run_seed, tag, epoch)): the order comes from a generator
    in the main process, each sample's augmentation from SeededSamples. `batch` is the global
    batch: under torchrun each process loads its slice of it (ShardedBatches)."""
    gen = torch.Generator().manual_seed(seed)
    samples = SeededSamples(dataset, seed_of(seed, "samples"))
    if sharding():  # torchrun: this process's slice of each of the same global batches
        return torch.utils.data.DataLoader(samples, batch_sampler=ShardedBatches(
            len(dataset), batch, shuffle, drop_last, gen, *world()), generator=gen, num_workers=workers,
            pin_memory=pin_memory)
    return torch.utils.data.DataLoader(samples, batch_size=batch, shuffle=shuffle, generator=gen, drop_last=drop_last,
                                       num_workers=workers, pin_memory=pin_memory)


@torch.no_grad()
def predict(fn, loader, device, amp):
    """The evaluation pass: fn applied to every batch of an (x, y, index) loader under autocast,
    outputs in fp32 on the CPU, concatenated in the loader's order -> (outputs [N, ...], labels [N])."""
    outs, ys = [], []
    for x, y, _ in loader:
        with torch.autocast(**amp):
            outs.append(fn(x.to(device, non_blocking=True)).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


# -----------------------------------------------------------------------------
# Many processes (torchrun): PyTorch's own distributed data parallel. A plain `python` run is one
# process, initialises nothing and takes none of these paths; under torchrun every process runs
# the same program on its share of each batch and of each evaluation pass (README, "Many GPUs").


def distributed():
    """True under torchrun (the process group is initialised), also with a single process."""
    return dist.is_available() and dist.is_initialized()


def world():
    """(rank, number of processes): (0, 1) unless torch.distributed is initialised (torchrun)."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def start_processes(device):
    """Join the torchrun job this process belongs to, if any (torchrun sets RANK, WORLD_SIZE,
    LOCAL_RANK and the rendezvous address): NCCL for GPUs, each process on the GPU of its local
    rank; gloo on CPUs. Processes other than rank 0 print nothing on stdout (rank 0 speaks for
    all; errors still go to stderr). Returns the device this process computes on."""
    device = torch.device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or distributed():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if device.index is not None and int(os.environ["WORLD_SIZE"]) > 1:
            raise RunError(f"--device {device} under torchrun: each process uses the GPU of its local rank, "
                           f"give --device cuda (pick GPUs with CUDA_VISIBLE_DEVICES)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def end_processes():
    if distributed():
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


def global_mean(local_mean, b, n=None):
    """A loss that is the mean over this process's slice of b samples -> its share of the mean
    over the *global* batch of n (global_batch if not given): local_mean * b * W / n. DDP
    averages the W processes' gradients, so the step follows the gradient of the global batch
    mean, also when a short last batch does not split evenly (fit reports the mean of the shares
    over processes: the global loss). Plain run: local_mean itself, bit for bit."""
    if not sharding():
        return local_mean
    n = n or global_batch(b)[0]
    return local_mean * (b * dist.get_world_size() / n)


def gather_batch(part, n=None):
    """This process's slice of a batch [b, ...] -> the whole global batch of n (global_batch if
    not given) [n, ...] in order, on every process (e.g. CoFT+'s keys before they enter the
    queue). Plain run: part."""
    if not sharding():
        return part
    return gather_in_order(part, n or global_batch(len(part))[0])


def from_rank0(t):
    """Rank 0's tensor on every process (e.g. a selection computed on each process's GPU, where
    a kernel's atomics may round differently). Plain run: t."""
    if not sharding():
        return t
    t_comm = t.to(comm_device()).contiguous()
    dist.broadcast(t_comm, 0)
    return t_comm.to(t.device)


class ShardedBatches(torch.utils.data.Sampler):
    """The batches of a DataLoader(batch_size=batch, shuffle, drop_last, generator) cut for
    process `rank` of W: the global order is the one a plain run draws (one randperm from the
    loader's generator, drawn after the DataLoader's own base seed as RandomSampler does), each
    global batch is split by `shard` into contiguous slices. So the order depends only on the
    seed, never on W, and a run resumed with another number of processes replays the same
    global batches."""

    def __init__(self, n, batch, shuffle, drop_last, generator, rank, world_size):
        self.n, self.batch, self.shuffle, self.drop_last = n, batch, shuffle, drop_last
        self.generator, self.rank, self.world_size = generator, rank, world_size
        sizes = [batch] * (n // batch) + ([n % batch] if n % batch and not drop_last else [])
        if sizes and min(sizes) < world_size:
            raise RunError(f"a batch of {min(sizes)} images cannot be split over {world_size} processes (each needs "
                           f"at least one): use fewer processes or a --batch that leaves a larger last batch of {n}")

    def __len__(self):
        return self.n // self.batch if self.drop_last else -(-self.n // self.batch)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist() if self.shuffle else list(range(self.n))
        for b in range(len(self)):
            full = order[b * self.batch:(b + 1) * self.batch]
            part = shard(len(full), self.rank, self.world_size)
            yield full[part.start:part.stop]


def accuracy(scores, y):
    """Top-1 accuracy in % of scores [N, C] (logits or probabilities) against labels [N]."""
    return 100.0 * (scores.argmax(1) == y).float().mean().item()


def logistic_regression(f, y, classes, steps=500, lr=0.05, weight_decay=1e-4, scale=10.0):
    """The linear-probe reference: multinomial logistic regression on unit-norm features f [N, D]
    with labels y [N], full batch, Adam (`scale`: unit-norm features need larger logits).
    Returns a function features -> logits [M, classes]."""
    head = torch.nn.Linear(f.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(f * scale), y).backward()
        opt.step()
    head.requires_grad_(False)
    return lambda g: head(g * scale)


# -----------------------------------------------------------------------------
# Run folders: config.json, stages/<tag>.pt and stages/<tag>.ckpt, the method's outputs


@dataclass
class RunContext:
    """Where and how a run computes, made once by a method's `prepare`; each method's dataclass
    (coft.Run, craft.Setup, vecaf.Setup) adds what its own stages share."""
    out: Path  # the run folder
    config: dict  # every setting that can change a number (config.json)
    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    amp: dict  # its torch.autocast arguments (for the evaluation passes; fit makes its own)
    seed: int
    workers: int
    eval_batch: int
    log_every: int
    resume: bool  # continue the stages and epoch checkpoints saved in out

    def loader(self, dataset, batch, key=(), shuffle=False, drop_last=False):
        """`loader` with the stream seed seed_of(--seed, *key): each stage, branch, epoch and cycle
        passes its own key, so a resumed run replays exactly the batches of an uninterrupted one,
        no two stages share a stream, and the numbers do not depend on --workers."""
        return loader(dataset, batch, seed_of(self.seed, *key), shuffle, self.workers, self.device.type == "cuda",
                      drop_last)

    def scores(self, fn, dataset):
        """The evaluation pass: fn over a dataset in eval batches -> outputs [N, ...] (fp32, CPU).
        Under torchrun each process scores its contiguous shard and every process gets all N
        outputs back in index order (the passes are deterministic: the test transform)."""
        if not sharding():
            return predict(fn, self.loader(dataset, self.eval_batch), self.device, self.amp)[0]
        mine = shard(len(dataset), *world())
        # an empty shard (fewer items than processes) scores one item for the output's shape, then none
        part = torch.utils.data.Subset(dataset, mine if len(mine) else range(1))
        with single_process():  # the shard is loaded whole, in eval batches of --eval-batch per process
            out = predict(fn, own_share(self.loader(part, self.eval_batch)), self.device, self.amp)[0][:len(mine)]
        return gather_in_order(out, len(dataset))


def run_cli(body, errors, interrupted=""):
    """A CLI's body run the same way in every method: an error the user can fix (one of `errors`)
    prints its one line and exits 2, never a traceback; Ctrl-C prints `interrupted` (where the
    saved work is) and exits 130.
    Under torchrun an error ends the whole job (torchrun stops every process once one exits) with
    one line, and what the error is decides who prints it, never timing:
      * an error every process meets by construction (the flags, the run folder, the config and
        stage checks, a non-finite loss of the global batch: each process checks the same
        values) is printed by rank 0. Another process that meets it first waits for rank 0 to
        say it (rank 0's failure notice), then exits silently: exiting at once would let
        torchrun stop rank 0 before it speaks;
      * an error met reading this process's own share of the data (an unreadable image in its
        shard; `own_share` marks it) is printed by this process, named `error (process R of N)`.
    A failing process leaves its notice after printing and before it exits, so a peer whose
    collective then breaks ("connection closed by peer") knows the failure was reported and
    exits without a traceback of its own."""
    try:
        result = body()
        end_processes()
        return result
    except errors as e:
        rank, world_size = launched_rank()
        if world_size > 1 and getattr(e, "own_share", False):
            print(f"error (process {rank} of {world_size}): {error_line(e)}", file=sys.stderr, flush=True)
        elif rank == 0 or not rank0_says_it():
            print(f"error{f' (process {rank} of {world_size})' if rank else ''}: {error_line(e)}", file=sys.stderr,
                  flush=True)
        leave_failure_notice()
        sys.exit(2)
    except Exception as e:
        if peer_failed():  # our collective broke because a peer left: it has said why
            sys.exit(2)
        leave_failure_notice()
        if isinstance(e, dist.DistError):  # no peer said why (killed, or silent past the timeout)
            rank, world_size = launched_rank()
            print(f"error (process {rank} of {world_size}): the processes lost contact ({type(e).__name__}: "
                  f"{error_line(e)})", file=sys.stderr, flush=True)
            sys.exit(2)
        raise  # a fault of this process, with its traceback
    except KeyboardInterrupt:
        if launched_rank()[0] == 0:  # Ctrl-C reaches every process of a torchrun job
            print(f"\ninterrupted{interrupted}", file=sys.stderr)
        sys.exit(130)


def own_share(batches):
    """Iterate a loader over this process's own share of the data (under torchrun): an error
    raised while reading it (an unreadable image) is marked as this process's alone, for
    run_cli to report it named. Errors of the loop's body pass unmarked."""
    try:
        yield from batches
    except Exception as e:
        e.own_share = True
        raise


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


def launched_rank():
    """(rank, number of processes) as torchrun set them, also before the process group starts."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a kill mid-write leaves the previous file intact.
    Under torchrun only rank 0 writes (every process holds the same state)."""
    path = Path(path)
    if world()[0] != 0:
        return
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_text(text, path):
    """Text to a temporary file, then rename: a kill mid-write leaves the previous file intact.
    Under torchrun only rank 0 writes."""
    path = Path(path)
    if world()[0] != 0:
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(obj, path):
    """JSON, written atomically (write_text)."""
    return write_text(json.dumps(obj, indent=1, ensure_ascii=False), path)


def stage_path(out, tag):
    return Path(out) / "stages" / f"{tag}.pt"


def ckpt_path(out, tag):
    return Path(out) / "stages" / f"{tag}.ckpt"


def holds_run(out):
    out = Path(out)
    return (out / "config.json").exists() or (out / "metrics.json").exists() or \
        ((out / "stages").is_dir() and any((out / "stages").iterdir()))


def check_out(out, resume, restart):
    """The cheap checks on --out, made before anything is loaded: it must be a folder (or not
    exist), and a folder holding a run is only continued (--resume) or discarded (--restart)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder: give a folder path")
    if holds_run(out) and not (resume or restart):
        raise RunError(f"--out {out} holds a run already: add --resume to continue it (same flags), --restart to "
                       f"discard it and start over, or choose another --out")


def differences(saved, now):
    """'key: saved -> now' for every key whose value differs (or exists on one side only)."""
    def shown(d, k):
        return repr(d[k]) if k in d else "(none)"
    return [f"{k}: {shown(saved, k)} -> {shown(now, k)}" for k in sorted(set(saved) | set(now))
            if k not in saved or k not in now or saved[k] != now[k]]


def read_config(out):
    path = Path(out) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {path} ({type(e).__name__}): use --restart to discard the run "
                       f"or another --out") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise RunError(f"{path} is not a run config of this code: use --restart to discard the run or another --out")
    return saved["config"]


def open_run(out, config, resume, restart, outputs=(), how=None):
    """Make --out the folder of the run `config` (a JSON-able dict of every setting that can
    change a number), after the cheap checks of check_out:
      --restart: delete config.json, stages/ and `outputs` (the method's result files), start over;
      --resume of a folder holding a run: its config.json must equal `config`, else one line
        lists what differs;
    then write config.json (`how`: settings that do not change numbers, e.g. workers, for the
    record only). Returns the folder."""
    out = Path(out)
    check_out(out, resume, restart)
    if not restart and holds_run(out):
        if not (out / "config.json").exists():
            raise RunError(f"{out} has saved stages but no config.json, so they cannot be checked: "
                           f"use --restart to discard them or another --out")
        diff = differences(read_config(out), config)
        if diff:
            raise RunError(f"{out} holds a run with other settings ({'; '.join(diff[:6])}"
                           f"{'; ...' if len(diff) > 6 else ''}): continue it with its own flags "
                           f"(see its config.json), choose another --out, or add --restart to discard it")
    barrier()  # torchrun: every process has checked the folder before rank 0 changes it
    if world()[0] == 0:
        if restart:
            for name in ("config.json", "metrics.json", *outputs):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "stages", ignore_errors=True)
        (out / "stages").mkdir(parents=True, exist_ok=True)
        write_json({"config": config, "how": how or {}}, out / "config.json")
    barrier()  # ... and no process reads a stage before rank 0 has deleted it (--restart)
    return out


def read_torch(path, weights_only=True):
    """torch.load with a one-line error naming the file (truncated, not a torch file, ...)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        first_line = (str(e).strip().splitlines() or ["empty"])[0][:80]
        raise RunError(f"cannot read {path} ({type(e).__name__}: {first_line}); "
                       f"the file is damaged: delete it to redo that stage, or --restart") from None


def check_record(path, saved, record):
    """A stage file or checkpoint is used only under the settings that made it."""
    diff = differences(saved or {}, record)
    if diff:
        raise RunError(f"{path} was made with other settings ({'; '.join(diff[:6])}): it cannot be reused; "
                       f"use another --out or --restart")


def load_stage(out, tag, record, model, missing=None):
    """Stage `tag` from --out, if it finished before: its weights are loaded into `model` and its
    saved extras returned (e.g. the gradient-norm summary). None where the stage has to be
    trained, unless `missing` says why it must exist (then a RunError with that reason). A stage
    file whose record differs from `record` is refused."""
    path = stage_path(out, tag)
    if not path.exists():
        if missing:
            raise RunError(f"{path} not found: {missing}")
        return None
    saved = read_torch(path)
    if not isinstance(saved, dict) or "model" not in saved:
        raise RunError(f"{path} is not a stage file of this code: delete it to redo that stage, or --restart")
    check_record(path, saved.get("record"), record)
    model.load_state_dict(saved.pop("model"))
    saved.pop("record")
    return saved


def save_stage(out, tag, record, model, **extras):
    """A finished stage: its model's state dict, the record of its settings and `extras`,
    written atomically; its epoch checkpoint, superseded, is deleted. Returns `extras`."""
    atomic_save({"record": record, "model": model.state_dict(), **extras}, stage_path(out, tag))
    if world()[0] == 0:
        ckpt_path(out, tag).unlink(missing_ok=True)
    return extras


# -----------------------------------------------------------------------------
# Precision and the training loop


def resolve_precision(device, precision="auto"):
    """--precision for a device: auto -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on
    CPUs (bf16 on a CPU changes the numbers, so it is asked for, never chosen)."""
    device = torch.device(device)
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise RunError("--precision fp16 needs a GPU (fp16 autocast with loss scaling): use bf16 or fp32 on a CPU")
    if precision not in PRECISIONS:
        raise RunError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def amp_settings(device, precision="auto"):
    """(torch.autocast keyword arguments, GradScaler or None) for a precision: fp32 runs without
    autocast; bf16 autocasts matrix products to bf16 (same exponent range as fp32: no scaler);
    fp16 autocasts with a GradScaler against underflowing gradients. The parameters stay fp32
    either way, and every similarity logit is computed in fp32 (clip_model.similarity)."""
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return dict(device_type=device.type, enabled=False), None
    if precision == "bf16":
        return dict(device_type=device.type, dtype=torch.bfloat16), None
    return dict(device_type=device.type, dtype=torch.float16), torch.amp.GradScaler(device.type)


def sgd(model, lr, momentum=0.9, weight_decay=5e-4):
    """SGD with momentum over the model's trainable parameters (both CoFT phases)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def cosine_with_warmup(step, total, warmup):
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def warmup_epochs_then_cosine(warmup_epochs):
    """fit's schedule: linear warm-up over whole epochs, then cosine decay to 0 (per step)."""
    def schedule(step, total, steps_per_epoch):
        return cosine_with_warmup(step, total, warmup_epochs * steps_per_epoch)
    return schedule


def grad_norm_summary(norms, clip_grad):
    """What gradient clipping did in a stage: per-step total gradient norms before clipping ->
    their median and maximum, and the fraction of steps whose norm exceeded the threshold."""
    if not norms:
        return {"steps": 0}
    t = torch.tensor(norms, dtype=torch.float64)
    return {"steps": len(norms), "clip_threshold": clip_grad or None, "median_norm": t.median().item(),
            "max_norm": t.max().item(),
            "clipped_fraction": (t > clip_grad).double().mean().item() if clip_grad else 0.0}


# DDP's switch for broadcasting buffers before every forward (renamed in PyTorch 2.15)
NO_BUFFER_SYNC = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
    torch.nn.parallel.DistributedDataParallel.__init__).parameters else "broadcast_buffers": False}


class Step(torch.nn.Module):
    """A stage's step as a module, for DDP: forward(batch, generator) = step_fn(model, batch, generator)."""

    def __init__(self, model, step_fn):
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch, generator):
        return self.step_fn(self.model, batch, generator)


def across_processes(share):
    """A loss term of the global batch from each process's share (global_mean): their mean over
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


def fit(model, step_fn, make_loader, epochs, opt, schedule, device, seed, precision="auto", clip_grad=0.0,
        ckpt=None, resume=False, record=None, tag="train", log_every=20, after_epoch=None):
    """The plain loop every stage uses: a per-step LR schedule, autocast at `precision`, optional
    gradient-norm clipping, a progress line, and an atomic checkpoint after every epoch.

    step_fn(model, batch, generator) -> (loss, {name: value}) is the stage's loss, written where
    the stage is; make_loader(epoch) -> an iterable of batches with a length; opt: an optimizer
    over the parameters to train (e.g. sgd(model, lr)); schedule(step, total_steps,
    steps_per_epoch) -> LR multiplier (e.g. warmup_epochs_then_cosine(1)).
    Randomness is re-seeded from (seed, epoch) at every epoch start (and each sample's
    augmentation is seeded by the loader), so a run resumed from an epoch checkpoint replays the
    same batches, augmentations and complement labels as an uninterrupted one. `record` (the
    settings that determine this stage) is stored in the checkpoint and must match on resume.
    A non-finite loss (or, without a GradScaler, gradient norm) stops training with a RunError
    naming the step; the checkpoint of the last finished epoch is left as it was.
    after_epoch(epoch, model) -> a JSON-able value (e.g. an evaluation; the model is in eval mode
    while it runs), called after every epoch and collected in history["after_epoch"].
    Returns {"loss": [...], "grad_norm": [...], "after_epoch": [...]} for every step (norms before
    clipping) and epoch, also kept in the checkpoints, so a resumed run returns them all."""
    params = [p for group in opt.param_groups for p in group["params"]]
    amp, scaler = amp_settings(device, precision)
    steps_per_epoch = len(make_loader(0))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, total, steps_per_epoch))
    start, history = 0, {"loss": [], "grad_norm": [], "after_epoch": []}
    if resume and ckpt and Path(ckpt).exists():
        state = read_torch(ckpt, weights_only=False)
        check_record(ckpt, state.get("record") if isinstance(state, dict) else None, record)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if "history" not in state:
            raise RunError(f"{ckpt} is an epoch checkpoint of an earlier version of this code: delete it to redo "
                           f"that stage, or --restart")
        start, history = state["epoch"] + 1, state["history"]
        print(f"{tag}: resumed from {ckpt} after epoch {start}", flush=True)
    # torchrun: DDP runs the whole step as one forward (it needs its forward to see every step),
    # averages the gradients in backward, and the losses are global-batch means (global_mean).
    # Buffers are not broadcast at every step (a CoFT+ queue is no BatchNorm statistic: every
    # process updates it identically); once per epoch all are made rank 0's (sync_buffers).
    ddp = torch.nn.parallel.DistributedDataParallel(
        Step(model, step_fn), device_ids=[device.index] if torch.device(device).type == "cuda" else None,
        **NO_BUFFER_SYNC) if sharding() else None
    model.train()
    t0, seen = time.time(), 0
    for epoch in range(start, epochs):
        torch.manual_seed(seed_of(seed, epoch))
        gen = torch.Generator().manual_seed(seed_of(seed, epoch, "step"))
        losses, norms = [], []  # kept on the device until the epoch ends: no host sync per step for these
        batches = make_loader(epoch)
        for i, batch in enumerate(own_share(batches) if ddp else batches):  # torchrun: this process's slices
            batch = [b.to(device, non_blocking=True) if torch.is_tensor(b) else b for b in batch]
            with torch.autocast(**amp):
                loss, terms = ddp(batch, gen) if ddp else step_fn(model, batch, gen)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            # the total norm before clipping; max_norm = inf measures without rescaling
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or float("inf")).detach()
            # the global batch's loss (each process holds its share, global_mean)
            loss = across_processes(loss.detach().float())
            losses.append(loss)
            norms.append(norm)
            step = epoch * steps_per_epoch + i + 1
            # one host sync per step, before the update: a NaN must never reach the weights. With a
            # GradScaler non-finite gradients are expected now and then (it skips those steps).
            finite = torch.isfinite(loss.detach()) if scaler is not None else \
                torch.isfinite(loss.detach()) & torch.isfinite(norm)
            if not finite:
                last = f"the last good checkpoint is {ckpt} (epoch {epoch})" if ckpt and epoch > 0 else \
                    "no epoch had finished, so there is no checkpoint"
                raise RunError(f"{tag}: non-finite loss {loss.item():.4g} (gradient norm {norm.item():.4g}) at step "
                               f"{step} of {total} (epoch {epoch + 1}); stopped, {last}: lower the learning rate "
                               f"or check the temperatures")
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            seen += len(batch[0]) * world()[1]
            if log_every and (step % log_every == 0 or step == total):
                terms = {k: across_processes(torch.as_tensor(v, dtype=torch.float32, device=loss.device))
                         for k, v in terms.items()}
                el = time.time() - t0
                rate = seen / el
                eta = el / max(step - start * steps_per_epoch, 1) * (total - step)
                extra = " ".join(f"{k} {float(v):.3f}" for k, v in terms.items())
                print(f"{tag} ep {epoch + 1}/{epochs} step {step}/{total} loss {loss.item():.3f} {extra} "
                      f"grad norm {norm.item():.2f} lr {sched.get_last_lr()[0]:.2e} {rate:.0f} img/s "
                      f"eta {eta:.0f}s", flush=True)
        if norms:
            history["loss"] += torch.stack(losses).cpu().tolist()
            history["grad_norm"] += torch.stack(norms).float().cpu().tolist()
        sync_buffers(model)
        if after_epoch is not None:
            model.eval()
            history.setdefault("after_epoch", []).append(after_epoch(epoch, model))
            model.train()
        if ckpt:
            atomic_save({"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                         "record": record, "history": history}, ckpt)
    model.eval()
    return history


# -----------------------------------------------------------------------------
# Results: metrics.json and the table of runs


def finish_run(out, metrics, predictions, t0):
    """A run's result files, each written atomically: predictions.pt, then metrics.json (last:
    it marks a finished run), with the total time. Returns metrics."""
    metrics.setdefault("time_s", {})["total"] = time.time() - t0
    atomic_save(predictions, Path(out) / "predictions.pt")
    write_json(metrics, Path(out) / "metrics.json")
    print("metrics: " + json.dumps({k: v for k, v in metrics.items() if k.endswith("acc")}), flush=True)
    return metrics


def cell(x, sd=None):
    """A table cell: '-' for nothing, 'a/b' for a pair, one decimal, '±sd' where given."""
    if x is None or x == []:
        return "-"
    if isinstance(x, list):
        return "/".join(cell(v) for v in x)
    if isinstance(x, int):  # counts (queries, shots)
        return str(x)
    return f"{x:.1f}" + ("" if sd is None else f"±{sd:.1f}")


def table(run_dirs, summarise):
    """One line per run (summarise(metrics.json's dict) -> {column: number, pair or None}), then,
    for runs named <name>-s<seed>, one line per name with the mean and sd over seeds (a pair
    counts as its mean)."""
    runs, groups = [], {}
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.exists():
            print(f"{d}: no metrics.json (unfinished run)")
            continue
        try:
            m = json.loads(path.read_text())
            summary = summarise(m)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise RunError(f"{path} is damaged or not from a finished run of this code ({type(e).__name__}: "
                           f"{str(e)[:60]}): rerun it with --resume, or leave it out of --table") from None
        name = Path(d).name
        runs.append((name, m.get("method", "?"), summary))
        groups.setdefault(re.sub(r"-s\d+$", "", name), []).append(summary)
    cols = list(runs[0][2]) if runs else []
    rows = [("run", "method", *cols)] + [(n, meth, *(cell(v) for v in s.values())) for n, meth, s in runs]
    if any(len(g) > 1 for g in groups.values()):
        rows.append(("", "", *[""] * len(cols)))
        rows.append(("mean±sd over seeds", "n", *cols))
        for name, g in groups.items():
            cells = []
            for c in cols:
                vals = [sum(v) / len(v) if isinstance(v, list) and v else v for v in (r[c] for r in g)]  # pairs: mean
                vals = [v for v in vals if v is not None and v != []]
                t = torch.tensor(vals, dtype=torch.float64)
                cells.append(cell(t.mean().item(), t.std().item() if len(vals) > 1 else None) if vals else "-")
            rows.append((name, str(len(g)), *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows[1:] else []
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
