"""Shared by every test file: CPU threads, warnings, tiny CLIPs with the real key layout whose every
tensor is random, and (once per session) a tiny backbone pretrained on rendered digits."""
import inspect
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model as cm
import coft
import data
import runs
import standin
import train
import vecaf

torch.set_num_threads(2)


# the long end-to-end checks, left out of the default suite and run when asked for by name, as .ci/run does
LONG = {"realsize": "full-size random models end to end (minutes)",
        "walkthrough": "docs/own-images.md's commands as written (a minute or two)"}


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")  # torch.jit deprecation notices
    for name, what in LONG.items():
        config.addinivalue_line("markers", f"{name}: {what}: run with `pytest -m {name}`, left out of the default "
                                           f"suite")


@pytest.fixture(scope="session", autouse=True)
def digest_cache(tmp_path_factory):
    """The image digest caches (imagefiles.cache_folder) of the whole session in a folder of its own, not
    in the home folder; the CLIs the tests start as processes inherit it."""
    os.environ["COFT_CACHE"] = str(tmp_path_factory.mktemp("coft-cache"))
    return Path(os.environ["COFT_CACHE"])


def pytest_collection_modifyitems(config, items):
    """The long checks (LONG) run only when asked for by name (-m realsize, -m walkthrough)."""
    asked = config.getoption("markexpr") or ""
    for name in LONG:
        if name not in asked:
            skip = pytest.mark.skip(reason=f"{LONG[name]}: run with `pytest -m {name}`")
            for item in items:
                if name in item.keywords:
                    item.add_marker(skip)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Selenium (Debian's chromium and chromium-driver), for the tests of the
    page (test_page.py) and the walk-through's browser route (test_runs.py)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path = shutil.which("chromedriver")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not driver_path or not chrome:
        pytest.skip("no Chromium and chromedriver here (Debian: apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def randomized(name, seed=0, **overrides):
    """A tiny CLIP whose biases, zero-initialised gains and BatchNorm statistics are random too,
    so that a key loaded into the wrong place cannot go unnoticed."""
    m = cm.tiny_clip(name, seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "bias" in n or n.endswith("bn3.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for n, b in m.named_buffers():
            if "running_mean" in n:
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif "running_var" in n:
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return m.eval()


def tower(resolution=32, mean=cm.CLIP_MEAN, std=cm.CLIP_STD, resize_mode="shortest"):
    """What data.make_transform reads of an image tower: its resolution and the normalisation and
    test resize its weights were trained with (OpenAI's by default)."""
    return SimpleNamespace(resolution=resolution, image_mean=mean, image_std=std, resize_mode=resize_mode)


# ---- checkpoints as other libraries save them

def hub_file(tmp_path, repo, name):
    """Where huggingface_hub caches a repo's file (refs/main naming the snapshot)."""
    root = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("0123abcd")
    (root / "snapshots" / "0123abcd").mkdir(parents=True, exist_ok=True)
    return root / "snapshots" / "0123abcd" / name


def tiny_hf(transformers, act, seed=0):
    """A tiny transformers CLIPModel with every tensor random; 2 heads in each tower (head width
    32: the heads must come from config.json)."""
    torch.manual_seed(seed)
    tower = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, hidden_act=act)
    cfg = transformers.CLIPConfig(text_config=dict(tower, max_position_embeddings=16),
                                  vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=32)
    model = transformers.CLIPModel(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


TEXTS = ["a photo of a cat.", "hello world", "x", "a b c d e f g h i j"]


def inputs(model, n=3):
    R = model.visual.resolution
    return torch.randn(n, 3, R, R, generator=torch.Generator().manual_seed(1)), cm.tokenize(TEXTS, model.context_length)


# --------------------------------------------------------------------------- CoFT: end to end (tiny)

@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory):
    """tiny-vit pretrained on rendered digits for a few seconds (the stand-in recipe, tiny settings):
    a backbone whose pseudo-labels mean something, shared by the end-to-end tests."""
    torch.manual_seed(0)
    model = cm.tiny_clip("tiny-vit", seed=0)
    history = standin.pretrain(model, steps=150, batch=64, lr=7e-4, weight_decay=0.0, warmup=20, seed=0, log_every=0)
    path = tmp_path_factory.mktemp("standin") / "tiny-pretrained.pt"
    torch.save(model.state_dict(), path)
    return path, history, model.eval()


def tiny_open_clip(open_clip, resnet, quick_gelu, seed=0):
    """A tiny open_clip CLIP (open_clip's own code) with every tensor random: a ViT whose head
    width is 16 (4 heads: a count its weights do not give), or a ModifiedResNet."""
    torch.manual_seed(seed)
    vision = dict(image_size=32, layers=(1, 1, 1, 1), width=8) if resnet else \
        dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16)
    model = open_clip.model.CLIP(32, vision, dict(context_length=16, vocab_size=49408, width=64, heads=1, layers=2),
                                 quick_gelu=quick_gelu)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for n, b in model.named_buffers():
            if "running_var" in n:
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif "running_mean" in n:
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


# ---- tiny datasets on disk (CoOp layout, image folders)

def write_image(path, color=(200, 30, 30), size=(8, 6)):
    """A tiny real image file (format from the extension), creating its folders."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


DTD_CLASSES = ["banded", "blotchy", "cross_hatched"]  # label order; "_" must become " "


def make_dtd(root, per_split=dict(train=2, val=1, test=1)):
    """
    A fake DATA/dtd in the CoOp layout: images/<class>/<class>_<i>.jpg and split_zhou_DescribableTextures.json.
    The split file lists classes in an order other than by label, so the loader must sort by label.
    """
    entries, i = {s: [] for s in per_split}, 0
    for label in [2, 0, 1]:
        c = DTD_CLASSES[label]
        for split, n in per_split.items():
            for _ in range(n):
                rel = f"{c}/{c}_{i:04d}.jpg"
                write_image(os.path.join(root, "dtd", "images", rel), color=(10 * label, 0, 0))
                entries[split].append([rel, label, c])
                i += 1
    split_path = os.path.join(root, "dtd", "split_zhou_DescribableTextures.json")
    with open(split_path, "w") as f:
        json.dump(entries, f)
    return split_path


def make_imagefolder(root, splits=("train", "test"), classes=("cat", "dog_big")):
    for split in splits:
        for c in classes:
            for i, ext in enumerate([".png", ".JPG"]):  # extensions are case-insensitive
                write_image(os.path.join(root, split, c, f"{i}{ext}"))
            # files that are not images are skipped
            with open(os.path.join(root, split, c, "notes.txt"), "w") as f:
                f.write("not an image")



def write_digit_layouts(root, n_train=None, n_test=None):
    """The digits' train and test images as PNG files in two layouts that list them in one order:
    root/labelled/{train,test}/<class>/<n>.png (--dataset imagefolder, the labelled layout) and
    your own images, root/flat/<n>.png (the train split, no labels), root/check/<class>/<n>.png (the
    test split) and root/classes.txt (the class folders' sorted order, imagefolder's labels).
    Returns (root, [(class name, pool index in the flat folder) per train image], the sorted class names)."""
    task = data.digits_task()
    root = Path(root)
    classes = sorted(task.classnames)
    # in the class folders' order, as imagefolder lists them
    train = sorted(task.train[:n_train], key=lambda item: classes.index(task.classnames[item[1]]))
    pool = []
    for n, (image, label) in enumerate(train):
        name = task.classnames[label]
        for path in (root / "labelled" / "train" / name / f"{n:04d}.png", root / "flat" / f"{n:04d}.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        pool.append(name)
    for n, (image, label) in enumerate(task.test[:n_test]):
        name = task.classnames[label]
        for path in (root / "labelled" / "test" / name / f"{n:04d}.png", root / "check" / name / f"{n:04d}.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root, pool, classes


def write_labels(path, rows):
    """A labels file: the header path,class, then (path, class) rows."""
    Path(path).write_text("path,class\n" + "".join(f"{p},{c}\n" for p, c in rows))
    return path


# ---- the CLIs' one-line errors and run.sh

def one_line_error(main, capsys, *argv):
    """The stderr line of a CLI call that must fail with exit code 2 and no traceback."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def run_sh(*argv, env=None):
    import subprocess
    return subprocess.run(["bash", os.path.join(os.path.dirname(__file__), "run.sh"), *argv], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


# ---- torchrun's environment, on CPU

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_launched(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # 2 processes on 2 cores
    fn(rank, *args)


def as_torchrun(fn, world, *args):
    """fn(rank, *args) in `world` fresh processes that see what torchrun gives its workers (RANK,
    WORLD_SIZE, LOCAL_RANK, a rendezvous address on a free local port): the CLIs join a gloo job."""
    torch.multiprocessing.spawn(_as_launched, args=(world, free_port(), fn, args), nprocs=world)


LATE_RANK = """\
import os
if os.environ.get("RANK") == "{rank}":  # this process starts {delay} s after the others, and goes on
    import time                           # {delay} s after them once the job is formed
    time.sleep({delay})
    import torch.distributed as dist
    _init = dist.init_process_group

    def init_process_group(*a, **k):
        _init(*a, **k)
        time.sleep({delay})
    dist.init_process_group = init_process_group
"""


UNREADABLE_IN_RANK1 = """\
import builtins, os
if os.environ.get("RANK") == "1":  # rank 1 alone cannot decode {name!r}, as if it turned unreadable after the check
    _import = builtins.__import__

    def _hooked(name, *a, **k):
        module = _import(name, *a, **k)
        if name == "data" and hasattr(module, "ImageDataset") and not hasattr(module, "_unreadable"):
            module._unreadable, getitem = True, module.ImageDataset.__getitem__

            def failing(self, i):
                if str(self.items[i][0]).endswith({name!r}):
                    raise module.DataError(f"cannot read image {{self.items[i][0]}} (it changed since it was checked)")
                return getitem(self, i)
            module.ImageDataset.__getitem__ = failing
        return module
    builtins.__import__ = _hooked
"""


def torchrun(script, argv, cwd, late_rank=None, delay=2.0, unreadable_in_rank1=None):
    """`torchrun --nproc_per_node 2 script ...` (the real launcher), 1 thread per process.
    late_rank: that process is held back `delay` s at start-up and again right after joining the
    job (a sitecustomize on the processes' PYTHONPATH), so the other one meets first every check
    made before the job forms (the flags) or before the next collective (the run folder): an
    adversarial order, for tests whose outcome must not depend on the order.
    unreadable_in_rank1: a file name that rank 1 alone cannot decode when a pass reads it (after
    the up-front check every process passed): an error met by one process in its own share."""
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    site_code = (LATE_RANK.format(rank=late_rank, delay=delay) if late_rank is not None else "") + \
        (UNREADABLE_IN_RANK1.format(name=unreadable_in_rank1) if unreadable_in_rank1 else "")
    if site_code:
        site = Path(cwd) / f"site-{late_rank}-{str(unreadable_in_rank1).replace('/', '-')}"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(site_code)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *argv],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def assert_one_error_line(r, expected):
    """A failed torchrun job printed exactly one line of ours (starting with `expected`) and no
    process traceback (those carry torchrun's `[rankN]` prefix)."""
    ours = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert r.returncode != 0 and len(ours) == 1 and ours[0].startswith(expected), r.stderr
    assert "[rank" not in r.stderr, r.stderr


FIT_SIGNATURE = inspect.signature(train.fit)  # read before any test wraps train.fit


def fit_arguments(*a, **k):
    """A train.fit call's arguments by name (for tests that wrap fit)."""
    bound = FIT_SIGNATURE.bind(*a, **k)
    bound.apply_defaults()
    return dict(bound.arguments)


def stage_of(fit_args):
    """The stage a train.fit call trains: its checkpoint's record names it."""
    return fit_args["checkpoint"].record["stage"]


def cli_as_process(rank, module, argv, record, die_at=None):
    """`module`.main(argv) (coft or vecaf) in one process, of a torchrun job or a plain run,
    saving to record-rank<r>.pt what train.fit saw: each stage's loss at every step, the steps
    this process ran (a resumed stage: only those after its checkpoint), a CoFT+ stage's queue and
    momentum model; and the metrics. die_at: rank 0 is killed (SIGKILL) right after writing that
    checkpoint file."""
    import importlib
    import signal
    cli = importlib.import_module(module)
    real_fit, real_save, seen = train.fit, runs.atomic_save, {"losses": {}, "contrast": {}, "steps": {}}

    def recording_fit(*a, **k):
        fit_args = fit_arguments(*a, **k)
        trained, step_fn, tag = fit_args["model"], fit_args["loss"], stage_of(fit_args)
        seen["steps"][tag] = 0

        def counted(*b):
            seen["steps"][tag] += 1
            return step_fn(*b)
        fit_args["loss"] = counted
        history = real_fit(**fit_args)
        seen["losses"][tag] = history["loss"]
        if hasattr(trained, "queue"):  # CoFT+'s MomentumContrast: all but the online model
            seen["contrast"][tag] = {k: v.clone() for k, v in trained.state_dict().items()
                                     if not k.startswith("model.")}
        return history

    def dying_save(obj, path):
        real_save(obj, path)
        if Path(path).name == die_at and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    train.fit, runs.atomic_save = recording_fit, dying_save
    try:
        seen["metrics"] = numbers(cli.main(argv))
    finally:
        train.fit, runs.atomic_save = real_fit, real_save
    torch.save(seen, f"{record}-rank{rank}.pt")


def flat(d, prefix=""):
    """Nested metrics -> {dotted key: number}, for comparisons to float tolerance."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], dict):
            for i, x in enumerate(v):
                out.update(flat(x, f"{prefix}{k}.{i}."))
        else:
            out[prefix + k] = v
    return out


def same_run(a, b, rel=1e-4):
    """Two runs' records agree: every stage's loss at every step and every metric, to float tolerance."""
    assert a["losses"].keys() == b["losses"].keys()
    for tag in a["losses"]:
        assert a["losses"][tag] == pytest.approx(b["losses"][tag], rel=rel, abs=1e-6), tag

    def measured(m):  # every metric but the process count
        return {k: v for k, v in flat(m).items() if k != "processes"}
    ma, mb = measured(a["metrics"]), measured(b["metrics"])
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == (pytest.approx(mb[k], rel=rel, abs=1e-5) if isinstance(mb[k], float) else mb[k]), k


# ---- the methods' CLIs on the digits with a tiny backbone (shared by the method, run-folder and torchrun tests)

def coft_args(tmp_path, *extra, name="tiny-vit", out="run", ckpt=None):
    """The CLI arguments of a small, fast run on the digits (a random tiny backbone by default)."""
    if ckpt is None:
        ckpt = tmp_path / f"{name}.pt"
        if not ckpt.exists():
            torch.save(randomized(name).state_dict(), ckpt)
    args = ["--dataset", "digits", "--clip", str(ckpt), "--clip-act", "quick_gelu", "--out", str(tmp_path / out), "--M", "4", "--K", "4",
            "--vpt-tokens", "2", "--p1-epochs", "2", "--fft-epochs", "2", "--batch", "64", "--fft-lr", "1e-3",
            "--log-every", "0", "--fft-aug", "weak", "--clip-grad", "1"]
    return args + list(extra)


def run_coft(tmp_path, *extra, name="tiny-vit", out="run", ckpt=None):
    return coft.main(coft_args(tmp_path, *extra, name=name, out=out, ckpt=ckpt))


def stage_state(run_dir, tag):
    """The model state dict of a finished stage (stages/<tag>.pt also holds its record)."""
    return torch.load(Path(run_dir) / "stages" / f"{tag}.pt", weights_only=True)["model"]


def numbers(metrics):
    """Every number of the run, none of the machine: timings (*_s) and peak memory (peak_mib) are
    left out, also in VeCAF's per-loop records."""
    def of_run(d):
        return {k: v for k, v in d.items() if not k.endswith(("_s", "_mib"))}
    return {k: [of_run(loop) for loop in v] if k == "loops" else v for k, v in of_run(metrics).items()}


def coft_error(capsys, *argv):
    return one_line_error(coft.main, capsys, *argv)


def vecaf_args(tmp_path, *extra, out="run"):
    ckpt = tmp_path / "tiny-vit.pt"
    if not ckpt.exists():
        torch.save(randomized("tiny-vit").state_dict(), ckpt)
    return ["--dataset", "digits", "--clip", str(ckpt), "--clip-act", "quick_gelu", "--out", str(tmp_path / out),
            "--budget", "6",
            "--loops", "2", "--epochs", "2", "--batch", "4", "--iters", "20", "--ensemble", "2", "--log-every", "0",
            "--warmup-epochs", "1", "--lr", "0.01", *extra]


def run_vecaf(tmp_path, *extra, out="run"):
    return vecaf.main(vecaf_args(tmp_path, *extra, out=out))


def vecaf_stage(run_dir, tag):
    """A finished VeCAF stage file (a loop's selection or model, with its record)."""
    return torch.load(Path(run_dir) / "stages" / f"{tag}.pt", weights_only=True)


def craft_args(tmp_path, *extra, out="run", ckpt=None):
    """The CLI arguments of a small, fast CraFT run on the digits (a random tiny backbone by default)."""
    if ckpt is None:
        ckpt = tmp_path / "tiny-vit.pt"
        if not ckpt.exists():
            torch.save(randomized("tiny-vit").state_dict(), ckpt)
    return ["--clip", str(ckpt), "--clip-act", "quick_gelu", "--out", str(tmp_path / out), "--shots", "2", "--budget",
            "48", "--popsize", "8", "--intrinsic-dim", "16", "--log-every", "0", "--ckpt-every", "2", "--eval-split",
            "dev", *extra]


# ---- one set of images written in every form a file can hold them (imagefiles.decode_image's tests)

# EXIF orientation o -> what a viewer does to the stored pixels [H, W, ...] to show them upright, written from the
# tag's definition (row 0 / column 0 of the stored image is the shown image's ...), not from Pillow's table
SHOWN = {2: lambda a: a[:, ::-1],  # top / right: mirrored left-right
         3: lambda a: a[::-1, ::-1],  # bottom / right: turned half a turn
         4: lambda a: a[::-1],  # bottom / left: mirrored top-bottom
         5: lambda a: a.swapaxes(0, 1),  # left / top: mirrored along the main diagonal
         6: lambda a: np.rot90(a, -1),  # right / top: turned a quarter clockwise
         7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # right / bottom: mirrored along the other diagonal
         8: lambda a: np.rot90(a, 1)}  # left / bottom: turned a quarter anticlockwise
STORED = {o: SHOWN[{6: 8, 8: 6}.get(o, o)] for o in SHOWN}  # the inverse: what a camera stores for an upright view


def form_images(n=10):
    """n distinct images that no orientation maps onto themselves: the real digits of n classes
    (white on black, 32 x 32) on a 40 x 32 canvas with a grey mark in its top-left corner.
    -> grey [n, 40, 32] and colour [n, 40, 32, 3] uint8 numpy arrays."""
    task = data.digits_task()
    first = {}
    for image, label in task.test:
        first.setdefault(label, image[0].numpy())
    grey = np.zeros((n, 40, 32), np.uint8)
    for i in range(n):
        grey[i, 8:] = first[i % 10] if i < 10 else 255 - first[i % 10]
        grey[i, :4, :6] = 128
    colour = np.stack([grey, (grey * 0.6).astype(np.uint8), 255 - grey], -1)
    return grey, colour


def _exif(o):
    exif = Image.Exif()
    exif[0x0112] = o
    return exif


def over_white(c, a):
    """c [..., k] uint8 under alpha a [...] over white, rounded: the reference a viewer shows."""
    c, a = c.astype(np.int64), a.astype(np.int64)[..., None]
    return np.round((c * a + 255 * (255 - a)) / 255).astype(np.uint8)


def write_image_forms(folder, n=10):
    """The images of form_images written in every form imagefiles.decode_image reads, each beside a
    reference: the 8-bit RGB PNG of what a viewer shows, stored upright, which every decode
    reads alike. Returns [(form, file, reference file)]. Orientation: JPEG with EXIF orientation
    2..8 (the reference: its decoded stored pixels turned as the tag says), PNG, TIFF and
    lossless WebP with the tag; 16-bit PNG and TIFF (I;16, I;16B; values 257 g + noise in
    -128..128, which a viewer shows as g; a PNG with a 16-bit transparency key), 32-bit integer (I)
    and float (F) TIFF; transparency:
    LA and RGBA PNG with partial alpha, P with a transparent palette index, L and RGB with a
    transparency key, a two-frame GIF (its first frame read), whose transparent pixels carry junk
    colour; CMYK TIFF; 1-bit PNG and TIFF."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    grey, colour = form_images(n)
    rng = np.random.default_rng(0)
    out = []

    def add(form, i, write, reference):
        path, ref = folder / f"{form}_{i}", folder / f"{form}_{i}_reference.png"
        path = write(path)
        Image.fromarray(np.ascontiguousarray(reference)).save(ref)
        out.append((form, str(path), str(ref)))

    def save(image, suffix, **kw):
        def write(path):
            image.save(path.with_suffix(suffix), **kw)
            return path.with_suffix(suffix)
        return write

    for i in range(n):
        g, c = grey[i], colour[i]
        for o in SHOWN:
            stored = np.ascontiguousarray(STORED[o](c))
            jpeg = folder / f"jpeg-o{o}_{i}.jpg"
            Image.fromarray(stored).save(jpeg, exif=_exif(o))
            with Image.open(jpeg) as im:
                decoded = np.asarray(im.convert("RGB"))  # the stored pixels as decoded, not turned
            add(f"jpeg-o{o}", i, lambda p, jpeg=jpeg: jpeg, SHOWN[o](decoded))
            add(f"png-o{o}", i, save(Image.fromarray(stored), ".png", exif=_exif(o)), c)
            add(f"tiff-o{o}", i, save(Image.fromarray(stored), ".tif", tiffinfo={0x0112: o}), c)
            add(f"webp-o{o}", i, save(Image.fromarray(stored), ".webp", lossless=True, exif=_exif(o)), c)
        grey_rgb = np.repeat(g[..., None], 3, -1)
        wide = np.clip(g.astype(np.int64) * 257 + rng.integers(-128, 129, g.shape), 0, 65535)
        add("png-16bit", i, save(Image.fromarray(wide.astype(np.uint16)), ".png"), grey_rgb)
        add("tiff-16bit", i, save(Image.fromarray(wide.astype(np.uint16)), ".tif"), grey_rgb)
        add("tiff-16bit-big-endian", i, save(Image.fromarray(wide.astype(">u2")), ".tif"), grey_rgb)
        keyed = wide.copy()
        keyed[:, 28:] = 7  # a 16-bit transparency key (tRNS) on a band; any other pixel of value 7 is transparent too
        add("png-16bit-transparency-key", i, save(Image.fromarray(keyed.astype(np.uint16)), ".png", transparency=7),
            np.where(keyed[..., None] == 7, 255, grey_rgb).astype(np.uint8))
        add("tiff-32bit-int", i, save(Image.fromarray(wide.astype(np.int32)), ".tif"), grey_rgb)
        floats = np.clip(g / 255 + rng.uniform(-0.4, 0.4, g.shape) / 255, 0, 1).astype(np.float32)
        add("tiff-float", i, save(Image.fromarray(floats), ".tif"), grey_rgb)
        alpha = ((np.arange(40)[:, None] * 7 + np.arange(32)[None] * 3) % 256).astype(np.uint8)
        alpha[:, 20:] = 0  # a transparent band whose pixels hold junk
        junk = rng.integers(0, 256, c.shape, dtype=np.uint8)
        hidden = np.where(alpha[..., None] == 0, junk, c)
        add("png-LA", i, save(Image.fromarray(np.stack([hidden[..., 0], alpha], -1), "LA"), ".png"),
            np.repeat(over_white(hidden[..., :1], alpha), 3, -1))
        add("png-RGBA", i, save(Image.fromarray(np.dstack([hidden, alpha])), ".png"), over_white(hidden, alpha))
        index = np.maximum(g, 1)
        index[:, 20:] = 0  # index 0: transparent, its palette colour junk
        palette = Image.new("P", (32, 40))
        palette.putpalette([255, 0, 255] + [v for k in range(1, 256) for v in (k, k, k)])
        palette.frombytes(index.tobytes())
        shown = np.where(index[..., None] == 0, 255, np.repeat(index[..., None], 3, -1)).astype(np.uint8)
        add("png-P-transparent-index", i, save(palette, ".png", transparency=0), shown)
        second = palette.copy()
        second.frombytes(rng.integers(0, 256, (40, 32), dtype=np.uint8).tobytes())
        add("gif-P-transparent-index-first-of-2-frames", i,
            save(palette, ".gif", transparency=0, save_all=True, append_images=[second], optimize=False), shown)
        add("png-L-transparency-key", i, save(Image.fromarray(g), ".png", transparency=0),
            np.repeat(np.where(g == 0, 255, g)[..., None], 3, -1))
        key = (0, 0, 255)  # the background colour of `colour`
        add("png-RGB-transparency-key", i, save(Image.fromarray(c), ".png", transparency=key),
            np.where((c == key).all(-1, keepdims=True), 255, c).astype(np.uint8))
        add("tiff-CMYK", i, save(Image.frombytes("CMYK", (32, 40), np.dstack([255 - c, np.zeros_like(g)]).tobytes()),
                                 ".tif"), c)
        binary = np.where(g > 127, 255, 0).astype(np.uint8)
        one = Image.fromarray(binary).convert("1", dither=Image.Dither.NONE)
        add("png-1bit", i, save(one, ".png"), np.repeat(binary[..., None], 3, -1))
        add("tiff-1bit", i, save(one, ".tif"), np.repeat(binary[..., None], 3, -1))
    return out
