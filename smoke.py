"""
Real size, end to end. Random full-size CLIP checkpoints in the OpenAI layout (ViT-B/16, RN50),
an image folder generated at 224 px, and every method's CLI run on them with tiny budgets, each in
its own process, as a user would: the 77-token context, the paper's Phase-I capacity (M 16,
VPT-deep 20 on the ViT), CoFT+'s rounds and queue, CraFT's search and refiner, VeCAF's selection
and fine-tuning. It checks that the paths run at the sizes the papers use; the numbers (random
weights, a handful of images) mean nothing. One table: time and peak memory of every stage.

    python smoke.py                      the real-size smoke on this machine's device (CPU: what
                                         `pytest -m realsize` runs, a few minutes on 2 cores)
    python smoke.py --gpu                the GPU check (`bash run.sh gpu-check`): bf16 autocast and
                                         fp16 + GradScaler, --compile, --grad-checkpointing, real-size
                                         CoFT+, torchrun on NCCL, bench.py at batch 64 with MFU
    python smoke.py --gpu --device cpu --size tiny    the GPU check's parts a CPU can run, on
                                         tiny models (its test)

Nothing is downloaded; everything is written under --out (default: a temporary folder).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import clip_model
import data
import runs
from train import RunError

HERE = Path(__file__).resolve().parent
SIZES = {"real": ("ViT-B/16", "RN50"), "tiny": ("tiny-vit", "tiny-rn")}


def write_checkpoint(name, path, seed=0):
    """A random CLIP of `name`'s sizes (clip_model.CONFIGS) saved as an OpenAI-layout state dict
    in fp16, as the released weights are stored."""
    model = clip_model.tiny_clip(name, seed=seed)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path


def write_image_folder(root, classes=3, train=6, test=2, size=256):
    """root/{train,test}/<class>/<i>.png: each class a colour with a bright square whose place
    varies by image, so the images are not all alike; `size` px a side."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = Path(root) / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.new("RGB", (size, size), tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g)))
                x, y = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
                img.paste((255, 255, 255), (x, y, x + size // 3, y + size // 3))
                img.save(folder / f"{i}.png")
    return root


def coft(ckpt, data, out, *extra):  # one true-labelled shot per class: on random weights a clean set can be empty
    return [sys.executable, str(HERE / "coft.py"), "--dataset", "imagefolder", "--data-root", str(data), "--clip",
            str(ckpt), "--clip-act", "quick_gelu", "--out", str(out), "--restart", "--log-every", "0", "--K", "2",
            "--batch", "4", "--p1-epochs", "1", "--fft-epochs", "1", "--queue", "8", "--labelled-shots", "1", *extra]


def craft(ckpt, data, out, *extra):  # one CMA-ES generation (40 candidates x C prompts), one refiner epoch
    return [sys.executable, str(HERE / "craft.py"), "--dataset", "imagefolder", "--data-root", str(data), "--clip",
            str(ckpt), "--clip-act", "quick_gelu", "--out", str(out), "--restart", "--log-every", "0", "--shots", "2",
            "--budget", "40", *extra]


def vecaf(ckpt, data, out, *extra):
    return [sys.executable, str(HERE / "vecaf.py"), "--dataset", "imagefolder", "--data-root", str(data), "--clip",
            str(ckpt), "--clip-act", "quick_gelu", "--out", str(out), "--restart", "--log-every", "0", "--budget", "3",
            "--loops", "2", "--epochs", "1", "--batch", "4", "--iters", "20", "--warmup-epochs", "0", *extra]


# the paper's Phase-I capacity; the tiny test models' 16-token context holds 4 context tokens
CAPACITY = {"real": ("--M", "16", "--vpt-tokens", "20", "--vpt", "deep"),
            "tiny": ("--M", "4", "--vpt-tokens", "2", "--vpt", "deep")}
PLUS = ("--plus", "--rounds", "2")  # CoFT+: rounds, momentum contrast (queue), template ensemble offline


def smoke_parts(vit, rn, data, out, device, size):
    """(part, command) of the real-size smoke: every method on the ViT, CoFT+ and CraFT on the
    ResNet (CraFT's paper backbone; CoFT's Phase I takes an adapter there instead of VPT)."""
    d = ("--device", device)
    return [("CoFT+ ViT", coft(vit, data, out / "coftplus-vit", *PLUS, *CAPACITY[size], *d)),
            ("CoFT+ RN50", coft(rn, data, out / "coftplus-rn", *PLUS, *CAPACITY[size][:2], *d)),
            ("CraFT ViT", craft(vit, data, out / "craft-vit", *d)),
            ("CraFT RN50", craft(rn, data, out / "craft-rn", *d)),
            ("VeCAF ViT", vecaf(vit, data, out / "vecaf-vit", *d))]


def gpu_parts(vit, rn, data, out, device, size):
    """(part, command) of the GPU check. On a CPU (its test) the parts a GPU alone runs are left
    out: fp16 + GradScaler, bf16 where the CPU has no native bf16, and NCCL (gloo instead)."""
    d = ("--device", device)
    cuda = device.startswith("cuda")
    cap = CAPACITY[size]  # each CoFT part at the paper's capacity (the tiny models: what their context holds)
    parts = [("CoFT+ ViT, paper capacity", coft(vit, data, out / "coftplus", *PLUS, *cap, *d))]
    if cuda:
        parts += [("CoFT bf16 autocast", coft(vit, data, out / "bf16", "--precision", "bf16", *cap, *d)),
                  ("CoFT fp16 + GradScaler", coft(vit, data, out / "fp16", "--precision", "fp16", *cap, *d)),
                  ("CoFT --compile", coft(vit, data, out / "compile", "--compile", *cap, *d))]
    parts += [("CoFT --grad-checkpointing", coft(vit, data, out / "checkpointing", "--grad-checkpointing", *cap,
                                                  *d)),
              (f"torchrun 1 process ({'NCCL' if cuda else 'gloo'}), CoFT+",
               [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                *coft(vit, data, out / "torchrun", *PLUS, *cap, *d)[1:]]),
              ("CraFT RN50", craft(rn, data, out / "craft", *d)),
              ("VeCAF ViT", vecaf(vit, data, out / "vecaf", *d)),
              (f"bench.py towers, batch {64 if cuda else 2}",
               [sys.executable, str(HERE / "bench.py"), "--sections", "towers", "--models",
                f"{SIZES[size][0]},{SIZES[size][1]}", "--device", device, "--precision", "bf16" if cuda else "fp32",
                "--batch", "64" if cuda else "2", "--steps", "10" if cuda else "1",
                "--prompts", "256" if cuda else "8"])]
    return parts


def run_part(name, cmd, log):
    """Run one part in its own process: (exit code, wall seconds, the process's peak resident
    memory in MiB). Its output goes to `log`."""
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.time() - t, usage.ru_maxrss / 1024  # kB on Linux


def stage_rows(out):
    """(stage, seconds, peak MiB) of every stage a finished run recorded (metrics.json)."""
    path = Path(out) / "metrics.json"
    if not path.exists():
        return []
    m = json.loads(path.read_text())
    peak = m.get("peak_mib", {})
    rows = [(k, v, peak.get(k)) for k, v in m.get("time_s", {}).items() if k != "total"]
    rows += [(f"loop {x['loop']}", x["time_s"], x.get("peak_mib")) for x in m.get("loops", [])]
    return rows


def mib(x):
    return "-" if x is None else f"{x:,.0f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the GPU check instead of the smoke (bash run.sh gpu-check)")
    p.add_argument("--device", default=None, help="default: cuda with --gpu, else cuda where available, else cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="real", help="real: ViT-B/16 and RN50; tiny: for tests")
    p.add_argument("--out", default=None, help="where the checkpoints, images and runs go (default: a temporary "
                                               "folder)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if args.gpu or torch.cuda.is_available() else "cpu")

    def body():
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RunError(f"{'the GPU check' if args.gpu else '--device ' + device} needs a CUDA GPU, and torch sees "
                           f"none here (torch.cuda.is_available() is False): run it on a GPU machine, or "
                           f"`python smoke.py --gpu --device cpu --size tiny` for its CPU parts")
        runs.check_device(device)
        out = Path(args.out or tempfile.mkdtemp(prefix="smoke-"))
        out.mkdir(parents=True, exist_ok=True)
        vit_name, rn_name = SIZES[args.size]
        res = clip_model.CONFIGS[vit_name].image_resolution
        print(f"writing random {vit_name} and {rn_name} checkpoints (OpenAI layout, fp16) and a {res}-px image "
              f"folder under {out}", flush=True)
        vit = write_checkpoint(vit_name, out / "vit.pt")
        rn = write_checkpoint(rn_name, out / "rn.pt")
        data = write_image_folder(out / "images", size=res + res // 7)
        parts = (gpu_parts(vit, rn, data, out, device, args.size) if args.gpu else
                 smoke_parts(vit, rn, data, out, device, args.size))
        rows, failed = [], []
        for i, (name, cmd) in enumerate(parts):
            log = out / f"{i:02d}.log"
            rc, sec, rss = run_part(name, cmd, log)
            run_dir = next((Path(c) for a, c in zip(cmd, cmd[1:]) if a == "--out"), None)
            status = "ok" if rc == 0 else f"FAILED (exit {rc}; {log})"
            print(f"{name}: {status}, {sec:.0f} s, peak RSS {mib(rss)} MiB", flush=True)
            rows.append((name, "whole process (RSS)", sec, rss, status))
            rows += [(name, stage, s, m, "") for stage, s, m in (stage_rows(run_dir) if run_dir else [])]
            if rc != 0:
                failed.append(name)
            if name.startswith("bench"):
                print(log.read_text().rstrip(), flush=True)
        gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
        what = "the GPU allocator" if gpu != "CPU" else "resident set"
        print(f"\n{gpu}, torch {torch.__version__}; peak memory: {what} per stage (metrics.json peak_mib), the "
              f"process's resident set per whole process")
        widths = (34, 22, 9, 11)
        print(f"{'part':{widths[0]}} {'stage':{widths[1]}} {'time s':>{widths[2]}} {'peak MiB':>{widths[3]}}  result")
        for name, stage, sec, peak, status in rows:
            print(f"{name:{widths[0]}} {stage:{widths[1]}} {sec:{widths[2]}.1f} {mib(peak):>{widths[3]}}  {status}")
        if failed:
            raise RunError(f"{runs.counted(len(failed), 'part')} failed: {', '.join(failed)}; their logs are "
                           f"named above")
    return runs.run_cli(body, errors=data.USER_ERRORS)


if __name__ == "__main__":
    main()
