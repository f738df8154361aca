"""
The training loop every method uses, and what it stands on: seeded loaders whose batches and
augmentations depend only on (seed, stage, epoch), never on the worker or process count; the
evaluation pass; one precision setting; SGD and its schedule; and `fit`, whose plain step
(forward, loss, backward, clip, update) reads in one screen, with resume, the stop on a
non-finite loss, torchrun and logging around it. Imports nothing of the project but ddp.py, the
torchrun plumbing that the loop keeps away from the methods' equations.
"""
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

import ddp


class RunError(Exception):
    """A problem with a run the user can fix (flags, the --out folder, a diverged loss): the CLI
    prints its one-line message, no traceback."""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def default_workers(device):
    """--workers left out: 8 loader processes feeding a GPU, none on a CPU (the main process
    decodes while the CPU also computes)."""
    return min(8, os.cpu_count() or 1) if str(device).startswith("cuda") else 0


# -----------------------------------------------------------------------------
# Seeds, loaders and the evaluation pass


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
            # a CUDA seeding while CUDA is not initialised, recording a stack trace on every call
            torch.default_generator.manual_seed(seed_of(self.seed, i))
            return self.dataset[i]


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
            raise RunError(f"a batch of {min(sizes)} of {n} images cannot be split over {world_size} processes (each "
                           f"needs at least one): use fewer processes, or more images per batch (VeCAF: a larger "
                           f"--budget; else a --batch that leaves a larger last batch)")

    def __len__(self):
        return self.n // self.batch if self.drop_last else -(-self.n // self.batch)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist() if self.shuffle else list(range(self.n))
        for b in range(len(self)):
            full = order[b * self.batch:(b + 1) * self.batch]
            part = ddp.shard(len(full), self.rank, self.world_size)
            yield full[part.start:part.stop]


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose iteration marks an error raised while reading the data (an unreadable
    image; `while_reading`), so that under torchrun runs.run_cli names the process whose share it
    was. An error of the code consuming the batches is not raised in here, and stays unmarked."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except Exception as e:
            e.while_reading = True
            raise


def loader(dataset, batch, seed, shuffle=False, workers=0, pin_memory=False, drop_last=False):
    """A DataLoader whose order and augmentations depend only on `seed` (give each stage, branch,
    epoch and cycle its own, e.g. seed_of(run_seed, tag, epoch)): the order comes from a generator
    in the main process, each sample's augmentation from SeededSamples. `batch` is the global
    batch: under torchrun each process loads its slice of it (ShardedBatches)."""
    gen = torch.Generator().manual_seed(seed)
    samples = SeededSamples(dataset, seed_of(seed, "samples"))
    if ddp.sharding():  # torchrun: this process's slice of each of the same global batches
        return Loader(samples, batch_sampler=ShardedBatches(len(dataset), batch, shuffle, drop_last, gen, *ddp.world()),
                      generator=gen, num_workers=workers, pin_memory=pin_memory)
    return Loader(samples, batch_size=batch, shuffle=shuffle, generator=gen, drop_last=drop_last, num_workers=workers,
                  pin_memory=pin_memory)


@torch.no_grad()
def predict(fn, loader, device, amp, with_labels=False):
    """The evaluation pass: fn applied to every batch of an (x, y, index) loader under autocast
    (fn(x), or fn(x, y) with_labels), outputs in fp32 on the CPU, concatenated in the loader's
    order -> (outputs [N, ...], labels [N])."""
    outs, ys = [], []
    for x, y, _ in loader:
        with torch.autocast(**amp):
            x = x.to(device, non_blocking=True)
            outs.append((fn(x, y.to(device)) if with_labels else fn(x)).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def accuracy(scores, y):
    """Top-1 accuracy in % of scores [N, C] (logits or probabilities), or of predicted labels [N],
    against labels [N]."""
    predicted = scores if scores.dim() == 1 else scores.argmax(1)
    return 100.0 * (predicted == y).float().mean().item()


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
# Precision, optimiser, schedule


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
    if precision == "bf16" and device.type == "cpu" and cpu_bf16() is False:
        raise RunError(f"--precision bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no avx512_bf16 / "
                       f"amx_bf16 / bf16 flag): its bf16 matrix products are emulated, 10-60x slower than fp32: use "
                       f"--precision fp32")
    return precision


def cpu_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU multiplies bf16 natively (x86: AVX512-BF16 or AMX-BF16; Arm: BF16), from the
    kernel's CPU flags; None where they cannot be read (not Linux): then bf16 is not refused."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


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


@dataclass(frozen=True)
class SGDRecipe:
    """How a model is fine-tuned, bar its lr and epochs: SGD with momentum and weight decay on
    batches of `batch`, a linear warm-up of `warmup_epochs` then a cosine decay per step, gradient
    norms clipped at `clip_grad` (0: off). CoFT's two phases share one; VeCAF's loops follow the
    DeiT recipe."""
    batch: int
    momentum: float
    weight_decay: float
    warmup_epochs: int
    clip_grad: float


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


# -----------------------------------------------------------------------------
# The loop


class Draws:
    """A step's per-sample randomness, from its epoch's step stream: draws(low, high) -> one
    integer in [low, high) for each of the batch's samples (e.g. complement labels). The
    integers are drawn for the whole batch of n and this process keeps its b samples' from
    `start` on (under torchrun its slice of the global batch; a plain run: start 0, b = n), so N
    processes draw what one process does."""

    def __init__(self, generator, n, start, b):
        self.generator, self.n, self.start, self.b = generator, n, start, b

    def __call__(self, low, high):
        u = torch.randint(low, high, (self.n,), generator=self.generator, device="cpu")  # [n]
        return u[self.start:self.start + self.b]


def fit(model, loss, batches, *, epochs, opt, schedule, device, seed, precision="auto", clip_grad=0.0,
        checkpoint=None, tag="train", log_every=20, evaluate=None, evaluate_at=None, max_steps=None):
    """The loop every stage trains with: `epochs` passes over batches(epoch), each step the sum of
    the terms loss(model, batch, draws) -> {name: (mean over the batch, batch size)} (draws: the
    step's per-sample randomness, Draws), under autocast at `precision`, gradients clipped at
    `clip_grad` (0: measured only), then opt's update and the schedule(step, total, steps per
    epoch)'s learning rate. An epoch checkpoint after every epoch (`checkpoint`, a
    runs.RecordedFile, or None), resumed from where one exists. Returns the losses and gradient
    norms of every step, and [step, evaluate(model)] at the steps evaluate_at(step, total) picks."""
    params = [p for group in opt.param_groups for p in group["params"]]
    amp, scaler = amp_settings(device, precision)
    steps_per_epoch = len(batches(0))
    total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
    epochs = -(-total // steps_per_epoch)  # max_steps: the last epoch cut short
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, total, steps_per_epoch))
    start, history = resume(checkpoint, model, opt, sched, scaler, tag)
    if ddp.sharding():  # torchrun: the whole step as one DDP forward, which averages the gradients in backward
        loss = ddp.data_parallel(model, loss, device)
    log = Progress(tag, epochs, total, log_every, start * steps_per_epoch)
    model.train()
    for epoch in range(start, epochs):
        # every epoch's randomness from (seed, epoch) alone, each sample's augmentation from the
        # loader's: a run resumed from a checkpoint replays the batches of an uninterrupted one
        torch.manual_seed(seed_of(seed, epoch))
        gen = torch.Generator().manual_seed(seed_of(seed, epoch, "step"))
        losses, norms, evaluated = [], [], []  # losses, norms kept on the device until the epoch ends: no sync
        for i, batch in enumerate(batches(epoch)):
            step = epoch * steps_per_epoch + i + 1
            if step > total:
                break
            batch = [b.to(device, non_blocking=True) if torch.is_tensor(b) else b for b in batch]
            draws = Draws(gen, *ddp.global_batch(len(batch[0])), len(batch[0]))  # plain run: (b, 0), no sync
            with torch.autocast(**amp):
                terms = loss(model, batch, draws)
            # torchrun: each term's share of the global batch's mean; a plain run: the means themselves
            shares = ddp.global_mean_shares(terms)
            step_loss = add(shares.values())
            opt.zero_grad(set_to_none=True)
            (scaler.scale(step_loss) if scaler else step_loss).backward()
            if scaler:
                scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or float("inf")).detach()  # inf: measure only
            step_loss = ddp.across_processes(step_loss.detach().float())  # the global batch's loss
            losses.append(step_loss)
            norms.append(norm)
            stop_unless_finite(step_loss, norm, scaler, checkpoint, tag, epoch, step, total)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            log(epoch, step, len(batch[0]), step_loss, norm, shares, sched.get_last_lr()[0])
            if evaluate is not None and evaluate_at(step, total):
                ddp.sync_buffers(model)
                model.eval()
                evaluated.append([step, evaluate(model)])
                model.train()
        if norms:
            history["loss"] += torch.stack(losses).cpu().tolist()
            history["grad_norm"] += torch.stack(norms).float().cpu().tolist()
        history["evaluated"] += evaluated
        ddp.sync_buffers(model)
        if checkpoint:  # the history too, so that a resumed run returns every step's
            checkpoint.save({"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                             "sched": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                             "history": history})
    model.eval()
    return history


def add(values):
    """The sum of the loss terms, left to right (no 0 + ...: the same float as writing a + b)."""
    values = list(values)
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def resume(checkpoint, model, opt, sched, scaler, tag):
    """(first epoch to run, history so far): (0, empty) unless resuming from an epoch checkpoint,
    whose model, optimizer, schedule and loss scaler are restored."""
    state = checkpoint.load() if checkpoint else None
    if state is None:
        return 0, {"loss": [], "grad_norm": [], "evaluated": []}
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    print(f"{tag}: resumed from {checkpoint.path} after epoch {state['epoch'] + 1}", flush=True)
    return state["epoch"] + 1, state["history"]


def stop_unless_finite(loss, norm, scaler, checkpoint, tag, epoch, step, total):
    """One host sync per step, before the update: a NaN must never reach the weights. With a
    GradScaler non-finite gradients are expected now and then (it skips those steps)."""
    finite = torch.isfinite(loss) if scaler is not None else torch.isfinite(loss) & torch.isfinite(norm)
    if not finite:
        last = f"the last good checkpoint is {checkpoint.path} (epoch {epoch})" if checkpoint and epoch > 0 else \
            "no epoch had finished, so there is no checkpoint" if checkpoint else "this loop keeps no checkpoint"
        what = "loss" if not torch.isfinite(loss) else "gradient norm"
        raise RunError(f"{tag}: non-finite {what} (loss {loss.item():.4g}, gradient norm {norm.item():.4g}) at step "
                       f"{step} of {total} (epoch {epoch + 1}); stopped, {last}: lower the learning rate "
                       f"or check the temperatures")


class Progress:
    """The progress line every log_every steps: loss, its terms, gradient norm, LR, speed, ETA."""

    def __init__(self, tag, epochs, total, log_every, first_step):
        self.tag, self.epochs, self.total, self.every, self.first = tag, epochs, total, log_every, first_step
        self.t0, self.seen = time.time(), 0

    def __call__(self, epoch, step, b, loss, norm, shares, lr):
        self.seen += b * ddp.world()[1]
        if not self.every or (step % self.every and step != self.total):
            return
        el = time.time() - self.t0
        eta = el / max(step - self.first, 1) * (self.total - step)
        extra = " ".join(f"{k} {ddp.across_processes(v.detach().float()).item():.3f}" for k, v in shares.items()
                         if len(shares) > 1)  # a loss of one term is the loss itself
        print(f"{self.tag} ep {epoch + 1}/{self.epochs} step {step}/{self.total} loss {loss.item():.3f} {extra} "
              f"grad norm {norm.item():.2f} lr {lr:.2e} {self.seen / el:.0f} img/s eta {eta:.0f}s", flush=True)


class StageCost:
    """A stage's wall time and peak memory, from its creation to record(): the GPU allocator's
    peak on CUDA; on a Linux CPU the process's peak resident set (VmHWM, reset at the start
    through /proc/self/clear_refs, so earlier stages' peaks do not count; memory the allocator
    kept from them does). Where neither can be read, the peak is None."""

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set (Linux)
            except OSError:
                pass
        self.t0 = time.time()

    def seconds(self):
        return time.time() - self.t0

    def peak_mib(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        try:
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024  # kB
        except (OSError, StopIteration, ValueError):
            return None

    def record(self, metrics, name):
        """metrics["time_s"][name] and metrics["peak_mib"][name]: numbers of the machine, not of
        the run (left out wherever runs are compared)."""
        metrics.setdefault("time_s", {})[name] = self.seconds()
        metrics.setdefault("peak_mib", {})[name] = self.peak_mib()
