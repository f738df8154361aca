"""
The tasks a method adapts to: class names, hand-written prompt templates, and (source, label)
items per split, from the offline demo's real handwritten digits or from datasets on disk (the
CoOp layout, any image folder, CIFAR), plus the image datasets and augmentations that read them.

The offline demo's target: the UCI "Optical Recognition of Handwritten Digits" test set, vendored
as assets/uci_digits_test.csv.gz (1,797 images of 8x8 pixels, 17 grey levels). UCI made each image
from a 32x32 binary bitmap of a handwritten digit by counting the ink pixels in every 4x4 block
(digits_to_images; standin.py renders its source domain through the same acquisition).
"""
import csv
import gzip
import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

import clip_model
import imagefiles
from imagefiles import DataError  # the data's one-line error, raised here and there

ASSETS = Path(__file__).parent / "assets"

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_TEMPLATE = "a photo of the number {}."  # also one of the stand-in's caption templates


# what a CLI reports in one line (runs.run_cli) besides its own errors: the data's and the backbone's
USER_ERRORS = (DataError, clip_model.CLIPError)


# -----------------------------------------------------------------------------
# target domain: real handwritten digits

def load_uci_digits():
    """Returns x: uint8 [1797, 8, 8] with values 0..16, y: int64 [1797] in 0..9."""
    path = ASSETS / "uci_digits_test.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing; restore it with `git checkout -- assets/`")
    with gzip.open(path, "rt", newline="") as f:
        rows = [[int(v) for v in row] for row in csv.reader(f) if row]
    t = torch.tensor(rows, dtype=torch.int64)  # [1797, 65]: 64 pixels, then the label
    if t.shape != (1797, 65):
        raise DataError(f"{path} has shape {tuple(t.shape)}, expected (1797, 65); re-vendor the file")
    return t[:, :64].reshape(-1, 8, 8).to(torch.uint8), t[:, 64]


def digits_split(seed=0):
    """
    Fixed stratified split of the 1,797 UCI digits into index tensors.
    Per class: 10% dev, 40% test, the rest (~50%) train, the unlabelled pool a
    method adapts on. Sizes (the same for any seed): train 899, dev 179, test 719.
    """
    _, y = load_uci_digits()
    g = torch.Generator().manual_seed(seed)
    parts = dict(train=[], dev=[], test=[])
    for c in range(10):
        idx = torch.nonzero(y == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_dev, n_test = round(0.1 * len(idx)), round(0.4 * len(idx))
        parts["dev"].append(idx[:n_dev])
        parts["test"].append(idx[n_dev:n_dev + n_test])
        parts["train"].append(idx[n_dev + n_test:])
    return {k: torch.sort(torch.cat(v)).values for k, v in parts.items()}


def digits_to_images(x8, size=32):
    """
    8x8 ink counts (0..16) -> float images [N, 3, size, size] in [0, 1].
    White ink on black, value v/16. Upsampling is nearest-neighbour, so every
    pixel stays one of the 17 levels k/16 and no detail is invented; the three
    channels are copies because CLIP's first conv takes RGB.
    """
    x = x8.to(torch.float32).div(16).unsqueeze(1)  # [N, 1, 8, 8]
    x = F.interpolate(x, size=(size, size), mode="nearest")  # [N, 1, size, size]
    return x.expand(-1, 3, -1, -1).contiguous()  # [N, 3, size, size]


# -----------------------------------------------------------------------------
# Tasks: what the methods see. A task is class names, hand-written templates, and lists of
# (source, label) items per split, a source being an image path or a uint8 tensor [3, H, W].

@dataclass
class Task:
    name: str
    classnames: list
    templates: list  # hand-written prompt templates with "{}"; templates[0] is the primary one
    train: list  # [(source, label)]: labels are for diagnosis only, no method reads them
    test: list
    dev: list = field(default_factory=list)  # labelled, only for choosing hyperparameters
    # whether horizontal flips respect the data: every CoOp dataset is natural photos (or satellite
    # views, or video frames) whose class survives a mirror image, as in CoOp's own augmentation;
    # not digits or text
    flip: bool = True
    prompts: list | None = None  # per-class prompt lists from a {class: [prompts]} file (your own images)
    root: str | None = None  # the folder that files a person writes name images relative to (item_key)
    digests: dict | None = None  # split -> every image's content digest, uint8 [N, 16] (know_contents)
    check_root: str | None = None  # your own images' check set folder (--check): its images' keys are relative to it
    # whether image files are turned as their EXIF Orientation tag says, as a viewer shows them (decode_image): your
    # own images, imagefolder; not the papers' benchmark datasets (CoOp's, FGVC-Aircraft, ImageNet and its shifts),
    # whose pipelines decoded without it, so that their numbers stay comparable; in-memory images have no tag
    exif_orientation: bool = True


def thicken(x8):
    """Bolder strokes on 8x8 ink counts (0..16): each block gains half the ink of the inkiest
    block in its 3x3 neighbourhood (itself included), capped at 16, so strokes spread into the
    blocks next to them and their own blocks fill up, as a thicker pen scanned the same way would.
    The stand-in met bold digits in pretraining ("a bold {d}." captions, low ink thresholds)."""
    x = x8.float()[:, None]  # [N, 1, 8, 8]
    bold = x + 0.5 * F.max_pool2d(x, 3, stride=1, padding=1)
    return bold.clamp(max=16).round().to(torch.uint8)[:, 0]


def digits_task(shift=None):
    """The offline demo's task: real handwritten digits (UCI), split train/dev/test.
    shift="bold" (dataset digits-bold): the test split's strokes thickened (`thicken`), the train
    and dev splits as they are: a target domain with no train images (VeCAF's OOD demo).
    shift="bold-all" (dataset digits-bold-all): every split thickened, so the unlabelled pool is
    the shifted domain too: CoFT's second demo, where the stand-in's zero-shot labels are noisy
    (58-59 % right on train / dev) while its features still hold the classes (a linear probe
    reaches 95 on dev); docs/demo.md says how it was chosen."""
    x8, y = load_uci_digits()
    split = digits_split(0)
    thick = {"bold": ("test",), "bold-all": ("train", "dev", "test")}.get(shift, ())
    parts = {}
    for name, idx in split.items():
        x = thicken(x8[idx]) if name in thick else x8[idx]
        images = (digits_to_images(x) * 255).round().to(torch.uint8)  # [n, 3, 32, 32]
        parts[name] = [(im, int(label)) for im, label in zip(images, y[idx])]
    templates = [DIGITS_TEMPLATE, "a handwritten {}.", "the digit {}", "an image of the digit {}.",
                 "a drawing of the numeral {}."]  # [0] for CoFT; all for CoFT+'s template ensemble
    return Task("digits" if shift is None else f"digits-{shift}", list(DIGIT_NAMES), templates,
                parts["train"], parts["test"], parts["dev"], flip=False)


class ImageDataset(torch.utils.data.Dataset):
    """(transform(image), label, index) over a list of (source, label) items; `labels`, if given,
    replaces the items' labels (pseudo-labels). An item without a label (your own images) gives
    -1, which only the label-free passes (features, scores) meet: they never read it. Files are
    read by imagefiles.decode_image, turned by their EXIF orientation where `exif_orientation` (pass the
    task's: False for the papers' benchmark datasets)."""

    def __init__(self, items, transform, labels=None, exif_orientation=True):
        self.items, self.transform, self.exif_orientation = items, transform, exif_orientation
        self.labels = [-1 if label is None else label for _, label in items] if labels is None else list(labels)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image = imagefiles.load_image(self.items[i][0], exif_orientation=self.exif_orientation)
        return self.transform(image), self.labels[i], i


def make_transform(kind, visual, task):
    """The transforms for an image tower `visual` (its resolution, and the mean/std and test
    resize its weights were trained with):
    test: CLIP's test transform (clip_model.preprocess_of).
    weak: DeFT's (resize to 8/7 of the resolution, random crop, flip where the data allows).
    strong: random resized crop, flip where allowed, RandAugment.
    crop: random resized crop of 50-100% of the area, flip where allowed (CraFT's and Tip-Adapter's
    few-shot augmentation).
    inception: random resized crop of 8-100% of the area, flip where allowed (the standard ImageNet
    training crop; CraFT's ImageNet data).
    Works on PIL images and on uint8 tensors alike (torchvision.transforms.v2)."""
    if kind == "test":
        return clip_model.preprocess_of(visual)
    resolution = visual.resolution
    bicubic = v2.InterpolationMode.BICUBIC
    flip = [v2.RandomHorizontalFlip()] if task.flip else []
    if kind == "weak":
        body = [v2.Resize(round(resolution * 8 / 7), interpolation=bicubic, antialias=True),
                v2.RandomCrop(resolution)] + flip
    elif kind in ("crop", "inception"):
        low = 0.5 if kind == "crop" else 0.08
        body = [v2.RandomResizedCrop(resolution, scale=(low, 1.0), interpolation=bicubic, antialias=True)] + flip
    elif kind == "strong":
        body = [v2.RandomResizedCrop(resolution, scale=(0.5, 1.0), interpolation=bicubic, antialias=True)] + flip + \
               [v2.RandAugment()]
    else:
        raise ValueError(f"unknown transform {kind!r}")
    return v2.Compose([v2.ToImage()] + body + [v2.ToDtype(torch.float32, scale=True),
                                               v2.Normalize(visual.image_mean, visual.image_std)])


# -----------------------------------------------------------------------------
# real datasets on disk: the CoOp benchmark, any ImageFolder, CIFAR
#
# Every loader returns a Task whose train/dev/test items are (source, label),
# with source an absolute image path (str) or, for CIFAR, a uint8 tensor
# [3, 32, 32] held in memory. Loaders only list and check files; images are
# decoded later by the dataset class, which names any file it cannot read.
# All problems the user can fix raise DataError with a one-line message that
# says what is wrong and what to do, so the CLI can print it without a traceback.

# Extra templates for template ensembles, appended after a task's primary one.
# They are a few of CLIP's ImageNet prompts that read well for any object class.
GENERIC_TEMPLATES = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a low resolution photo of a {}.",
    "itap of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
]


def _templates(primary, extras=GENERIC_TEMPLATES):
    """The primary (hand-written, dataset-specific) template first, then the extras minus duplicates."""
    return [primary] + [t for t in extras if t != primary]


# The CoOp benchmark (Zhou et al., "Learning to Prompt for Vision-Language Models"),
# laid out as in CoOp's DATASETS.md: DATA/<folder>/<image dir>/... and, beside
# the images, a split file split_zhou_<Name>.json with CoOp's fixed train/val/test
# splits. The primary templates are CoOp's hand-written ones. The split files already
# carry CoOp's cleaned class names (e.g. EuroSAT "Annual Crop Land", Caltech "face"
# for "Faces"), so the only fix left is "_" -> " ".
# name: (folder, image dir inside the folder, split file, primary template)
COOP_DATASETS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}."),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "a photo of a {}, a type of flower."),
    "food101": ("food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
}
# Two CoOp datasets come without a split file; their own layouts are read below.
FGVC_AIRCRAFT_TEMPLATE = "a photo of a {}, a type of aircraft."
IMAGENET_TEMPLATE = "a photo of a {}."

# For classes that are not objects the generic extras read badly ("a photo of a banded."),
# so these datasets get extras in their own words instead.
EXTRA_TEMPLATES = {
    "dtd": ["a photo of a {} texture.", "a photo of a {} pattern.", "a close-up photo of a {} texture."],
    "eurosat": ["a satellite photo of {}.", "an aerial photo of {}.", "a low resolution satellite photo of {}."],
    "ucf101": ["a video frame of a person doing {}.", "a blurry photo of a person doing {}.",
               "a photo of people doing {}."],
}

# One-line layout descriptions for error messages; {data} stands for --data-root.
FGVC_LAYOUT = ("{data}/fgvc_aircraft/images/<id>.jpg, {data}/fgvc_aircraft/variants.txt and "
               "{data}/fgvc_aircraft/images_variant_{{train,val,test}}.txt "
               "(from fgvc-aircraft-2013b/data, see CoOp's DATASETS.md)")
IMAGENET_LAYOUT = ("{data}/imagenet/images/train/<wnid>/*.JPEG, {data}/imagenet/images/val/<wnid>/*.JPEG and "
                   "{data}/imagenet/classnames.txt with lines '<wnid> <class name>' (see CoOp's DATASETS.md)")
IMAGEFOLDER_LAYOUT = ("{data}/train/<class>/<images>, {data}/test/<class>/<images>, "
                      "optionally {data}/val/<class>/<images>")


def _layout(name, data="DATA"):
    """The expected on-disk layout for a task name in one line, with the data root spelled `data`."""
    if name in COOP_DATASETS:
        folder, image_dir, split_file, _ = COOP_DATASETS[name]
        images = os.path.join(data, folder, image_dir, "...")
        split = os.path.join(data, folder, split_file)
        return f"{images} and {split} (CoOp layout, see CoOp's DATASETS.md)"
    if name in CIFAR:
        return f"{os.path.join(data, CIFAR[name][1])}/ as written by torchvision's download=True"
    layout = {"fgvc_aircraft": FGVC_LAYOUT, "imagenet": IMAGENET_LAYOUT, "imagefolder": IMAGEFOLDER_LAYOUT}[name]
    return layout.format(data=data)


def _check_root(name, root):
    """The data root as an absolute str path; DataError if it is not given or not a directory."""
    if root is None or str(root) == "":
        raise DataError(f"--data-root is required for {name}; expected layout: {_layout(name)}")
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DataError(f"--data-root {root} is not a directory; expected layout for {name}: {_layout(name)}")
    return root


def _short(x, n=100):
    """repr(x) cut to n characters, so a bad item cannot blow up a one-line message."""
    r = repr(x)
    return r if len(r) <= n else r[:n - 3] + "..."


def missing_files(paths):
    """
    The paths (in input order) that are not existing files.
    One os.stat per file is slow on network file systems and with cold caches, so
    instead each directory that the paths mention is listed once (os.scandir) and
    names are looked up in a set; for 100k files in 200 folders this takes ~0.15 s
    (vs ~0.3 s for os.path.isfile per path, warm local disk). A name not in the
    listing is confirmed with os.path.isfile, which keeps the answer exact on
    case-insensitive file systems and for odd paths ("a/../b").
    """
    listings = {}  # directory -> set of file names in it
    missing = []
    for p in paths:
        d, f = os.path.split(p)
        names = listings.get(d)
        if names is None:
            try:
                with os.scandir(d) as it:
                    names = {e.name for e in it if e.is_file()}  # is_file follows symlinks, like isfile
            except OSError:  # directory missing or unreadable: every file in it counts as missing
                names = set()
            listings[d] = names
        if f not in names and not os.path.isfile(p):
            missing.append(p)
    return missing


def _check_exist(items, listed_in, base):
    """DataError naming the count and the first few missing images, if any item's file is missing."""
    missing = missing_files([p for p, _ in items])
    if missing:
        shown = ", ".join(os.path.relpath(p, base) for p in missing[:3])
        raise DataError(f"{listed_in} lists {len(missing)} of {len(items)} images that do not exist under {base} "
                        f"(e.g. {shown}); re-extract the images there or fix the data root")


def _classnames_from_labels(label_names, source):
    """{label: name} -> [name of label 0, name of label 1, ...]; every label 0..C-1 must be present."""
    n = max(label_names) + 1
    gaps = [c for c in range(n) if c not in label_names]
    if gaps:
        raise DataError(f"{source} has labels up to {n - 1} but no item with label{'s' if len(gaps) > 1 else ''} "
                        f"{gaps[:5]}; labels must be 0..C-1 with C the number of classes")
    return [label_names[c].replace("_", " ") for c in range(n)]


# -----------------------------------------------------------------------------
# CoOp datasets with a split_zhou_*.json file

def _read_coop_split(split_path, image_dir):
    """
    Reads a CoOp split file: {"train"|"val"|"test": [[relative_path, label, classname], ...]}.
    Returns ({split: [(absolute path, label)]}, {label: classname}); DataError on any malformed entry.
    """
    try:
        with open(split_path, encoding="utf-8") as f:
            splits = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{split_path} is not valid JSON ({e}); download the split file again") from None
    except OSError as e:
        raise DataError(f"cannot read {split_path}: {e.strerror}") from None
    if not isinstance(splits, dict) or not all(k in splits for k in ("train", "val", "test")):
        have = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
        raise DataError(f"{split_path} must be a JSON object with keys 'train', 'val', 'test' (found {_short(have)}); "
                        f"download the split file again")
    out, label_names = {}, {}
    for split in ("train", "val", "test"):
        entries = splits[split]
        if not isinstance(entries, list):
            raise DataError(f"{split_path}: '{split}' must be a list of [relative_path, label, classname]")
        items = []
        for i, e in enumerate(entries):
            # bool is an int in Python; a true/false label is still malformed
            ok = (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[2], str)
                  and isinstance(e[1], int) and not isinstance(e[1], bool) and e[1] >= 0)
            if not ok:
                raise DataError(f"{split_path}: item {i} of '{split}' is {_short(e)}, "
                                f"expected [relative_path, label >= 0, classname]")
            rel, label, cname = e
            if label_names.setdefault(label, cname) != cname:
                raise DataError(f"{split_path}: label {label} is named both {label_names[label]!r} and {cname!r}")
            # normpath so that the existence check and later users see one spelling per file
            items.append((os.path.normpath(os.path.join(image_dir, rel)), label))
        out[split] = items
    if not out["train"] or not out["test"]:
        raise DataError(f"{split_path} has an empty 'train' or 'test' split; download the split file again")
    return out, label_names


def coop_task(name, root):
    """
    One of the CoOp benchmark datasets from the CoOp layout under root (the DATA folder):
    split 'train' -> Task.train, 'val' -> Task.dev, 'test' -> Task.test.
    """
    if name == "fgvc_aircraft":
        return fgvc_aircraft_task(root)
    if name == "imagenet":
        return imagenet_task(root)
    if name not in COOP_DATASETS:
        raise DataError(f"unknown CoOp dataset {name!r}; known: {', '.join(COOP_NAMES)}")
    root = _check_root(name, root)
    folder, image_dir, split_file, template = COOP_DATASETS[name]
    image_dir = os.path.join(root, folder, image_dir)  # image_dir "" (stanford_cars): the folder itself
    split_path = os.path.join(root, folder, split_file)
    for p in (image_dir, split_path):
        if not os.path.exists(p):
            hint = ""
            if os.path.exists(os.path.join(root, split_file)):  # a common slip: --data-root DATA/dtd for DATA
                hint = f"; --data-root should be the folder that contains {folder}/"
            raise DataError(f"{name}: {p} not found; expected {_layout(name, root)}{hint}")

    splits, label_names = _read_coop_split(split_path, image_dir)
    classnames = _classnames_from_labels(label_names, split_path)
    _check_exist(splits["train"] + splits["val"] + splits["test"], split_path, image_dir)
    templates = _templates(template, EXTRA_TEMPLATES.get(name, GENERIC_TEMPLATES))
    return Task(name=name, classnames=classnames, templates=templates,
                train=splits["train"], test=splits["test"], dev=splits["val"], flip=True, exif_orientation=False)


# -----------------------------------------------------------------------------
# FGVC-Aircraft: the dataset's own list files (CoOp uses them as is)

def fgvc_aircraft_task(root):
    """
    FGVC-Aircraft (variant level, 100 classes) under root/fgvc_aircraft: variants.txt gives
    the classes in label order, images_variant_{train,val,test}.txt give '<id> <variant>' lines.
    """
    name = "fgvc_aircraft"
    root = _check_root(name, root)
    base = os.path.join(root, "fgvc_aircraft")
    image_dir = os.path.join(base, "images")
    lists = {s: os.path.join(base, f"images_variant_{s}.txt") for s in ("train", "val", "test")}
    variants_path = os.path.join(base, "variants.txt")
    for p in [image_dir, variants_path, *lists.values()]:
        if not os.path.exists(p):
            raise DataError(f"{name}: {p} not found; expected {_layout(name, root)}")

    with open(variants_path, encoding="utf-8") as f:
        variants = [line.strip() for line in f if line.strip()]
    if not variants or len(set(variants)) != len(variants):
        raise DataError(f"{variants_path} must list each class name once, one per line")
    label_of = {v: i for i, v in enumerate(variants)}

    splits = {}
    for split, path in lists.items():
        items = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                # the variant name may itself contain spaces ("Cessna 172"): split once
                parts = line.strip().split(" ", 1)
                if len(parts) != 2 or parts[1] not in label_of:
                    raise DataError(f"{path}:{lineno}: {_short(line.strip())} is not '<image id> <variant>' "
                                    f"with a variant from variants.txt")
                items.append((os.path.join(image_dir, parts[0] + ".jpg"), label_of[parts[1]]))
        splits[split] = items
    if not splits["train"] or not splits["test"]:
        raise DataError(f"{name}: the train or test list in {base} is empty; download the dataset again")
    _check_exist(splits["train"] + splits["val"] + splits["test"], f"{base}/images_variant_*.txt", image_dir)
    return Task(name=name, classnames=[v.replace("_", " ") for v in variants],
                templates=_templates(FGVC_AIRCRAFT_TEMPLATE), train=splits["train"], test=splits["test"],
                dev=splits["val"], flip=True, exif_orientation=False)


# -----------------------------------------------------------------------------
# folders of class folders: ImageNet (CoOp layout) and any ImageFolder

def _read_class_folders(split_dir, class_folders, what, empty_ok=False):
    """[(path, label)] for the images in split_dir/<class_folders[label]>/ (imagefiles.list_images: each file
    once, every problem in one line); every class must have images, and a file that two class
    folders reach (through links) is refused: it would carry two labels. `empty_ok`: a class folder
    may hold none (a test set of some classes)."""
    items, seen, label_of = [], {}, {}
    for label, c in enumerate(class_folders):
        folder = os.path.join(split_dir, c)
        listing = imagefiles.list_images(folder, seen)
        listing.refuse_problems(what)
        if not listing.files and not empty_ok:
            raise DataError(f"{what}: {folder} has no images (looked for {' '.join(imagefiles.IMAGE_EXTENSIONS)}); "
                            f"every class needs at least one")
        for path, first in listing.repeats:
            if label_of.get(first, label) != label:
                raise DataError(f"{what}: {path} and {first} are one file (a link), so it would be an image of two "
                                f"classes, {class_folders[label_of[first]]!r} and {c!r}: keep it in one class folder")
        items.extend((p, label) for p in listing.files)
        label_of.update((p, label) for p in listing.files)
    return items


def _subfolders(d):
    """Sorted names of the (non-hidden) subdirectories of d."""
    with os.scandir(d) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _check_same_classes(split_dir, classes, reference, what):
    """DataError unless split_dir has exactly the class folders `classes` (those of `reference`)."""
    have = _subfolders(split_dir)
    if have != classes:
        only_here = sorted(set(have) - set(classes))[:3]
        absent = sorted(set(classes) - set(have))[:3]
        raise DataError(f"{what}: the class folders of {split_dir} differ from those of {reference} "
                        f"(missing {absent}, extra {only_here}); every split needs the same class folders")


def imagenet_task(root):
    """
    ImageNet-1k in the CoOp layout under root/imagenet: train = images/train, test = images/val
    (the usual 50k validation images), no dev split. Class names from classnames.txt
    ('<wnid> <name>' lines; CoOp's file holds CLIP's cleaned names); labels follow its order.
    """
    name = "imagenet"
    root = _check_root(name, root)
    base = os.path.join(root, "imagenet")
    names_path = os.path.join(base, "classnames.txt")
    train_dir, val_dir = os.path.join(base, "images", "train"), os.path.join(base, "images", "val")
    for p in (train_dir, val_dir, names_path):
        if not os.path.exists(p):
            raise DataError(f"{name}: {p} not found; expected {_layout(name, root)}")
    wnids, classnames = _imagenet_classes(names_path)
    # the class folders must be exactly the wnids of classnames.txt, in both splits
    for d in (train_dir, val_dir):
        _check_same_classes(d, sorted(wnids), names_path, name)
    train = _read_class_folders(train_dir, wnids, name)
    test = _read_class_folders(val_dir, wnids, name)
    return Task(name=name, classnames=classnames, templates=_templates(IMAGENET_TEMPLATE),
                train=train, test=test, dev=[], flip=True, exif_orientation=False)


def _imagenet_classes(names_path):
    """(wnids, class names) from CoOp's imagenet/classnames.txt ('<wnid> <name>' lines), in its order."""
    wnids, classnames = [], []
    with open(names_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(" ", 1)
            if len(parts) != 2:
                raise DataError(f"{names_path}:{lineno}: {_short(line.strip())} is not '<wnid> <class name>'")
            wnids.append(parts[0])
            classnames.append(parts[1].strip().replace("_", " "))
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{names_path} lists a wnid twice; each class must appear once")
    return wnids, classnames


# ImageNet's distribution shifts in CoOp's layout (its DATASETS.md): name -> (folder under the data
# root, its image folder, what the class folders are named by)
IMAGENET_SHIFTS = {
    "imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", "index"),
    "imagenet_sketch": ("imagenet-sketch", "images", "wnid"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", "wnid"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", "wnid"),
}


def imagenet_shift(name, root):
    """A test set of ImageNet under distribution shift (IMAGENET_SHIFTS), for evaluating a model
    trained on ImageNet: (items [(path, ImageNet label)], classes [the ImageNet labels it covers,
    sorted]). Labels index imagenet/classnames.txt's order; ImageNet-V2's class folders are those
    indices, the others' are wnids (ImageNet-A and -R cover 200 of the 1000 classes)."""
    if name not in IMAGENET_SHIFTS:
        raise DataError(f"unknown distribution-shift set {name!r}; known: {', '.join(IMAGENET_SHIFTS)}")
    root = _check_root("imagenet", root)
    names_path = os.path.join(root, "imagenet", "classnames.txt")
    folder, images, named_by = IMAGENET_SHIFTS[name]
    image_dir = os.path.join(root, folder, images)
    for p in (names_path, image_dir):
        if not os.path.exists(p):
            raise DataError(f"{name}: {p} not found; expected {root}/{folder}/{images}/<class folder>/* beside "
                            f"{_layout('imagenet', root)} (see CoOp's DATASETS.md)")
    wnids, _ = _imagenet_classes(names_path)
    label_of = {str(i): i for i in range(len(wnids))} if named_by == "index" else {w: i for i, w in enumerate(wnids)}
    folders = _subfolders(image_dir)
    unknown = [f for f in folders if f not in label_of]
    if not folders:
        raise DataError(f"{name}: {image_dir} has no class folders")
    if unknown:
        raise DataError(f"{name}: {image_dir} has class folders that are not ImageNet "
                        f"{'class indices' if named_by == 'index' else 'wnids'} of {names_path}, e.g. {unknown[0]!r}")
    classes = sorted(label_of[f] for f in folders)
    items = _read_class_folders(image_dir, folders, name, empty_ok=True)
    items = [(p, label_of[folders[k]]) for p, k in items]
    if not items:
        raise DataError(f"{name}: {image_dir} has no images")
    problems = imagefiles.contents([p for p, _ in items])[1]  # its images checked before any work, as a task's are
    if problems:
        shown = [(_shown(p, image_dir), why) for p, why in problems]
        raise DataError(f"{name}: {imagefiles.problems_line(shown, len(items))}")
    return items, classes


def imagefolder_task(root):
    """
    Any dataset as root/train/<class>/*, root/test/<class>/* and optionally root/val/<class>/*
    (-> dev). Classes are the sorted folder names of train ("_" -> " " in the class names the
    text tower sees); test and val must have the same class folders.
    """
    name = "imagefolder"
    root = _check_root(name, root)
    train_dir, test_dir, val_dir = (os.path.join(root, s) for s in ("train", "test", "val"))
    for p in (train_dir, test_dir):
        if not os.path.isdir(p):
            raise DataError(f"imagefolder: {p} not found; expected {_layout(name, root)}")
    classes = _subfolders(train_dir)
    if not classes:
        raise DataError(f"imagefolder: {train_dir} has no class folders; expected {_layout(name, root)}")
    splits = {}
    for split, d in (("train", train_dir), ("test", test_dir), ("val", val_dir)):
        if split == "val" and not os.path.isdir(d):
            splits[split] = []  # val is optional
            continue
        if split != "train":
            _check_same_classes(d, classes, train_dir, name)
        splits[split] = _read_class_folders(d, classes, name)
    return Task(name=name, classnames=[c.replace("_", " ") for c in classes],
                templates=_templates("a photo of a {}."), train=splits["train"], test=splits["test"],
                dev=splits["val"], flip=True)


# -----------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 via torchvision (python version), held in memory

# name: (torchvision class name, folder torchvision expects under root)
CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
    # CIFAR-100N (Wei et al. 2022) re-labels CIFAR-100's training images by human annotators.
    # Its images and test set are CIFAR-100's, and a label-free method never reads training
    # labels (they are for diagnosis only), so here it is CIFAR-100 under another name.
    "cifar100n": ("CIFAR100", "cifar-100-python"),
}


def cifar_task(name, root):
    """
    CIFAR-10/100 from torchvision's on-disk format under root (root/cifar-10-batches-py or
    root/cifar-100-python). Never downloads: a missing or corrupt copy is a DataError that
    says how to fetch it. Items are uint8 tensors [3, 32, 32]; no dev split.
    """
    import torchvision  # lazily: only CIFAR needs it

    root = _check_root(name, root)
    cls_name, folder = CIFAR[name]
    cls = getattr(torchvision.datasets, cls_name)
    fetch = (f"python -c \"import torchvision; torchvision.datasets.{cls_name}('{root}', download=True)\" "
             f"(on a machine with internet, then copy {folder}/ into {root})")
    if not os.path.isdir(os.path.join(root, folder)):
        raise DataError(f"{name}: {os.path.join(root, folder)} not found; download it with {fetch}")

    splits = {}
    for split in ("train", "test"):
        try:
            # download=False: torchvision verifies the md5 of every file and raises RuntimeError
            ds = cls(root, train=(split == "train"), download=False)
        except RuntimeError:
            raise DataError(f"{name}: {os.path.join(root, folder)} is incomplete or corrupted (md5 check failed); "
                            f"delete it and download again with {fetch}") from None
        # ds.data: uint8 numpy [N, 32, 32, 3]; one contiguous [N, 3, 32, 32] tensor, then per-image
        # views of it, so the items share one block of memory (50k images = 150 MB)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits[split] = list(zip(x.unbind(0), (int(t) for t in ds.targets)))
        classes = ds.classes
    return Task(name=name, classnames=[c.replace("_", " ") for c in classes],
                templates=_templates("a photo of a {}."), train=splits["train"], test=splits["test"],
                dev=[], flip=True)


# -----------------------------------------------------------------------------
# Your own images: an unlabelled folder, class names, optionally a labelled check set and the
# labels a person gives (one CSV format for every method: a header naming `path` and `class`)

DEFAULT_TEMPLATE = "a photo of a {}."  # the zero-shot template of --images unless --template


def check_template(template, flag="--template"):
    """A zero-shot template has exactly one {} for the class name and no other braces, else one
    line (str.format would fail later, after the expensive passes)."""
    try:
        one = "{}" in template and template.format("\0").count("\0") == 1
    except (IndexError, KeyError, ValueError):
        one = False
    if not one:
        raise DataError(f"{flag} {template!r} needs exactly one {{}} for the class name and no other braces, "
                        f"e.g. 'a photo of a {{}}.'")
    return template


def with_template(task, template):
    """The task with `template` as its primary (zero-shot) template, its other templates kept."""
    task.templates = _templates(check_template(template), task.templates)
    return task


class DuplicateKey(ValueError):
    """A JSON object names one key twice, where json.loads would keep the last value silently."""


def json_object(pairs):
    """json.loads' object_pairs_hook for a file a person writes: the object as a dict, or
    DuplicateKey naming the first key given twice (its first value would be lost without a word)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


def read_classes(path):
    """--classes: a text file with one class name per line, or a JSON {class: [prompts]} file
    (CuPL's format, as --llm-prompts), whose keys are the classes in file order and whose prompts
    make the zero-shot classifier. -> (class names, prompts or None).
    The text file's rules: blank lines and lines starting with '#' (comments) are skipped; a comma
    or a tab in a name, or a ' #' inside a line, is refused (a pasted CSV or list, an inline
    comment), as is a class given twice; in the JSON file a class given twice is refused (json
    would keep only its last prompts)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"--classes {path}: no such file; give a text file with one class name per line, or a "
                        f"JSON {{class: [prompts]}} file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--classes {path} cannot be read as UTF-8 text ({type(e).__name__}): give a text file with "
                        f"one class name per line") from None
    if str(path).lower().endswith(".json") or text.lstrip().startswith("{"):
        try:
            table = json.loads(text, object_pairs_hook=json_object)
        except DuplicateKey as e:
            raise DataError(f"--classes {path}: the class {e.args[0]!r} is a key twice (JSON would keep only its last "
                            f"prompts): merge its prompts into one list") from None
        except ValueError as e:
            raise DataError(f"--classes {path} is not valid JSON ({e}); give {{class: [prompts]}}") from None
        ok = isinstance(table, dict) and table and all(
            isinstance(v, list) and v and all(isinstance(p, str) and p.strip() for p in v) for v in table.values())
        if not ok:
            raise DataError(f"--classes {path}: expected a JSON object {{class name: [prompts]}} with a non-empty "
                            f"list of non-empty strings for every class")
        classnames = [c.strip() for c in table]
        prompts = [[p.strip() for p in v] for v in table.values()]
    else:
        classnames, prompts, line_of = [], None, {}
        for lineno, line in enumerate(text.splitlines(), 1):
            name = line.strip()
            if not name or name.startswith("#"):  # a blank line or a comment
                continue
            for mark, what in ((",", "a comma"), ("\t", "a tab"), (" #", "a ' #'")):
                if mark in name:
                    raise DataError(f"--classes {path}: line {lineno} {_short(name, 60)} holds {what}: the file is one "
                                    f"class name per line, alone (a comment is a line of its own starting with #)")
            if name in line_of:
                raise DataError(f"--classes {path}: line {lineno} repeats the class {name!r} of line {line_of[name]}; "
                                f"list each class once")
            line_of[name] = lineno
            classnames.append(name)
    if any(not c for c in classnames):
        raise DataError(f"--classes {path}: a class name is empty")
    check_classnames(classnames, f"--classes {path}")
    return classnames, prompts


def check_set(folder, classnames, pool_folder, seen):
    """--check: a labelled check set as folder/<class>/<images> (searched recursively), a class
    folder named as its class in --classes (case and "_" for " " aside); classes without a
    folder are allowed. Items in class order, each class's files sorted (imagefiles.list_images). No file
    of it may be an image of the pool (`seen`: the pool listing's, so that a link from one folder
    into the other is found too), nor reached from two class folders. -> (items, problems)."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"--check {folder} is not a folder; give a folder of class folders, <check>/<class>/<images>")
    real, real_pool = os.path.realpath(folder), os.path.realpath(pool_folder)
    if os.path.commonpath([real, real_pool]) in (real, real_pool):
        raise DataError(f"--check {folder} and --images {pool_folder} overlap: a check image would also be an "
                        f"unlabelled training image; keep the check set in a folder of its own")
    label_of = {prompt_name(c): k for k, c in enumerate(classnames)}
    folders = _subfolders(folder)
    unknown = [f for f in folders if prompt_name(f) not in label_of]
    if unknown:
        raise DataError(f"--check {folder}: the class folder {unknown[0]!r} names none of the {len(classnames)} "
                        f"classes of --classes ({', '.join(classnames[:4])}{', ...' if len(classnames) > 4 else ''}); "
                        f"rename or remove it")
    items, problems, class_of = [], [], {}
    for f in sorted(folders, key=lambda f: label_of[prompt_name(f)]):
        listing = imagefiles.list_images(os.path.join(folder, f), seen)
        for path, first in listing.repeats:
            if not first.startswith(folder + os.sep):
                raise DataError(f"--check {folder} and --images {pool_folder} share files: {path} is {first} (a link), "
                                f"so a check image would also be an unlabelled training image; keep the check set "
                                f"apart from the pool")
            if class_of[first] != f:
                raise DataError(f"--check {folder}: {path} and {first} are one file (a link), so it would be a check "
                                f"image of two classes, {class_of[first]!r} and {f!r}: keep it in one class folder")
        items += [(p, label_of[prompt_name(f)]) for p in listing.files]
        class_of.update((p, f) for p in listing.files)
        problems += listing.problems
    if not items and not problems:
        raise DataError(f"--check {folder} holds no images in class folders (looked for "
                        f"{' '.join(imagefiles.IMAGE_EXTENSIONS)} in <check>/<class>/)")
    return items, problems


def images_task(images, classes, template=None, check=None, flip=True):
    """Your own images as a Task: the unlabelled pool (train) is every image under `images`
    (imagefiles.list_images: searched recursively, in sorted order, each file once), with no label; the
    classes (and a prompt file's prompts) from `classes` (read_classes); the zero-shot template
    `template` (default DEFAULT_TEMPLATE); the test split the labelled check set `check`
    (check_set), else none; `flip`: whether a mirror image keeps the class (photos: yes; text,
    digits: no). Every file is read now (know_contents), so that whatever cannot be read is
    named, all at once, before any work; check images whose content is a pool image's are
    warned about (a file both folders reach is refused by check_set)."""
    images = os.path.abspath(images)
    if not os.path.isdir(images):
        raise DataError(f"--images {images} is not a folder; give the folder of your unlabelled images")
    classnames, prompts = read_classes(classes)
    if prompts is not None and template is not None:  # one of the two would be recorded and ignored
        raise DataError(f"--template and the prompts of --classes {classes} both say how to prompt for a class, and "
                        f"the prompts make the zero-shot classifier: drop --template, or give the class names one "
                        f"per line")
    templates = _templates(check_template(template or DEFAULT_TEMPLATE))
    seen = {}
    listing = imagefiles.list_images(images, seen)
    if not listing.files and not listing.problems:
        raise DataError(f"--images {images} holds no images (looked for {' '.join(imagefiles.IMAGE_EXTENSIONS)} in it "
                        f"and below)")
    test, check_problems = check_set(check, classnames, images, seen) if check else ([], [])
    if listing.others:
        print(f"note: --images {images}: not images by their extension, so left out: "
              f"{imagefiles.left_out(listing.others)}", flush=True)
    if listing.repeats:
        path, first = listing.repeats[0]
        n = len(listing.repeats)
        print(f"note: --images {images}: {n} {'file or folder' if n == 1 else 'files or folders'} "
              f"reached again through links "
              f"(first: {os.path.relpath(path, images)} is {os.path.relpath(first, images)}); each counts once",
              flush=True)
    task = Task(name="images", classnames=classnames, templates=templates, train=[(p, None) for p in listing.files],
                test=test, dev=[], flip=flip, prompts=prompts, root=images,
                check_root=os.path.abspath(check) if check else None)
    know_contents(task, listing.problems + check_problems)
    pool_of = {bytes(d): p for d, (p, _) in zip(task.digests["train"].numpy(), task.train)}
    copies = [(p, pool_of[bytes(d)]) for d, (p, _) in zip(task.digests["test"].numpy(), task.test)
              if bytes(d) in pool_of]
    if copies:  # other files, the same bytes: copies, or images that are alike to the bit (blank frames)
        print(f"warning: --check {check}: {len(copies)} of {len(task.test)} check images have the content of a pool "
              f"image (first: {_shown(copies[0][0])}, as {_shown(copies[0][1])}): the runs train on them too, so their "
              f"accuracy is not that of unseen images; remove such copies from one of the two folders", flush=True)
    return task


def train_labels(task):
    """The train split's labels [N], or None where its images carry none (your own images)."""
    labels = [label for _, label in task.train]
    return None if any(label is None for label in labels) else torch.tensor(labels)


def zero_shot_prompts(task):
    """Per class, the prompts of the zero-shot classifier: a prompt file's (task.prompts), else
    the class name in the task's primary template."""
    return task.prompts or clip_model.class_prompts(task.classnames, task.templates[:1])


def item_key(source, index, root):
    """How files a person reads or writes (labels, pseudo-labels, captions, images to label) name
    pool image `index`: its path relative to root (--images or --data-root), or '#<index>' for
    an image held in memory (digits, CIFAR)."""
    if torch.is_tensor(source):
        return f"#{index}"
    if root and source.startswith(root + os.sep) and os.path.normpath(source) == source:
        return source[len(root) + 1:]  # what relpath gives, without its cost (a million pool images)
    return os.path.relpath(source, root) if root else os.path.normpath(source)


# A text cell (a path, a class name) of a CSV file a person opens in a spreadsheet that starts with one of
# these is read there as a formula (= + - @, and a tab or CR before one), or is the guard itself (')
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_text(cell):
    """A text cell of a CSV file written for a person (pseudo_labels.csv, VeCAF's lists, deploy.py's
    CSV): one that starts with a FORMULA_START character gets a leading ', which a spreadsheet
    shows as text instead of running it; csv_untext gives the cell back exactly. Numbers are never
    passed through it."""
    return "'" + cell if cell.startswith(FORMULA_START) else cell


def csv_untext(cell):
    """csv_text undone: exactly one leading ' is removed where the rest starts with a FORMULA_START
    character; any other cell (one a person wrote without the guard) is read as written."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_START) else cell


def _nfc(text):
    return unicodedata.normalize("NFC", text)


# How a path a person wrote is compared with the pool's names, in this order; the first that finds
# an image decides: as written; without spaces around it, on both sides (a spreadsheet or a person
# drops them, and a name may have them); and in Unicode's composed form too (macOS names files in the
# decomposed form, NFD, a keyboard types the composed one, NFC)
READINGS = (lambda s: s, str.strip, lambda s: _nfc(s.strip()))


class NameIsAmbiguous(ValueError):
    """A written path that reads as two pool images (args: the two pool names)."""


class PoolNames:
    """The pool's images by the names files a person reads or writes use (item_key), and `find`,
    which gives the image a written path names (labels, captions)."""

    def __init__(self, pool, root):
        self.root = root
        self.keys = [item_key(source, i, root) for i, (source, _) in enumerate(pool)]
        self.tables = [{} for _ in READINGS]  # per reading: read(name) -> [pool index]
        for i, key in enumerate(self.keys):
            for table, read in zip(self.tables, READINGS):
                table.setdefault(read(key), []).append(i)

    def spellings(self, written):
        """item_key's spellings of a written path: as it is (normalised; '#<index>' as it is), an
        absolute path under root relative to it, and a relative path that names a file from the
        current folder (deploy.py's CSV names files as they were given) relative to root."""
        if written.startswith("#"):
            return [written]
        if not self.root:
            return [os.path.normpath(written)]
        if os.path.isabs(written):
            return [os.path.relpath(written, self.root)]
        return [os.path.normpath(written), os.path.relpath(os.path.abspath(written), self.root)]

    def find(self, written, guarded=False):
        """The pool index of the image `written` names (None: none), trying READINGS in order and,
        where `guarded` (a CSV cell), the cell with csv_untext first; two pool images that read
        the same under the reading that finds them raise NameIsAmbiguous(first, second)."""
        cells = dict.fromkeys([csv_untext(written), written] if guarded else [written])
        for table, read in zip(self.tables, READINGS):
            for cell in cells:
                for spelled in self.spellings(read(cell)):
                    hits = table.get(read(spelled), [])
                    if len(hits) > 1:
                        raise NameIsAmbiguous(self.keys[hits[0]], self.keys[hits[1]])
                    if hits:
                        return hits[0]
        return None


LABELS_COLUMNS = ("path", "class")


def labels_digest(index, y):
    """Pool images [n] with their labels [n], in this order, as a short sha256."""
    return hashlib.sha256(json.dumps([index.tolist(), y.tolist()]).encode()).hexdigest()[:16]


@dataclass
class Labels:
    """A person's labels of pool images from a labels file: pool indices [n] and their classes [n],
    class by class in the file's order within a class (the order shots are used in), the line of
    the file that gave each, and what the file held besides: its labelled rows (a path given twice
    counts twice) and its rows with a path and an empty class cell (no label: a list not filled in
    yet); `exists`: False for a labels file that does not exist yet (missing_ok)."""
    file: str
    index: torch.Tensor
    y: torch.Tensor
    line: dict  # pool index -> line number in the file
    labelled_rows: int = 0
    no_class_rows: int = 0
    exists: bool = True

    def __len__(self):
        return len(self.index)

    def digest(self):
        """The labels by content and order (what a run that trains on them records)."""
        return labels_digest(self.index, self.y)

    def per_class(self, C):
        return torch.bincount(self.y, minlength=C).tolist()

    def summary(self, flag="--labels"):
        """The CLIs' line on what the labels file gave."""
        if not self.exists:
            return f"{flag} {self.file} does not exist yet: no label so far"
        def counted(n, noun):
            return f"{n} {noun}{'s' if n != 1 else ''}"
        return (f"{flag} {self.file}: {counted(self.labelled_rows, 'labelled row')} read "
                f"({counted(len(self), 'image')}), {counted(self.no_class_rows, 'row')} with an empty class cell "
                f"(no label)")


def read_labels(path, task, missing_ok=False):
    """A labels file: CSV with a header naming the columns `path` and `class` (others, e.g. a
    pseudo-labels file's, are ignored); one row per image, its path relative to task.root
    (item_key; found as PoolNames.find reads it, a cell csv_text guarded read back exactly), its
    class one of task.classnames (case, "_" for " ", Unicode form and a csv_text guard aside). A
    row with an empty class cell is no label (a list a person has not filled in yet), and counted.
    A path that is not a pool image or reads as two, a class that is not in the list, a class
    without a path, a path given two classes: one line naming the row. The same path twice with
    one class counts once. A file that labels no image is an error, unless `missing_ok` (a person
    has not started: a file that does not exist yet, or without a filled-in class, is no label)."""
    path = Path(path)
    if not path.exists() and missing_ok:
        return Labels(str(path), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), {}, exists=False)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if not all(c in header for c in LABELS_COLUMNS):
                raise DataError(f"labels file {path}: its first line must be a header naming the columns path and "
                                f"class (found {_short(','.join(header), 60)})")
            at = [header.index(c) for c in LABELS_COLUMNS]
            rows = [(reader.line_num, row) for row in reader]
    except FileNotFoundError:
        raise DataError(f"labels file {path}: no such file; write a CSV with the header path,class") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"labels file {path} cannot be read as a UTF-8 CSV ({type(e).__name__}: "
                        f"{str(e)[:60]})") from None
    names = PoolNames(task.train, task.root)
    label_of = {prompt_name(c): k for k, c in enumerate(task.classnames)}
    label_of_nfc = {_nfc(name): k for name, k in label_of.items()}
    where = f"relative to {task.root}" if task.root else "'#<index>' for in-memory images"
    given, line, labelled_rows, no_class_rows = {}, {}, 0, 0
    for lineno, row in rows:
        written, name = (row[j] if j < len(row) else "" for j in at)
        name = csv_untext(name.strip()).strip()
        if not name:  # no label: a row not filled in (or a blank line)
            no_class_rows += bool(written.strip())
            continue
        if not written:
            raise DataError(f"labels file {path} line {lineno}: the class {name!r} has no path; every row with a "
                            f"class needs the path of its image")
        try:
            i = names.find(written, guarded=True)
        except NameIsAmbiguous as e:
            raise DataError(f"labels file {path} line {lineno}: {written!r} could be the pool's {e.args[0]!r} or "
                            f"{e.args[1]!r} (they differ only in spaces around them or in Unicode form): write the "
                            f"path exactly as its file is named") from None
        if i is None:
            raise DataError(f"labels file {path} line {lineno}: {written!r} is not an image of the pool (paths are "
                            f"{where}); fix the path or remove the row")
        k = label_of.get(prompt_name(name), label_of_nfc.get(_nfc(prompt_name(name))))
        if k is None:
            shown = ", ".join(task.classnames[:4]) + (", ..." if len(task.classnames) > 4 else "")
            raise DataError(f"labels file {path} line {lineno}: class {name!r} is not one of the "
                            f"{len(task.classnames)} classes ({shown}); fix the class or add it to the class list")
        labelled_rows += 1
        if i in given and given[i] != k:
            raise DataError(f"labels file {path} line {lineno} labels {written!r} {task.classnames[k]!r}, but line "
                            f"{line[i]} labelled it {task.classnames[given[i]]!r}: keep one of the two rows")
        if i not in given:
            given[i], line[i] = k, lineno
    if not given and not missing_ok:
        raise DataError(f"labels file {path} labels no image" + (
            f": every row of it ({no_class_rows}) has an empty class cell; fill in the class of the images you labelled"
            if no_class_rows else ": add rows path,class") + ", or leave --labels out")
    order = sorted(given, key=lambda i: given[i])  # stable: class by class, file order within a class
    return Labels(str(path), torch.tensor(order, dtype=torch.long), torch.tensor([given[i] for i in order],
                                                                                dtype=torch.long),
                  line, labelled_rows, no_class_rows)


def write_example(folder, size=None, seed=0):
    """The demo's real handwritten digits as your own images would come (docs/own-images.md):
    folder/images/<n>.png, the train split unlabelled (32-px PNGs, named in an order that does not
    follow the class); folder/check/<class>/<n>.png, the test split as a labelled check set (`size`
    of each, drawn with `seed`, or all: 899 and 719); folder/classes.txt; and folder/answers.csv,
    every pool image's true class in the labels format, for playing the person who labels.
    Returns the folder."""
    folder = Path(folder)
    task = digits_task()
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed))[:size].tolist()
    answers = []
    for n, i in enumerate(order):
        image, label = task.train[i]
        _save_png(image, folder / "images" / f"{n:04d}.png")
        answers.append((f"{n:04d}.png", task.classnames[label]))
    checked = torch.randperm(len(task.test), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    for n, (image, label) in enumerate(task.test[i] for i in checked.tolist()):
        _save_png(image, folder / "check" / task.classnames[label] / f"{n:04d}.png")
    (folder / "classes.txt").write_text("\n".join(task.classnames) + "\n")
    with open(folder / "answers.csv", "w", newline="", encoding="utf-8") as f:  # csv_text: as every CSV for a person
        csv.writer(f).writerows([LABELS_COLUMNS, *([csv_text(p), csv_text(c)] for p, c in answers)])
    return folder


def _save_png(image, path):
    """A uint8 tensor image [3, H, W] as a PNG file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def open_task(dataset=None, root=None, images=None, classes=None, template=None, check=None, flip=True):
    """The task a CLI runs on: your own images (images_task) or a named dataset (load_task),
    whose zero-shot template `template` may replace; either way every image is known by its
    content (know_contents), and what cannot be read is refused in one line now."""
    if images is not None:
        return images_task(images, classes, template, check, flip)
    task = know_contents(load_task(dataset, root))
    return with_template(task, template) if template else task


# -----------------------------------------------------------------------------
# one entry point for the CLI

COOP_NAMES = list(COOP_DATASETS) + ["fgvc_aircraft", "imagenet"]
DIGIT_TASKS = ["digits", "digits-bold", "digits-bold-all"]
TASK_NAMES = DIGIT_TASKS + COOP_NAMES + ["imagefolder"] + list(CIFAR)


def load_task(name, root=None):
    """The Task called `name` (see TASK_NAMES), with its data under root (--data-root), checked
    for what every method needs: two or more classes whose prompts differ."""
    key = name.lower()
    if key in DIGIT_TASKS:
        task = digits_task(key.partition("-")[2] or None)  # vendored in assets/: no --data-root
    elif key in COOP_NAMES:
        task = coop_task(key, root)
    elif key == "imagefolder":
        task = imagefolder_task(root)
    elif key in CIFAR:
        task = cifar_task(key, root)
    else:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(TASK_NAMES)}")
    check_classnames(task.classnames, name)
    task.root = os.path.abspath(root) if root and key not in DIGIT_TASKS else None
    return task


def add_flags(p, datasets):
    """The flags every method's CLI reads its data with: a named dataset (`datasets`: what
    --dataset takes, in words) or your own images (docs/own-images.md); --labels is each method's."""
    a = p.add_argument
    a("--dataset", default=None, help=f"{datasets}; default digits (the offline demo)")
    a("--data-root", default=None, help="root of the CoOp layout / image folder / CIFAR download dir")
    a("--images", default=None, metavar="DIR",
      help="your own images instead of --dataset: every image in DIR and below, unlabelled (with --classes)")
    a("--classes", default=None, metavar="FILE",
      help="with --images: the class names, one per line (blank lines and lines starting with # skipped; no comma "
           "or tab in a name), or a JSON {class: [prompts]} file (its prompts make the zero-shot classifier; not with "
           "--template)")
    a("--check", default=None, metavar="DIR",
      help="with --images: a labelled check set, DIR/<class>/<images>, to report accuracy on (none: no accuracy)")
    a("--template", default=None,
      help="the zero-shot template, one {} for the class name (default: the dataset's hand-written one; "
           "'a photo of a {}.' with --images)")
    a("--no-flip", action="store_true",
      help="with --images: no horizontal flips in the training augmentations (images whose class a mirror image "
           "changes: text, digits, road signs)")


def dataset_name(args):
    """--dataset as a run records it: "images" for your own images, else the name (default digits)."""
    if args.images is None:
        for flag in ("classes", "check", "no_flip"):
            if getattr(args, flag):
                flag = "--" + flag.replace("_", "-")
                raise DataError(f"{flag} goes with --images (your own images): add --images DIR, or drop {flag}")
        return args.dataset or "digits"
    if args.dataset not in (None, "images"):
        raise DataError(f"--images DIR is the data (your own images): drop --dataset {args.dataset}")
    if args.data_root:
        raise DataError("--data-root locates a --dataset; --images DIR names your images' folder itself: drop "
                        "--data-root")
    if not args.classes:
        raise DataError("--images needs --classes FILE: the class names, one per line, or a JSON {class: [prompts]} "
                        "file")
    return "images"


def task_of(args):
    """The task of a CLI's (resolved) data flags: your own images or a named dataset."""
    return open_task(None if args.images else args.dataset, args.data_root, args.images, args.classes,
                     args.template, args.check, not args.no_flip)


def eval_items(task, split):
    """The labelled items a run reports on: the test split, or the dev split (for choosing
    settings). Your own images' test split is their check set (--check), and without one a run
    reports on nothing: []."""
    items = task.dev if split == "dev" else task.test
    if task.name == "images" and split == "dev":
        raise DataError("your own images have no dev split (--check is the test split): use --eval-split test")
    if not items and task.name != "images":
        raise DataError(f"{task.name} has no labelled {split} split; use --eval-split test")
    return items


def named(task_name):
    """How a message names a run's data: the dataset's name, or "your images" (--images)."""
    return "your images" if task_name == "images" else task_name


def train_images_of(task_name):
    """How a message names a run's train split: "your images" or "the train images of <dataset>"."""
    return "your images" if task_name == "images" else f"the train images of {task_name}"


def few_shot(task, shots, seed, all_of_smaller_classes=False):
    """CoOp's few-shot protocol (CraFT's shots, CoFT's labelled shots): `shots` train images per
    class, drawn at random with `seed`. Returns indices into task.train (class by class). A class
    with fewer images is refused by name, or taken whole with all_of_smaller_classes."""
    y = train_labels(task)
    if y is None:
        raise DataError(f"--shots draws labelled images per class, and {train_images_of(task.name)} carry no labels: "
                        f"give the labels you have in a labels file (--labels)")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for k, name in enumerate(task.classnames):
        idx = (y == k).nonzero().squeeze(1)
        if len(idx) < shots and not all_of_smaller_classes:
            fewest = min(int((y == c).sum()) for c in range(len(task.classnames)))
            advice = f"use --shots {fewest} or fewer" if fewest else \
                f"every class needs train images: add some, or leave {name!r} out of the data"
            raise DataError(f"--shots {shots}: class {name!r} of {task.name} has only {len(idx)} train images; "
                            f"{advice}")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.cat(picked)


def prompt_name(classname):
    """A class name as it enters a prompt and as CLIP's tokenizer sees it (lower case, single spaces)."""
    return " ".join(classname.replace("_", " ").split()).lower()


def check_classnames(classnames, source):
    """At least two classes, and no two names that read the same in a prompt (`red_fox` and
    `Red fox` would get identical text embeddings: one class could never be predicted)."""
    if len(classnames) < 2:
        raise DataError(f"{source} has {len(classnames)} class{'' if len(classnames) == 1 else 'es'} {classnames}; "
                        f"classification needs at least two")
    seen = {}
    for c in classnames:
        if prompt_name(c) in seen:
            raise DataError(f"{source}: classes {seen[prompt_name(c)]!r} and {c!r} read the same in a prompt "
                            f"({prompt_name(c)!r}); rename or merge one of them")
        seen[prompt_name(c)] = c


# -----------------------------------------------------------------------------
# Every image known by its content: a digest per file (cached by its size and times, so that a
# repeated command reads only what changed), the problems found reading it, and the record a run
# keeps of its data (images.pt) to refuse continuing on other images

SPLITS = ("train", "dev", "test")


def know_contents(task, problems=()):
    """task.digests: every split's digests (imagefiles.contents), the files that cannot be read or used named
    in one line (with `problems` found listing them), all at once, before any work. Returns task."""
    task.digests, problems, total = {}, list(problems), len(problems)
    for split in SPLITS:
        items = getattr(task, split)
        task.digests[split], found = imagefiles.contents([source for source, _ in items])
        problems += found
        total += len(items)
    if problems:
        where = f"--images {task.root}" if task.name == "images" else task.name
        shown = [(_shown(p, task.root), why) for p, why in problems]
        raise DataError(f"{where}: {imagefiles.problems_line(shown, total)}")
    return task


def _shown(path, root=None):
    """A path as a message shows it: relative to `root` (the data's folder), else to the current
    folder, where it lies below it."""
    for base in (root, os.getcwd()):
        if base and os.path.isabs(path) and not os.path.relpath(path, base).startswith(".."):
            return os.path.relpath(path, base)
    return path


def record(task):
    """What a run knows its data by: the task's class names, templates, prompts and decoding, and
    per split every image's key (item_key: its path relative to the data's folder, or to the check
    set's), digest and label (-1: none). A run folder keeps it (images.pt); continuing refuses other data in words
    (check_same_images)."""
    if getattr(task, "digests", None) is None:
        know_contents(task)
    splits = {}
    for split in SPLITS:
        items, root = getattr(task, split), task.check_root if split == "test" and task.check_root else task.root
        splits[split] = {"paths": [item_key(source, i, root) for i, (source, _) in enumerate(items)],
                         "digests": task.digests[split],
                         "labels": torch.tensor([-1 if label is None else label for _, label in items],
                                                dtype=torch.long)}
    about = {"name": task.name, "classnames": task.classnames, "templates": task.templates, "flip": task.flip,
             "prompts": task.prompts, "exif_orientation": task.exif_orientation}
    return {"task": about, "splits": splits}


def fingerprint(r):
    """The data a run sees, as a short sha256 of its record (record(task)): a file changed, added,
    removed or renamed, a label, a class name or a template changes it; a moved data folder
    does not (paths are relative to it)."""
    h = hashlib.sha256(json.dumps(r["task"], sort_keys=True).encode())
    for split in SPLITS:
        s = r["splits"][split]
        h.update(b"\x00split" + "\x00".join(s["paths"]).encode("utf-8", "surrogateescape"))
        h.update(s["digests"].numpy().tobytes() + s["labels"].numpy().tobytes())
    return h.hexdigest()[:16]


def split_name(task_name, split):
    """How messages name a split: your own images' train split is the pool, their test split the check set."""
    if task_name == "images":
        return {"train": "pool", "test": "check set"}.get(split, split)
    return split


def changes(saved, now):
    """What differs between two records (record()), in words, e.g. "pool: 3 images changed, 1 added
    (first: IMG_0001.JPG changed)"; [] where they are the same."""
    words = []
    for key, what in (("name", "dataset"), ("classnames", "class names"), ("templates", "templates"),
                      ("prompts", "class prompts"), ("flip", "flip setting"), ("exif_orientation", "decoding")):
        if saved["task"].get(key) != now["task"].get(key):
            words.append(f"the {what} changed" + (f" ({saved['task']['name']} -> {now['task']['name']})"
                                                   if key == "name" else ""))
    for split in SPLITS:
        old, new = _by_path(saved["splits"][split]), _by_path(now["splits"][split])
        added, removed = [p for p in new if p not in old], [p for p in old if p not in new]
        gone = {old[p] for p in removed}  # (digest, label) no longer under their old name
        renamed = [p for p in added if new[p] in gone]  # the same image with the same label, another name
        kinds = {"renamed": renamed,
                 "changed": [p for p in new if p in old and old[p][0] != new[p][0]],
                 "relabelled": [p for p in new if p in old and old[p][0] == new[p][0] and old[p][1] != new[p][1]],
                 "added": [p for p in added if p not in set(renamed)],
                 "removed": [p for p in removed if old[p] not in {new[q] for q in renamed}]}
        counts = [(len(v), k) for k, v in kinds.items() if v]
        name = split_name(now["task"]["name"], split)
        if counts:
            n, kind = counts[0]
            said = [f"{n} image{'s' if n > 1 else ''} {kind}"] + [f"{m} {k}" for m, k in counts[1:]]
            words.append(f"{name}: {', '.join(said)} (first: {kinds[kind][0]} {kind})")
        elif saved["splits"][split]["paths"] != now["splits"][split]["paths"]:
            words.append(f"{name}: the images' order changed")
    return words


def _by_path(split):
    """A record's split as {path: (digest bytes, label)}."""
    blob = split["digests"].numpy().tobytes()
    return {p: (blob[k * imagefiles.DIGEST_BYTES:(k + 1) * imagefiles.DIGEST_BYTES], y)
            for k, (p, y) in enumerate(zip(split["paths"], split["labels"].tolist()))}


def check_same_images(saved, images, out):
    """Before the run in `out` is continued (--resume, --phase 2, --eval-only, a VeCAF step): the
    data `images` (record) must be those it was made with (`saved`, its images.pt as
    runs.saved_images reads it; None: no run there yet), else one line saying what changed."""
    if saved is None:
        return
    try:
        what = changes(saved, images)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{out}'s record of its images is not one of this code ({type(e).__name__}): --restart starts "
                        f"the run over") from None
    if what:
        raise DataError(f"the data differ from those the run in {out} was made with ({'; '.join(what[:3])}"
                        f"{'; ...' if len(what) > 3 else ''}): put the images back as they were, or start a new "
                        f"run (another --out, or --restart)")


def main(argv=None):
    """python data.py --write-example FOLDER [--size N]: the example folder (write_example), only into
    a new or empty folder."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Write the demo's digits as a folder of your own images would be")
    p.add_argument("--write-example", required=True, metavar="FOLDER",
                   help="FOLDER/images (unlabelled), FOLDER/check/<class> (labelled), classes.txt, answers.csv")
    p.add_argument("--size", type=int, default=None,
                   help="images in the folder and in the check set (default: all, 899 and 719)")
    args = p.parse_args(argv)
    if os.path.isdir(args.write_example) and os.listdir(args.write_example):  # its classes.txt could be yours
        print(f"error: --write-example {args.write_example} is not empty: give a new folder, so that no file of "
              f"yours is overwritten", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {write_example(args.write_example, args.size)}")


if __name__ == "__main__":
    main()
