"""
What every method's run shares (coft.py now; craft.py and vecaf.py use the same pieces): checked
flags, seeded loaders whose numbers do not depend on the worker count, the plain AMP training loop
with exact resume and a stop on a non-finite loss, and run folders whose saved stages are reused
only under the settings that made them. A library, not a script.

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
import json
import math
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

from clip_model import atomic_save


class RunError(Exception):
    """A problem with a run the user can fix (flags, the --out folder, a diverged loss): the CLI
    prints its one-line message, no traceback."""


# -----------------------------------------------------------------------------
# Flags: checked when parsed, before any work


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors ("error: argument --K: must be >= 1, got -1")."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


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
    in the main process, each sample's augmentation from SeededSamples."""
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(SeededSamples(dataset, seed_of(seed, "samples")), batch_size=batch,
                                       shuffle=shuffle, generator=gen, drop_last=drop_last, num_workers=workers,
                                       pin_memory=pin_memory)


# -----------------------------------------------------------------------------
# Run folders: config.json, stages/<tag>.pt and stages/<tag>.ckpt, the method's outputs


def write_json(obj, path):
    """JSON to a temporary file, then rename: a kill mid-write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
    return path


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
    if restart:
        for name in ("config.json", "metrics.json", *outputs):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "stages", ignore_errors=True)
    elif holds_run(out):
        if not (out / "config.json").exists():
            raise RunError(f"{out} has saved stages but no config.json, so they cannot be checked: "
                           f"use --restart to discard them or another --out")
        diff = differences(read_config(out), config)
        if diff:
            raise RunError(f"{out} holds a run with other settings ({'; '.join(diff[:6])}"
                           f"{'; ...' if len(diff) > 6 else ''}): continue it with its own flags "
                           f"(see its config.json), choose another --out, or add --restart to discard it")
    (out / "stages").mkdir(parents=True, exist_ok=True)
    write_json({"config": config, "how": how or {}}, out / "config.json")
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


def save_stage(out, tag, record, model_state, **extra):
    """A finished stage: its model's state dict, the record of its settings and any extras
    (e.g. the gradient-norm summary), written atomically."""
    atomic_save({"record": record, "model": model_state, **extra}, stage_path(out, tag))


def load_stage(out, tag, record):
    """A finished stage's saved dict if there is one (None otherwise); refused if its record
    differs from `record`."""
    path = stage_path(out, tag)
    if not path.exists():
        return None
    saved = read_torch(path)
    if not isinstance(saved, dict) or "model" not in saved:
        raise RunError(f"{path} is not a stage file of this code: delete it to redo that stage, or --restart")
    check_record(path, saved.get("record"), record)
    return saved


# -----------------------------------------------------------------------------
# The training loop


def amp_settings(device):
    """bf16 autocast where the GPU supports it, fp16 + GradScaler on older GPUs, fp32 on CPU."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return dict(device_type="cuda", dtype=torch.bfloat16), None
        return dict(device_type="cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    return dict(device_type="cpu", enabled=False), None


def cosine_with_warmup(step, total, warmup):
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def grad_norm_summary(norms, clip_grad):
    """What gradient clipping did in a stage: per-step total gradient norms before clipping ->
    their median and maximum, and the fraction of steps whose norm exceeded the threshold."""
    if not norms:
        return {"steps": 0}
    t = torch.tensor(norms, dtype=torch.float64)
    return {"steps": len(norms), "clip_threshold": clip_grad or None, "median_norm": t.median().item(),
            "max_norm": t.max().item(),
            "clipped_fraction": (t > clip_grad).double().mean().item() if clip_grad else 0.0}


def fit(model, step_fn, make_loader, epochs, lr, device, seed, ckpt=None, resume=False, tag="train",
        weight_decay=5e-4, momentum=0.9, warmup_epochs=1, clip_grad=0.0, log_every=20, record=None):
    """The plain loop every stage uses: SGD with momentum, per-step cosine schedule with warm-up,
    autocast (bf16 / fp16 + GradScaler / fp32), optional gradient-norm clipping, a progress line,
    and an atomic checkpoint after every epoch.

    step_fn(model, batch, generator) -> (loss, {name: value}); make_loader(epoch) -> an iterable.
    Randomness is re-seeded from (seed, epoch) at every epoch start (and each sample's
    augmentation is seeded by the loader), so a run resumed from an epoch checkpoint replays the
    same batches, augmentations and complement labels as an uninterrupted one. `record` (the
    settings that determine this stage) is stored in the checkpoint and must match on resume.
    A non-finite loss (or, without a GradScaler, gradient norm) stops training with a RunError
    naming the step; the checkpoint of the last finished epoch is left as it was.
    Returns the total gradient norm of every step, before clipping (also kept in the
    checkpoints, so a resumed run returns them all)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    amp, scaler = amp_settings(device)
    steps_per_epoch = len(make_loader(0))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, total, warmup_epochs * steps_per_epoch))
    start, norms = 0, []
    if resume and ckpt and Path(ckpt).exists():
        state = read_torch(ckpt, weights_only=False)
        check_record(ckpt, state.get("record") if isinstance(state, dict) else None, record)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, norms = state["epoch"] + 1, state["grad_norms"]
        print(f"{tag}: resumed from {ckpt} after epoch {start}", flush=True)
    model.train()
    t0, seen = time.time(), 0
    for epoch in range(start, epochs):
        torch.manual_seed(seed_of(seed, epoch))
        gen = torch.Generator().manual_seed(seed_of(seed, epoch, "step"))
        epoch_norms = []  # kept on the device until the epoch ends: no host sync per step for these
        for i, batch in enumerate(make_loader(epoch)):
            batch = [b.to(device, non_blocking=True) if torch.is_tensor(b) else b for b in batch]
            with torch.autocast(**amp):
                loss, terms = step_fn(model, batch, gen)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            # the total norm before clipping; max_norm = inf measures without rescaling
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or float("inf")).detach()
            epoch_norms.append(norm)
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
            seen += len(batch[0])
            if log_every and (step % log_every == 0 or step == total):
                el = time.time() - t0
                rate = seen / el
                eta = el / max(step - start * steps_per_epoch, 1) * (total - step)
                extra = " ".join(f"{k} {float(v):.3f}" for k, v in terms.items())
                print(f"{tag} ep {epoch + 1}/{epochs} step {step}/{total} loss {loss.item():.3f} {extra} "
                      f"grad norm {norm.item():.2f} lr {sched.get_last_lr()[0]:.2e} {rate:.0f} img/s "
                      f"eta {eta:.0f}s", flush=True)
        norms += torch.stack(epoch_norms).float().cpu().tolist() if epoch_norms else []
        if ckpt:
            atomic_save({"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                         "record": record, "grad_norms": norms}, ckpt)
    model.eval()
    return norms
