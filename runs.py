"""
Run folders and the CLIs' plumbing, written once for the three methods (coft.py, craft.py,
vecaf.py), each of which calls it in one line per step: checked flags, start-up under torchrun,
one-line errors, opening or continuing a run, `Run` (what every run's stages share, and
`Run.stage`: a stage trained by train.fit, or loaded where it finished before), recording a
finished stage or an epoch checkpoint, finishing a run, and the results table. Nothing here
changes a number.

The rule for run folders (docs/runs.md):
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
import csv
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import ddp
from ddp import barrier, distributed, launched_rank, world
import train
from train import PRECISIONS, RunError, seed_of

# what every CLI reports in one line: a problem the user can fix (flags, files, the run folder), with
# the CLI's own kinds (run_cli's `errors`: data.USER_ERRORS, the data's and the backbone's)
USER_ERRORS = (RunError, OSError)
WAITING = 3  # the exit status of a run that stopped to wait for a person (Waiting)


class Waiting(Exception):
    """A run stopped, with everything so far saved, until a person does what the message says
    (VeCAF: label the images it selected). Not an error: its one line, then exit status 3."""


# -----------------------------------------------------------------------------
# Flags: checked when parsed, before any work


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors ("error: argument --K: must be >= 1, got -1")."""

    def error(self, message):
        if launched_rank()[0] == 0 or not ddp.rank0_says_it():  # torchrun: every process parses the same flags
            print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def error_line(e):
    """A CLI's one-line message for an error the user can fix. Raised in a DataLoader worker, the
    message carries the worker's traceback: its last line is the error itself."""
    return str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")


def number_type(kind=float, low=None, high=None, low_open=False, high_open=False):
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


def run_flags(p):
    """The flags every method's CLI has, with the same meaning: where and how a run goes."""
    a = p.add_argument
    a("--clip-act", default=None, choices=["quick_gelu", "gelu"],
      help="the MLP activation of a --clip (or --fft-backbone) checkpoint file whose name does not give it: the "
           "weights do not reveal it (OpenAI, MetaCLIP, DFN: quick_gelu; open_clip's LAION / DataComp: gelu)")
    a("--seed", type=number_type(int, 0, 2 ** 63 - 1), default=0, help="every random stream's root (0 .. 2^63 - 1)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--precision", default="auto", choices=PRECISIONS,
      help="auto: bf16 autocast on GPUs that support it, fp16 + loss scaling on older GPUs, fp32 on CPUs; "
           "bf16 on a CPU is opt-in (fast with AVX512-BF16 / AMX-BF16, refused without; it changes the numbers)")
    a("--workers", type=number_type(int, 0), default=None, help="DataLoader workers (default: 8 on CUDA, 0 on CPU)")
    a("--resume", action="store_true",
      help="continue the run in --out (same flags): finished stages are reused, the last epoch checkpoint resumed")
    a("--restart", action="store_true", help="discard the run in --out (config, stages, results) and start over")
    a("--log-every", type=number_type(int, 0), default=20, help="progress line every N steps (0: none)")
    a("--eval-batch", type=number_type(int, 1), default=256,
      help="evaluation batch per process (never changes a number)")



# -----------------------------------------------------------------------------
# The CLI: start-up under torchrun, one-line errors, Ctrl-C


def check_device(name):
    """--device as a torch.device that exists here, else one line (before anything is written)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RunError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise RunError(f"--device {name}: torch sees no GPU on this machine (torch.cuda.is_available() is False): "
                           f"use --device cpu")
        if device.index is not None and device.index >= n:
            raise RunError(f"--device {name}: this machine has {counted(n, 'GPU')}, cuda:0 .. cuda:{n - 1}")
    elif device.type in ("mps", "xpu"):  # Apple and Intel GPUs: only where this torch has them
        backend = getattr(torch.backends, "mps", None) if device.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise RunError(f"--device {name}: this torch sees no {device.type} device on this machine: use "
                           f"{'cuda or ' if torch.cuda.is_available() else ''}cpu")
    elif device.type != "cpu":
        raise RunError(f"--device {name}: use cpu, cuda or cuda:N")
    return device


def start_processes(device):
    """Join the torchrun job this process belongs to, if any (torchrun sets RANK, WORLD_SIZE,
    LOCAL_RANK and the rendezvous address): NCCL for GPUs, each process on the GPU of its local
    rank; gloo on CPUs. Processes other than rank 0 print nothing on stdout (rank 0 speaks for
    all; errors still go to stderr). Returns the device this process computes on, checked first
    (check_device)."""
    device = check_device(device)
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


def saved_in(out, what):
    """run_cli's Ctrl-C line for a run in `out`: where its saved `what` is and how to continue,
    or that nothing was saved yet (looked at when Ctrl-C comes)."""
    def line():
        stages = Path(out) / "stages"
        if stages.is_dir() and any(stages.iterdir()):
            return f": {what} are in {stages}; the same command with --resume continues from there"
        return ": nothing was saved yet (no stage or checkpoint had finished); the same command starts over"
    return line


def run_cli(body, interrupted="", errors=()):
    """A CLI's body run the same way in every method: an error the user can fix (USER_ERRORS, or one
    of the CLI's own `errors`) prints its one line and exits 2, never a traceback; Ctrl-C prints
    `interrupted` (where the saved work is; a function is asked at that moment, see saved_in) and
    exits 130; a run that
    stops for a person (Waiting) prints what to do next and exits 3.
    Under torchrun an error ends the whole job (torchrun stops every process once one exits) with
    one line, and what the error is decides who prints it, never timing:
      * an error every process meets by construction (the flags, the run folder, the config and
        stage checks, a non-finite loss of the global batch: each process checks the same
        values) is printed by rank 0. Another process that meets it first waits for rank 0 to
        say it (rank 0's failure notice), then exits silently: exiting at once would let
        torchrun stop rank 0 before it speaks;
      * an error met reading this process's own share of the data (an unreadable image in its
        shard; train.Loader marks it `while_reading`) is printed by this process, named `error (process R of N)`.
    A failing process leaves its notice after printing and before it exits, so a peer whose
    collective then breaks ("connection closed by peer") knows the failure was reported and
    exits without a traceback of its own."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is KeyboardInterrupt again (see the CLIs' tops)
    try:
        result = body()
        ddp.end_processes()
        return result
    except Waiting as e:  # every process stops at the same point; rank 0 says what to do next
        if launched_rank()[0] == 0:
            print(f"waiting: {e}", file=sys.stderr, flush=True)
        sys.exit(WAITING)
    except USER_ERRORS + tuple(errors) as e:
        rank, world_size = launched_rank()
        if world_size > 1 and getattr(e, "while_reading", False):
            print(f"error (process {rank} of {world_size}): {error_line(e)}", file=sys.stderr, flush=True)
        elif rank == 0 or not ddp.rank0_says_it():
            print(f"error{f' (process {rank} of {world_size})' if rank else ''}: {error_line(e)}", file=sys.stderr,
                  flush=True)
        ddp.leave_failure_notice()
        sys.exit(2)
    except Exception as e:
        if ddp.peer_failed():  # our collective broke because a peer left: it has said why
            sys.exit(2)
        ddp.leave_failure_notice()
        if isinstance(e, dist.DistError):  # no peer said why (killed, or silent past the timeout)
            rank, world_size = launched_rank()
            print(f"error (process {rank} of {world_size}): the processes lost contact ({type(e).__name__}: "
                  f"{error_line(e)})", file=sys.stderr, flush=True)
            sys.exit(2)
        if _log is not None:  # the terminal gets the traceback as Python prints it; the log a copy
            traceback.print_exc(file=_log[0])
        raise  # a fault of this process, with its traceback
    except KeyboardInterrupt:
        if launched_rank()[0] == 0:  # Ctrl-C reaches every process of a torchrun job
            print(f"\ninterrupted{interrupted() if callable(interrupted) else interrupted}", file=sys.stderr)
        sys.exit(130)
    finally:  # after the error or Ctrl-C line, which the run's log.txt keeps too
        stop_log()


class Tee:
    """A text stream that also writes everything to a log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.log.write(text)
        return self.stream.write(text)

    def flush(self):
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno, ...: the terminal's
        return getattr(self.stream, name)


_log = None  # (log file, the streams it replaced) while a run's log.txt is open


def start_log(out, continued):
    """From here on every line this process prints (stdout and stderr) also goes to out/log.txt,
    after a marker line with the time and the command; a continued run (--resume, --eval-only,
    --phase 2) appends to its log. It only writes text: no number depends on it."""
    global _log
    stop_log()
    f = open(Path(out) / "log.txt", "a", buffering=1, encoding="utf-8")  # line-buffered: a killed run keeps its lines
    f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S %Z')} {'continued' if continued else 'started'}: "
            f"{shlex.join([Path(sys.executable).name, *sys.argv])}\n")
    _log = (f, sys.stdout, sys.stderr)
    sys.stdout, sys.stderr = Tee(sys.stdout, f), Tee(sys.stderr, f)


def stop_log():
    """Close the run's log.txt and give the streams back (a CLI called in-process, as in the tests)."""
    global _log
    if _log is not None:
        f, sys.stdout, sys.stderr = _log
        _log = None
        f.close()



# -----------------------------------------------------------------------------
# Run folders: config.json, stages/<tag>.pt and stages/<tag>.ckpt, the method's outputs


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


def write_csv(header, rows, path):
    """A CSV file (a header, then rows), written to a temporary file and renamed: a kill mid-write
    leaves the previous file intact. Under torchrun only rank 0 writes. Returns the path."""
    path = Path(path)
    if world()[0] != 0:
        return path
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
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


def check_out(out, resume, restart, inputs=None, outputs=()):
    """The cheap checks on --out, made before anything is loaded: it must be a folder (or not
    exist), a folder holding a run is only continued (--resume) or discarded (--restart), and no
    file given as input (`inputs`, input_files) is one the run writes or deletes there
    (check_inputs_apart)."""
    out = Path(out)
    if resume and restart:
        raise RunError("--resume continues the run in --out and --restart discards it: give one of them")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder: give a folder path")
    check_inputs_apart(out, inputs or {}, outputs)
    if holds_run(out) and not (resume or restart):
        raise RunError(f"--out {out} holds a run already: add --resume to continue it (same flags), --restart to "
                       f"discard it and start over, or choose another --out")


# -----------------------------------------------------------------------------
# The files a person gives a run, and those it writes for a person: a file given is never written,
# replaced or deleted; a file written for a person (a fill-in form: pseudo_labels.csv, VeCAF's lists)
# is replaced or deleted only while it is still exactly what the run wrote (its sha256 in
# PERSON_FILES) and is not an input of the command

PERSON_FILES = "person_files.json"  # in --out: {"files": {name: sha256}, "waiting": a VeCAF run's loop or None}
INPUT_FLAGS = ("labels", "classes", "captions", "llm_prompts", "clip", "fft_backbone")  # the flags naming a file read


def input_files(args, flags=INPUT_FLAGS):
    """{'--flag': path} for the CLI flags among `flags` that are given: the files a command reads."""
    return {"--" + f.replace("_", "-"): str(getattr(args, f)) for f in flags if getattr(args, f, None)}


def same_file(a, b):
    """Whether two paths name one file: the same real path (links followed), or, both existing, the
    same file (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def input_named(path, inputs):
    """The flag of `inputs` ({'--flag': path}) that names the file `path`, or None."""
    return next((flag for flag, given in inputs.items() if same_file(path, given)), None)


def check_not_input(path, flag, inputs):
    """A file a command writes at a path it was given (`flag`) is none of the files it reads: one line."""
    named = input_named(path, {k: v for k, v in inputs.items() if k != flag})
    if named:
        raise RunError(f"{flag} {path} is the file given as {named}, which this command reads and never writes: "
                       f"give another path")


def check_inputs_apart(out, inputs, outputs=()):
    """No file given as input is one the run in `out` writes or deletes itself (config.json, log.txt,
    the results, `outputs`, PERSON_FILES, anything under stages/): one line naming it. (Files
    written for a person may be inputs: write_for_person and open_run keep them.)"""
    stages = out / "stages"
    own = [out / name for name in ("config.json", "log.txt", PERSON_FILES, *RESULT_FILES, *outputs)]
    own += sorted(f for f in stages.rglob("*") if f.is_file()) if stages.is_dir() else []
    inside = os.path.realpath(stages) + os.sep
    for flag, given in inputs.items():
        hit = next((f for f in own if same_file(f, given)), None)
        if hit is not None or os.path.realpath(given).startswith(inside):
            raise RunError(f"{flag} {given} is {hit or 'inside ' + str(stages)}, a file the run in --out {out} writes "
                           f"or --restart deletes: give a copy kept elsewhere, or another --out")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def person_record(out):
    """PERSON_FILES of a run folder ({"files": {}, "waiting": None} where it is absent or unreadable:
    then no file counts as the run's, so none is replaced or deleted); "accuracy": the eval
    accuracy after each finished loop where the run waits ([[loop, acc]], for the labelling page)."""
    try:
        record = json.loads((Path(out) / PERSON_FILES).read_text())
        if isinstance(record, dict) and isinstance(record.get("files"), dict):
            return {"files": record["files"], "waiting": record.get("waiting"), "accuracy": record.get("accuracy", [])}
    except (OSError, ValueError):
        pass
    return {"files": {}, "waiting": None, "accuracy": []}


def write_person_record(out, record):
    if world()[0] == 0:
        write_json(record, Path(out) / PERSON_FILES)


def set_waiting(out, loop, accuracy=()):
    """Record in PERSON_FILES that the run in `out` waits for a person's labels at `loop` (None: it
    does not wait), with the accuracy after each loop so far: such a run goes on with the same
    command, without --resume."""
    record = person_record(out)
    accuracy = [list(a) for a in accuracy]
    if record["waiting"] != loop or record["accuracy"] != accuracy:
        record["waiting"], record["accuracy"] = loop, accuracy
        write_person_record(out, record)


def why_kept(path, record, inputs):
    """Why the file at `path` may not be replaced or deleted by the run (None: it may): it is an
    input of this command, a person changed it, or the run did not write it."""
    flag = input_named(path, inputs)
    if flag:
        return f"this command's {flag}"
    if not path.exists() and not path.is_symlink():
        return None
    if path.name not in record["files"]:
        return "not a file this run wrote"
    return None if sha256_file(path) == record["files"][path.name] else "changed since the run wrote it"


def write_for_person(out, name, header, rows, inputs, what, keep=None):
    """A CSV file for a person (header, rows; text cells already csv_text guarded) in the run folder
    `out`, at `name` or, where a file there must be kept (why_kept), at the next free name
    (stem-2.csv, stem-3.csv, ...), said in one note line; a file that `keep(path)` accepts (a list
    already there that lists the same images: a person may be filling it in) is left as it is and
    used. Records the sha256 of what it wrote in PERSON_FILES. Returns the path. Under torchrun
    only rank 0 writes (and the path it returns to the others is `name`'s)."""
    out = Path(out)
    if world()[0] != 0:
        return out / name
    record = person_record(out)
    stem, suffix = os.path.splitext(name)
    passed = []
    for n in itertools.count(1):
        path = out / (name if n == 1 else f"{stem}-{n}{suffix}")
        if keep is not None and path.is_file() and keep(path):
            return path
        why = why_kept(path, record, inputs)
        if why is None:
            break
        passed.append(f"{path} ({why})")
    write_csv(header, rows, path)
    record["files"][path.name] = sha256_file(path)
    write_person_record(out, record)
    if passed:
        print(f"note: {'; '.join(passed)} stays as it is: {what} is in {path}", flush=True)
    return path


def differences(saved, now):
    """'key: saved -> now' for every key whose value differs (or exists on one side only)."""
    def shown(d, k):
        return repr(d[k]) if k in d else "(none)"
    return [f"{k}: {shown(saved, k)} -> {shown(now, k)}" for k in sorted(set(saved) | set(now))
            if k not in saved or k not in now or saved[k] != now[k]]


def read_config(out):
    """A run folder's config.json: {"config": the settings that change numbers, "how": the rest}."""
    path = Path(out) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {path} ({type(e).__name__}): use --restart to discard the run "
                       f"or another --out") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise RunError(f"{path} is not a run config of this code: use --restart to discard the run or another --out")
    return saved


# The flags every CLI has that change how a run goes, never its numbers (results do not depend on
# the workers or the eval batch; the data are recorded by content, not by path)
# (--clip-act changes numbers, but config.json records it inside the backbones' identities, as
# --data-root inside the data's fingerprint)
# (--images, --classes, --check, --template and --no-flip are recorded by the data's fingerprint; each method
# records the labels it trains on by content)
UNRECORDED_FLAGS = ("device", "workers", "log_every", "eval_batch", "resume", "restart", "out", "table", "data_root",
                    "clip_act", "images", "classes", "check", "template", "no_flip", "labels")
RESULT_FILES = ("metrics.json", "predictions.pt")  # every run's (finish_run), deleted by --restart
IMAGES = "images.pt"  # the record of a run's data by content (data.record), written by open_run


def settings(args, unrecorded_flags=()):
    """(config, how): a CLI's flags split into every setting that can change a number (config.json's
    "config", compared on --resume) and those that cannot (its "how", for the record): the CLIs'
    shared UNRECORDED_FLAGS and the method's own unrecorded_flags."""
    skip = UNRECORDED_FLAGS + tuple(unrecorded_flags)
    return ({k: v for k, v in sorted(vars(args).items()) if k not in skip},
            {k: v for k, v in vars(args).items() if k in skip})


def with_precision(args, device):
    """A copy of a CLI's flags with --precision resolved for the device (train.resolve_precision):
    the config records what ran, and the flags as given stay as given."""
    return argparse.Namespace(**{**vars(args), "precision": train.resolve_precision(device, args.precision)})


def fields_of(args, out, config, device, resume):
    """The fields every method's Run has (runs.Run), from a CLI's flags."""
    return dict(out=out, config=config, device=device, precision=args.precision,
                amp=train.amp_settings(device, args.precision)[0], seed=args.seed, workers=args.workers,
                eval_batch=args.eval_batch, log_every=args.log_every, resume=resume, inputs=input_files(args))


def open_run(out, config, resume, restart, outputs=(), how=None, inputs=None, images=None):
    """Make --out the folder of the run `config` (a JSON-able dict of every setting that can
    change a number), after the cheap checks of check_out:
      --restart: delete config.json, stages/, RESULT_FILES and `outputs` (the method's own result
        files), and the files written for a person that are still exactly what the run wrote and
        are not one of `inputs` (the others are kept, said in one note line), start over;
      --resume of a folder holding a run: its config.json must equal `config`, else one line
        lists what differs;
    then write `images` (the record of the data by content, data.record: images.pt, written before
    config.json, so that a folder with a config has its record) and config.json (`how`: settings
    that do not change numbers, e.g. workers, for the record only, with the CPU thread count: a run
    continued with another is warned about) and start the run's log.txt (start_log). Returns the
    folder."""
    out = Path(out)
    check_out(out, resume, restart)
    continued, was = not restart and holds_run(out), None  # was: the CPU thread count it was run with
    if continued:
        if not (out / "config.json").exists():
            raise RunError(f"{out} has saved stages but no config.json, so they cannot be checked: "
                           f"use --restart to discard them or another --out")
        saved = read_config(out)
        diff = differences(saved["config"], config)
        if diff:
            raise RunError(f"{out} holds a run with other settings ({'; '.join(diff[:6])}"
                           f"{'; ...' if len(diff) > 6 else ''}): continue it with its own flags "
                           f"(see its config.json), choose another --out, or add --restart to discard it")
        was = saved.get("how", {}).get("cpu_threads")
    barrier()  # torchrun: every process has checked the folder before rank 0 changes it
    check_inputs_apart(out, inputs or {}, outputs)  # (again: the folder may have changed since check_out)
    kept = []
    if world()[0] == 0:
        if restart:
            record = person_record(out)
            for name in record["files"]:
                why = why_kept(out / name, record, inputs or {})
                if why is None:
                    (out / name).unlink(missing_ok=True)
                elif (out / name).exists():
                    kept.append(f"{out / name} ({why})")
            for name in ("config.json", "log.txt", IMAGES, PERSON_FILES, *RESULT_FILES, *outputs):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "stages", ignore_errors=True)
        (out / "stages").mkdir(parents=True, exist_ok=True)
        if images is not None:
            atomic_save(images, out / IMAGES)
        write_json({"config": config, "how": {**(how or {}), "cpu_threads": torch.get_num_threads()}},
                   out / "config.json")
        start_log(out, continued)
        if kept:
            print(f"note: --restart kept {'; '.join(kept)}: a file a person was given or changed is never deleted",
                  flush=True)
        if was is not None and was != torch.get_num_threads():
            print(f"warning: {out} was started with {was} CPU threads, continued with {torch.get_num_threads()}: on "
                  f"a CPU, float sums (and so the numbers) may then differ from an uninterrupted run's; set "
                  f"OMP_NUM_THREADS={was} to continue it exactly", flush=True)
    barrier()  # ... and no process reads a stage before rank 0 has deleted it (--restart)
    return out


def saved_images(out):
    """The record of the data the run in `out` was made with (images.pt, data.record), for
    data.check_same_images; None where `out` holds no run. A run folder made before runs kept it
    cannot be checked: refused in one line, saying so and what to do."""
    out = Path(out)
    if not holds_run(out):
        return None
    if not (out / IMAGES).exists():
        raise RunError(f"{out} holds a run made before runs recorded their images by content (it has no {IMAGES}), so "
                       f"the images it was made with cannot be checked: start it over with --restart or use another "
                       f"--out (deploy.py still uses it as it is)")
    return read_torch(out / IMAGES, "--restart starts the run over")


# how a missing (or deleted) file of a *finished* run is made again (deploy.py reads these)
REDO_STAGE = "the run's own command with --resume redoes that stage"


def read_torch(path, advice="--resume redoes that stage, --restart the whole run"):
    """torch.load of a file a run reads, as data: weights_only=True, so tensors, numbers, strings and
    containers of them are all it gives back, and a file whose unpickling would run code (a
    crafted checkpoint in a run folder someone sent you) is refused in one line naming it and
    what it would call, as a missing, truncated or foreign file is; `advice`: what to do then."""
    if not Path(path).is_file():
        raise RunError(f"{path} is missing: {advice}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        code = re.search(r"GLOBAL (\S+) was not an allowed|Unsupported class (\S+)", str(e))  # what it would call
        if code:
            raise RunError(f"{path} holds more than tensors and numbers (its pickle calls "
                           f"{code.group(1) or code.group(2)}), so "
                           f"reading it could run code: refused, it is not a file this code wrote; delete it ("
                           f"{advice})") from None
        first_line = (str(e).strip().splitlines() or ["empty"])[0][:80]
        raise RunError(f"cannot read {path} ({type(e).__name__}: {first_line}); the file is damaged: delete it "
                       f"({advice})") from None


def check_record(path, saved, record):
    """A stage file or checkpoint is used only under the settings that made it; a file without a
    record (another torch file put in its place) is not one of this code's."""
    if not isinstance(saved, dict) and record is not None:
        raise RunError(f"{path} is not a stage file or checkpoint of this code (a torch file without its record): "
                       f"delete it to redo that stage, or --restart")
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


class RecordedFile:
    """One scheme for a file of a run's saved work: an epoch checkpoint (train.fit's, CraFT's
    search) or a stage's result (VeCAF's features and selections). It is stored with the record
    of the settings that made it (atomic writes, rank 0 alone) and read back only when `reuse`
    (--resume) is on, the file exists and its record equals `record`; load() -> its dict or None."""

    def __init__(self, path, record, reuse):
        self.path, self.record, self.reuse = Path(path), record, reuse

    def load(self):
        if not (self.reuse and self.path.exists()):
            return None
        state = read_torch(self.path)
        check_record(self.path, state.get("record") if isinstance(state, dict) else None, self.record)
        return state

    def save(self, state):
        atomic_save({**state, "record": self.record}, self.path)


def save_stage(out, tag, record, model, **extras):
    """A finished stage: its model's state dict, the record of its settings and `extras`,
    written atomically; its epoch checkpoint, superseded, is deleted. Returns `extras`."""
    atomic_save({"record": record, "model": model.state_dict(), **extras}, stage_path(out, tag))
    if world()[0] == 0:
        ckpt_path(out, tag).unlink(missing_ok=True)
    return extras



# -----------------------------------------------------------------------------
# A run: what its stages share, and a stage (trained, or loaded where it finished before)


@dataclass
class Run:
    """Where and how a run computes, and its results so far; made once by a method's `prepare`.
    Each method's Run (coft.Run, craft.Run, vecaf.Run) adds what its own stages share."""
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
    metrics: dict  # what metrics.json will hold
    t0: float  # when the run started (metrics' total time)
    # {'--flag': path}: the files this command reads (input_files), never written or deleted
    inputs: dict = field(default_factory=dict, kw_only=True)

    def record(self, tag):
        """The settings stage `tag` depends on, stored with its files (default: the whole config)."""
        return {"stage": tag, **self.config}

    def required(self, tag):
        """Why stage `tag` must have finished before (a run that only evaluates), or None."""
        return None

    def stage(self, tag, model, loss, batches, *, epochs, lr, recipe, what=None, record=None, trained=None,
              compiled=(), evaluate=None, evaluate_at=None, max_steps=None, finished_file=True):
        """Stage `tag`: `model` trained with train.fit on `loss` over batches(epoch) for `epochs`, by
        SGD with momentum at `lr` (`recipe`, a train.SGDRecipe: warm-up then cosine, clipping), on
        the run's device and precision, its randomness from (--seed, tag), an epoch checkpoint
        (stages/<tag>.ckpt) after each epoch. With `finished_file` the trained model is saved as
        stages/<tag>.pt, and a stage that finished before under the same `record` is loaded from
        it instead of trained (batches None: nothing to train on, the model is saved as it is);
        its gradient-norm summary goes to metrics["grad_norms"]. `trained`: what fit trains when it
        wraps `model` (CoFT+'s MomentumContrast); `compiled`: modules to torch.compile first;
        evaluate, evaluate_at, max_steps: fit's. `model` ends in eval mode. Returns fit's history
        (None where loaded)."""
        record = self.record(tag) if record is None else record
        if finished_file:
            saved = load_stage(self.out, tag, record, model, missing=self.required(tag))
            if saved is None and batches is None:
                print(f"warning: {tag} has an empty training set; it stays at its initialisation", flush=True)
                saved = save_stage(self.out, tag, record, model, grad_norms=train.grad_norm_summary([], 0))
            if saved is not None:
                self.metrics["grad_norms"][tag] = saved["grad_norms"]
                model.eval()
                return None
        trained = model if trained is None else trained
        for m in compiled:
            m.compile()
        history = train.fit(trained, loss, batches, epochs=epochs,
                            opt=train.sgd(trained, lr, recipe.momentum, recipe.weight_decay),
                            schedule=train.warmup_epochs_then_cosine(recipe.warmup_epochs), device=self.device,
                            seed=seed_of(self.seed, tag), precision=self.precision, clip_grad=recipe.clip_grad,
                            checkpoint=RecordedFile(ckpt_path(self.out, tag), record, self.resume),
                            tag=what or tag, log_every=self.log_every, evaluate=evaluate, evaluate_at=evaluate_at,
                            max_steps=max_steps)
        if finished_file:
            saved = save_stage(self.out, tag, record, model,
                               grad_norms=train.grad_norm_summary(history["grad_norm"], recipe.clip_grad))
            self.metrics["grad_norms"][tag] = saved["grad_norms"]
        model.eval()
        return history

    def loader(self, dataset, batch, key=(), shuffle=False, drop_last=False):
        """train.loader with the stream seed seed_of(--seed, *key): each stage, branch, epoch and cycle
        passes its own key, so a resumed run replays exactly the batches of an uninterrupted one,
        no two stages share a stream, and the numbers do not depend on --workers."""
        return train.loader(dataset, batch, seed_of(self.seed, *key), shuffle, self.workers, self.device.type == "cuda",
                            drop_last)

    def train_loader(self, dataset, batch, key):
        """A fine-tuning set's shuffled batches (`loader` keyed by `key`), the last one dropped when
        smaller than `batch` unless it is the only one: a tiny batch makes a noisy step (and
        BatchNorm statistics of a few images)."""
        return self.loader(dataset, batch, key, shuffle=True, drop_last=len(dataset) > batch)

    def outputs(self, fn, dataset, with_labels=False):
        """The evaluation pass: fn over a dataset in eval batches -> outputs [N, ...] (fp32, CPU);
        with_labels: fn(x, y), the batch's labels too (fn may reduce each image's row of scores
        to a few numbers, so that no N x C matrix is gathered). Under torchrun each process scores
        its contiguous shard and every process gets all N outputs back in index order (the passes
        are deterministic: the test transform)."""
        if not ddp.sharding():
            return train.predict(fn, self.loader(dataset, self.eval_batch), self.device, self.amp, with_labels)[0]
        mine = ddp.shard(len(dataset), *ddp.world())
        # an empty shard (fewer items than processes) scores one item for the output's shape, then none
        part = torch.utils.data.Subset(dataset, mine if len(mine) else range(1))
        with ddp.single_process():  # the shard is loaded whole, in eval batches of --eval-batch per process
            out = train.predict(fn, self.loader(part, self.eval_batch), self.device, self.amp,
                                with_labels)[0][:len(mine)]
        return ddp.gather_in_order(out, len(dataset))

    def linear_probe(self, clip, train_set, y_train, eval_set, classes):
        """The linear-probe reference (CoFT's with the true train labels, CraFT's on the shots):
        logistic_regression on clip's frozen, normalised image features of train_set with labels
        y_train -> its logits on eval_set [N, classes]."""
        def encode(x):
            return torch.nn.functional.normalize(clip.encode_image(x).float(), dim=-1)
        head = train.logistic_regression(self.outputs(encode, train_set), y_train, classes)
        return head(self.outputs(encode, eval_set))


# -----------------------------------------------------------------------------
# Results: metrics.json and the table of runs


def finish_run(out, metrics, predictions, t0):
    """A run's result files, each written atomically: predictions.pt, then metrics.json (last:
    it marks a finished run), with the total time. Returns metrics."""
    metrics.setdefault("time_s", {})["total"] = time.time() - t0
    bad = non_finite(metrics)
    if bad:  # strict JSON has no NaN, and a table would list the run without comment
        raise RunError(f"the run's {bad} is not a finite number ({non_finite(metrics, value=True)}): the run "
                       f"diverged somewhere; its results are not written")
    atomic_save(predictions, Path(out) / "predictions.pt")
    write_json(metrics, Path(out) / "metrics.json")
    print("metrics: " + json.dumps({k: v for k, v in metrics.items() if k.endswith("acc")}), flush=True)
    return metrics


def non_finite(d, prefix="", value=False):
    """The dotted key of the first NaN or infinite number in nested metrics (its value where
    `value`), or None."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        if isinstance(v, float) and not math.isfinite(v):
            return v if value else f"{prefix}{k}"
        found = non_finite(v, f"{prefix}{k}.", value)
        if found is not None:
            return found
    return None


def cell(x, sd=None):
    """A table cell: '-' for nothing, 'a/b' for a pair, one decimal, '±sd' where given."""
    if x is None or x == []:
        return "-"
    if isinstance(x, list):
        return "/".join(cell(v) for v in x)
    if isinstance(x, int):  # counts (queries, shots)
        return str(x)
    return f"{x:.1f}" + ("" if sd is None else f"±{sd:.1f}")


def counted(n, noun, nouns=None):
    """A count in words: "1 image", "3 images" (`nouns`: the plural where it is not noun + "s")."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def shown(acc):
    """An accuracy in a progress line: two decimals, '-' where there is none (no labelled eval split)."""
    return "-" if acc is None else f"{acc:.2f}"


def finished_runs(run_dirs, methods=None):
    """(folder, metrics) of every run folder with a metrics.json, in order; an unfinished run is
    named on the console; a folder that does not exist, an unreadable metrics.json, one of a run of
    another CLI (its "method" not in `methods`, where given), or no finished run at all is a
    one-line error."""
    finished = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not Path(d).is_dir():
            raise RunError(f"--table {d}: no such folder")
        if not path.exists():
            print(f"{d}: no metrics.json (unfinished run)")
            continue
        try:  # strict JSON: a NaN in a metrics file is no finished run's result
            finished.append((Path(d), json.loads(path.read_text(), parse_constant=strict_json)))
        except (OSError, ValueError) as e:
            raise damaged(path, e) from None
        m = finished[-1][1]
        if methods is not None and not (isinstance(m, dict) and m.get("method") in methods):
            what = f"a {m.get('method')!r} run" if isinstance(m, dict) and "method" in m else "no run's metrics"
            raise RunError(f"{path} holds {what}, not one of {', '.join(methods)}: leave it out of --table")
    if not finished:
        raise RunError(f"none of the {counted(len(run_dirs), '--table folder')} holds a finished run"
                       if len(run_dirs) != 1 else f"the --table folder {run_dirs[0]} holds no finished run")
    return finished


def strict_json(name):
    raise ValueError(f"{name} is not a number of strict JSON")


def damaged(path, e):
    return RunError(f"{path} is damaged or not from a finished run of this code ({type(e).__name__}: "
                    f"{str(e)[:60]}): rerun it with --resume, or leave it out of --table")


def seed_group(name):
    """The group of a run folder named <name>-s<seed>: <name> (runs of one setting over seeds)."""
    return re.sub(r"-s\d+$", "", name)


def table(finished, summarise):
    """One line per finished run ((folder, metrics) pairs from finished_runs; summarise(metrics)
    -> {column: number, pair or None}), then, for runs named <name>-s<seed>, one line per name with
    the mean and sd over seeds (a pair counts as its mean)."""
    rows_of, groups = [], {}
    for folder, m in finished:
        try:
            summary = summarise(m)
        except (KeyError, TypeError, AttributeError) as e:
            raise damaged(folder / "metrics.json", e) from None
        rows_of.append((folder.name, m.get("method", "?"), summary))
        groups.setdefault(seed_group(folder.name), []).append(summary)
    cols = list(rows_of[0][2]) if rows_of else []
    rows = [("run", "method", *cols)] + [(n, meth, *(cell(v) for v in s.values())) for n, meth, s in rows_of]
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
