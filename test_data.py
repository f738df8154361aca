"""Tests of data.py: the offline digits, the datasets on disk (CoOp layout, image folders, CIFAR),
transforms and image reading."""
import csv
import hashlib
import json
import os
import pickle
import unicodedata

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import clip_model
import data
import imagefiles
import standin
from conftest import DTD_CLASSES, form_images, make_dtd, make_imagefolder, write_image, write_image_forms, tower



def test_digit_transforms_never_flip():
    task = data.digits_task()
    assert task.flip is False
    for kind in ("weak", "strong"):
        names = [type(t).__name__ for t in data.make_transform(kind, tower(32), task).transforms]
        assert "RandomHorizontalFlip" not in names
    assert "RandomHorizontalFlip" in [type(t).__name__ for t in data.make_transform(
        "strong", tower(32), data.Task("x", ["a"], ["{}"], [], [], flip=True)).transforms]


def test_every_transform_normalises_with_the_mean_and_std_its_tower_was_trained_with():
    """A white image is (1 - mean) / std after every transform but RandAugment's colour changes:
    with mean 0.5 and std 0.25 (not OpenAI's), 2.0 everywhere; the squash resize keeps a wide
    image whole."""
    from PIL import Image
    white = Image.new("RGB", (48, 40), (255, 255, 255))
    for kind in ("test", "weak", "crop", "inception"):
        x = data.make_transform(kind, tower(32, (0.5,) * 3, (0.25,) * 3), data.digits_task())(white)
        assert x.shape == (3, 32, 32) and torch.allclose(x, torch.full_like(x, 2.0)), kind
    half = Image.new("RGB", (64, 32), (255, 255, 255))
    half.paste((0, 0, 0), (0, 0, 16, 32))  # the left quarter black: a centre crop cuts it away, a squash keeps it
    crop, squash = (data.make_transform("test", tower(32, resize_mode=m), data.digits_task())(half)
                    for m in ("shortest", "squash"))
    assert crop[0, 0, 0] > 0 and squash[0, 0, 0] < 0


def test_image_over_pillows_size_limit_is_one_line(tmp_path, monkeypatch):
    write_image(str(tmp_path / "big.png"), size=(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1200 pixels > 2 x 100: Pillow refuses to open it
    assert "over Pillow's size limit" in data_error(imagefiles.load_image, str(tmp_path / "big.png"))


def test_uci_digits_load():
    x, y = data.load_uci_digits()
    assert x.shape == (1797, 8, 8) and x.dtype == torch.uint8
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 16
    counts = torch.bincount(y, minlength=10)
    assert len(counts) == 10 and ((counts >= 170) & (counts <= 190)).all()


def test_missing_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "ASSETS", tmp_path)
    with pytest.raises(data.DataError, match="missing"):
        data.load_uci_digits()


def test_digits_to_images_is_nearest_upsampling():
    x, _ = data.load_uci_digits()
    im = data.digits_to_images(x[:10])
    assert im.shape == (10, 3, 32, 32) and im.dtype == torch.float32
    assert torch.equal(im[:, 0, ::4, ::4], x[:10].float() / 16)
    assert torch.equal(im[:, 0, 3::4, 3::4], x[:10].float() / 16)


def test_thicken_spreads_half_the_inkiest_neighbour_and_caps_at_16():
    x = torch.zeros(1, 8, 8, dtype=torch.uint8)
    x[0, 3, 3], x[0, 0, 7] = 10, 16
    bold = data.thicken(x)[0].int()
    assert bold[3, 3] == 15 and bold[2:5, 2:5].sum() == 15 + 8 * 5  # itself + 10 / 2, each neighbour 10 / 2
    assert bold[0, 7] == 16 and bold[1, 6] == 8 and bold[0, 6] == 8  # capped; 16 / 2 next to it
    assert bold[6, 0] == 0 and bold[5, 5] == 0  # far from ink: unchanged


@pytest.mark.parametrize("name,shifted", [("digits-bold", ("test",)), ("digits-bold-all", ("train", "dev", "test"))])
def test_digits_bold_shifts_the_named_splits(name, shifted):
    """digits-bold: the test strokes thickened (VeCAF's OOD demo); digits-bold-all: every split
    (CoFT's noisy-label demo). Same images in the same order with the same labels, each image
    either as it was or exactly `thicken` of its 8x8 ink counts."""
    plain, bold = data.load_task("digits"), data.load_task(name)
    assert bold.name == name and bold.classnames == plain.classnames and bold.templates == plain.templates
    x8, _ = data.load_uci_digits()
    split = data.digits_split(0)
    for part in ("train", "dev", "test"):
        a, b = getattr(plain, part), getattr(bold, part)
        assert [label for _, label in a] == [label for _, label in b]
        expected = x8[split[part]]
        if part in shifted:
            expected = data.thicken(expected)
        images = (data.digits_to_images(expected) * 255).round().to(torch.uint8)
        assert all(torch.equal(im, x) for im, (x, _) in zip(images, b))
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b)) == (part not in shifted)
    assert data.fingerprint(data.record(bold)) != data.fingerprint(data.record(plain))


def test_eval_items_is_test_or_dev_and_names_a_missing_split():
    task = data.load_task("digits")
    assert data.eval_items(task, "test") is task.test and data.eval_items(task, "dev") is task.dev
    with pytest.raises(data.DataError, match="^x has no labelled dev split; use --eval-split test$"):
        data.eval_items(data.Task("x", ["a", "b"], ["{}"], [], [(None, 0)]), "dev")


def test_split_is_disjoint_complete_stratified_and_deterministic():
    _, y = data.load_uci_digits()
    s = data.digits_split(seed=0)
    parts = [s["train"], s["dev"], s["test"]]
    allidx = torch.cat(parts)
    assert len(allidx) == 1797 and torch.equal(allidx.sort().values, torch.arange(1797))
    for p in parts:
        assert set(y[p].tolist()) == set(range(10))
    assert 850 < len(s["train"]) < 950 and 160 < len(s["dev"]) < 200 and 680 < len(s["test"]) < 760
    again, other = data.digits_split(seed=0), data.digits_split(seed=1)
    assert all(torch.equal(s[k], again[k]) for k in s)
    assert not torch.equal(s["test"], other["test"])


# --------------------------------------------------------------------------- data: datasets on disk



def data_error(fn, *args):
    """Calls fn(*args), expects a DataError, checks its message is one line, returns the message."""
    with pytest.raises(data.DataError) as e:
        fn(*args)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# -----------------------------------------------------------------------------
# CoOp layout





def test_coop_dtd_loads(tmp_path):
    make_dtd(tmp_path)
    task = data.load_task("dtd", tmp_path)
    assert task.name == "dtd"
    assert task.classnames == ["banded", "blotchy", "cross hatched"]
    assert task.templates[0] == "{} texture."
    assert len(set(task.templates)) == len(task.templates) and all("{}" in t for t in task.templates)
    assert (len(task.train), len(task.dev), len(task.test)) == (6, 3, 3)
    assert task.flip is True and task.exif_orientation is False  # the papers' decode, for comparable numbers
    for items in (task.train, task.dev, task.test):
        for path, label in items:
            assert isinstance(path, str) and os.path.isabs(path) and os.path.isfile(path)
            assert path.startswith(str(tmp_path / "dtd" / "images"))
            # the image's folder is its class: the labels went with the right files
            assert os.path.basename(os.path.dirname(path)) == DTD_CLASSES[label]
    # train, dev and test are disjoint
    paths = [p for items in (task.train, task.dev, task.test) for p, _ in items]
    assert len(set(paths)) == len(paths)


def test_coop_templates_and_table():
    """Every CoOp dataset has its hand-written template first and no duplicates."""
    assert data.COOP_DATASETS["oxford_pets"][3] == "a photo of a {}, a type of pet."
    assert data.COOP_DATASETS["eurosat"][3] == "a centered satellite photo of {}."
    for name in data.COOP_NAMES + ["imagefolder", "cifar10"]:
        # the layout help is one line and names the data root placeholder
        assert "\n" not in data._layout(name) and "DATA" in data._layout(name)
        # the real root replaces the placeholder only, not the "DATA" of "DATASETS.md"
        assert "DATA" not in data._layout(name, "/r").replace("DATASETS.md", "")
    t = data._templates("a photo of a {}.")
    assert t[0] == "a photo of a {}." and t.count("a photo of a {}.") == 1


def test_coop_stanford_cars_images_in_folder_itself(tmp_path):
    """stanford_cars has no image subfolder: paths are relative to DATA/stanford_cars."""
    base = tmp_path / "stanford_cars"
    for name in ("cars_train/00001.jpg", "cars_train/00002.jpg", "cars_test/00001.jpg"):
        write_image(str(base / name))
    split = {"train": [["cars_train/00001.jpg", 0, "2012 Tesla Model S"],
                       ["cars_train/00002.jpg", 1, "2000 AM General Hummer SUV"]], "val": [],
             "test": [["cars_test/00001.jpg", 0, "2012 Tesla Model S"]]}
    (base / "split_zhou_StanfordCars.json").write_text(json.dumps(split))
    task = data.load_task("stanford_cars", tmp_path)
    assert task.classnames == ["2012 Tesla Model S", "2000 AM General Hummer SUV"] and task.dev == []
    assert task.exif_orientation is False
    assert task.train == [(str(base / "cars_train" / "00001.jpg"), 0), (str(base / "cars_train" / "00002.jpg"), 1)]


def test_fgvc_aircraft_loads(tmp_path):
    base = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "Cessna 172", "F/A-18"]  # names with spaces and slashes
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    ids = dict(train=["1000001", "1000002", "1000003"], val=["1000004"], test=["1000005", "1000006"])
    labels = dict(train=[1, 0, 2], val=[2], test=[0, 1])
    for split in ids:
        lines = [f"{i} {variants[y]}" for i, y in zip(ids[split], labels[split])]
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for i in ids[split]:
            write_image(str(base / "images" / f"{i}.jpg"))
    task = data.load_task("fgvc_aircraft", tmp_path)
    assert task.classnames == variants
    assert task.templates[0] == "a photo of a {}, a type of aircraft." and task.exif_orientation is False
    assert task.train == [(str(base / "images" / f"{i}.jpg"), y) for i, y in zip(ids["train"], labels["train"])]
    assert [y for _, y in task.dev] == [2] and [y for _, y in task.test] == [0, 1]

    # a variant not in variants.txt names the file and line
    (base / "images_variant_test.txt").write_text("1000005 Boeing 999\n")
    msg = data_error(data.load_task, "fgvc_aircraft", tmp_path)
    assert "images_variant_test.txt:1" in msg and "Boeing 999" in msg


def test_imagenet_loads(tmp_path):
    base = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537"]
    (base / "images").mkdir(parents=True)
    (base / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish_fish\n")
    for split, n in (("train", 3), ("val", 2)):
        for w in wnids:
            for i in range(n):
                write_image(str(base / "images" / split / w / f"{w}_{i}.JPEG"))
    task = data.load_task("imagenet", tmp_path)
    assert task.classnames == ["tench", "goldfish fish"]
    assert task.templates[0] == "a photo of a {}." and task.exif_orientation is False
    assert (len(task.train), len(task.dev), len(task.test)) == (6, 0, 4)
    assert [y for _, y in task.train] == [0, 0, 0, 1, 1, 1]
    assert all(p.endswith(".JPEG") and f"/{wnids[y]}/" in p for p, y in task.train + task.test)

    # a class folder that classnames.txt does not know about
    (base / "images" / "val" / "n99999999").mkdir()
    msg = data_error(data.load_task, "imagenet", tmp_path)
    assert "n99999999" in msg and "images/val" in msg


# -----------------------------------------------------------------------------
# ImageFolder



def test_imagefolder_loads(tmp_path):
    make_imagefolder(tmp_path, splits=("train", "test", "val"))
    task = data.load_task("imagefolder", tmp_path)
    assert task.classnames == ["cat", "dog big"]
    assert task.templates[0] == "a photo of a {}." and task.exif_orientation is True  # turned, as a viewer shows
    assert (len(task.train), len(task.dev), len(task.test)) == (4, 4, 4)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p, _ in task.train + task.dev + task.test)
    assert [os.path.basename(os.path.dirname(p)) for p, _ in task.train] == ["cat", "cat", "dog_big", "dog_big"]


def test_imagefolder_without_val(tmp_path):
    make_imagefolder(tmp_path)
    assert data.load_task("imagefolder", tmp_path).dev == []


def test_imagefolder_errors(tmp_path):
    make_imagefolder(tmp_path / "a", splits=("train",), classes=("cat", "dog"))
    make_imagefolder(tmp_path / "a", splits=("test",), classes=("cat", "cow"))
    msg = data_error(data.load_task, "imagefolder", tmp_path / "a")
    assert "dog" in msg and "cow" in msg and "same class folders" in msg

    make_imagefolder(tmp_path / "b", splits=("train", "test"))
    os.makedirs(tmp_path / "b" / "train" / "empty")
    os.makedirs(tmp_path / "b" / "test" / "empty")
    msg = data_error(data.load_task, "imagefolder", tmp_path / "b")
    assert "empty" in msg and "no images" in msg

    make_imagefolder(tmp_path / "c", splits=("train",))
    msg = data_error(data.load_task, "imagefolder", tmp_path / "c")
    assert str(tmp_path / "c" / "test") in msg


# -----------------------------------------------------------------------------
# clear, one-line errors

def test_error_missing_root():
    msg = data_error(data.load_task, "dtd", None)
    assert "--data-root is required for dtd" in msg and "split_zhou_DescribableTextures.json" in msg
    msg = data_error(data.load_task, "imagefolder", "")
    assert "--data-root is required for imagefolder" in msg


def test_error_root_not_a_directory(tmp_path):
    msg = data_error(data.load_task, "dtd", tmp_path / "nope")
    assert "nope" in msg and "not a directory" in msg


def test_error_missing_split_file(tmp_path):
    make_dtd(tmp_path)
    os.remove(tmp_path / "dtd" / "split_zhou_DescribableTextures.json")
    msg = data_error(data.load_task, "dtd", tmp_path)
    assert str(tmp_path / "dtd" / "split_zhou_DescribableTextures.json") in msg
    assert str(tmp_path / "dtd" / "images") in msg and "CoOp layout" in msg
    # a missing dataset folder names the folder it looked for
    msg = data_error(data.load_task, "oxford_pets", tmp_path)
    assert str(tmp_path / "oxford_pets" / "images") in msg and "split_zhou_OxfordPets.json" in msg


def test_error_root_is_the_dataset_folder(tmp_path):
    """Pointing --data-root at DATA/dtd instead of DATA gets a hint."""
    make_dtd(tmp_path)
    msg = data_error(data.load_task, "dtd", tmp_path / "dtd")
    assert "should be the folder that contains dtd/" in msg


@pytest.mark.parametrize("content, expect", [
    ("{not json", "not valid JSON"),
    ('{"train": [], "test": []}', "keys 'train', 'val', 'test'"),
    ('[1, 2]', "keys 'train', 'val', 'test'"),
    ('{"train": [["a.jpg", 0]], "val": [], "test": []}', "item 0 of 'train'"),
    ('{"train": [["a.jpg", "0", "x"]], "val": [], "test": []}', "item 0 of 'train'"),
    ('{"train": [["a.jpg", true, "x"]], "val": [], "test": []}', "item 0 of 'train'"),
    ('{"train": {"a": 1}, "val": [], "test": []}', "'train' must be a list"),
    ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]], "val": [], "test": [["c.jpg", 0, "x"]]}', "named both"),
    ('{"train": [["a.jpg", 1, "x"]], "val": [], "test": [["c.jpg", 1, "x"]]}', "no item with label [0]"),
    ('{"train": [], "val": [], "test": [["c.jpg", 0, "x"]]}', "empty 'train' or 'test'"),
])
def test_error_malformed_split_file(tmp_path, content, expect):
    make_dtd(tmp_path)
    split_path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split_path.write_text(content)
    msg = data_error(data.load_task, "dtd", tmp_path)
    assert str(split_path) in msg and expect in msg


def test_error_split_names_missing_images(tmp_path):
    make_dtd(tmp_path)
    gone = ["banded/banded_0006.jpg", "blotchy/blotchy_0008.jpg"]
    for rel in gone:
        os.remove(tmp_path / "dtd" / "images" / rel)
    os.rename(tmp_path / "dtd" / "images" / "cross_hatched", tmp_path / "dtd" / "images" / "moved")  # 4 more
    msg = data_error(data.load_task, "dtd", tmp_path)
    assert "split_zhou_DescribableTextures.json lists 6 of 12 images that do not exist" in msg
    assert "cross_hatched/cross_hatched_0000.jpg" in msg  # the first few, relative to the image dir


def test_missing_files_is_exact(tmp_path):
    """The directory-listing shortcut agrees with os.path.isfile, folders and '..' included."""
    write_image(str(tmp_path / "a" / "x.png"))
    os.makedirs(tmp_path / "a" / "sub")
    paths = [str(tmp_path / "a" / "x.png"), str(tmp_path / "a" / "y.png"), str(tmp_path / "a" / "sub"),
             str(tmp_path / "a" / "sub" / ".." / "x.png"), str(tmp_path / "nodir" / "x.png")]
    assert data.missing_files(paths) == [p for p in paths if not os.path.isfile(p)]
    assert data.missing_files(paths) == paths[1:3] + paths[4:]


def test_error_unknown_dataset():
    msg = data_error(data.load_task, "mnist", None)
    assert "unknown dataset 'mnist'" in msg
    for name in ("digits", "dtd", "imagenet", "fgvc_aircraft", "imagefolder", "cifar10", "cifar100n"):
        assert name in msg


# -----------------------------------------------------------------------------
# CIFAR: a tiny fake in torchvision's on-disk format
#
# torchvision verifies the md5 of every batch file (CIFAR10._check_integrity, and
# _load_meta for batches.meta) against the real files' md5s, held in the class
# attributes train_list, test_list and meta. The fake files cannot match those, so
# the test computes the fake files' own md5s and swaps them into the class attributes
# with monkeypatch (undone after the test). torchvision's own integrity code still
# runs, so a corrupted fake is still caught (test_cifar_corrupted).

def make_fake_cifar(root, cls, n_train=(3, 2, 2, 1, 2), n_test=4, seed=0):
    """
    Writes root/<cls.base_folder>/ with pickled batches like the real ones
    ({"data": uint8 [N, 3072] in CHW order, "labels" or "fine_labels": [N]}) plus the meta file.
    Returns {name: md5} of the written files.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, cls.base_folder)
    os.makedirs(folder, exist_ok=True)
    label_key = "fine_labels" if cls is torchvision.datasets.CIFAR100 else "labels"
    classes = ["airplane", "pickup_truck", "cat"]  # "_" must become " "
    sizes = dict(zip([f for f, _ in cls.train_list], n_train)) if len(cls.train_list) > 1 else \
        {cls.train_list[0][0]: sum(n_train)}
    sizes[cls.test_list[0][0]] = n_test
    md5 = {}
    for fname, n in sizes.items():
        batch = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 label_key: [int(y) for y in rng.integers(0, len(classes), size=n)]}
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, cls.meta["filename"]), "wb") as f:
        pickle.dump({cls.meta["key"]: classes}, f)
    for fname in os.listdir(folder):
        with open(os.path.join(folder, fname), "rb") as f:
            md5[fname] = hashlib.md5(f.read()).hexdigest()
    return md5


def trust_fake_cifar(monkeypatch, cls, md5):
    """Makes torchvision's md5 checks of `cls` expect the fake files' md5s."""
    monkeypatch.setattr(cls, "train_list", [[f, md5[f]] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5[f]] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=md5[cls.meta["filename"]]))


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download fails the test: loaders must never fetch data by themselves."""
    def refuse(*args, **kwargs):
        raise AssertionError("a loader tried to download")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", refuse)


def test_cifar10_fake_loads(tmp_path, monkeypatch, no_download):
    cls = torchvision.datasets.CIFAR10
    trust_fake_cifar(monkeypatch, cls, make_fake_cifar(tmp_path, cls))
    task = data.load_task("cifar10", tmp_path)
    assert task.classnames == ["airplane", "pickup truck", "cat"]
    assert task.templates[0] == "a photo of a {}."
    assert (len(task.train), len(task.dev), len(task.test)) == (10, 0, 4)
    x, y = task.train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and isinstance(y, int)
    # the pixels are the file's, in CHW order: image 0 of data_batch_1 reshaped to [3, 32, 32]
    with open(tmp_path / cls.base_folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f)
    assert torch.equal(x, torch.from_numpy(batch["data"][0].reshape(3, 32, 32)))
    assert y == batch["labels"][0]


def test_cifar100n_is_cifar100(tmp_path, monkeypatch, no_download):
    cls = torchvision.datasets.CIFAR100
    trust_fake_cifar(monkeypatch, cls, make_fake_cifar(tmp_path, cls))
    a, b = data.load_task("cifar100", tmp_path), data.load_task("cifar100n", tmp_path)
    assert b.name == "cifar100n" and a.classnames == b.classnames
    assert len(b.train) == 10 and len(b.test) == 4
    assert all(torch.equal(x1, x2) and y1 == y2 for (x1, y1), (x2, y2) in zip(a.test, b.test))


def test_cifar_missing(tmp_path, no_download):
    msg = data_error(data.load_task, "cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "download=True" in msg
    msg = data_error(data.load_task, "cifar100n", None)
    assert "--data-root is required for cifar100n" in msg and "cifar-100-python" in msg


def test_cifar_corrupted(tmp_path, no_download):
    """Without the md5 swap, torchvision rejects the fake: reported as corrupted, not as a traceback."""
    make_fake_cifar(tmp_path, torchvision.datasets.CIFAR10)
    msg = data_error(data.load_task, "cifar10", tmp_path)
    assert "corrupted" in msg and "download=True" in msg


# -----------------------------------------------------------------------------
# your own images: an unlabelled folder, class names, a check set, a person's labels

def own_images(root):
    """A pool of nested images in several formats, with files that are not images or hidden, a
    class list and a check set whose folders spell the classes otherwise."""
    for rel in ("b.png", "a/z.JPG", "a/b/c.webp", "c.jpeg", ".hidden.png", "a/.x/y.png"):
        write_image(root / "pool" / rel)
    (root / "pool" / "notes.txt").write_text("not an image")
    (root / "classes.txt").write_text("golden retriever\n\nTabby cat\n")
    write_image(root / "check" / "Golden_Retriever" / "1.png")
    write_image(root / "check" / "tabby_cat" / "2.png")
    write_image(root / "check" / "tabby_cat" / "sub" / "1.png")
    return root


def test_own_images_are_every_image_below_the_folder_in_sorted_order_without_labels(tmp_path):
    own_images(tmp_path)
    task = data.images_task(tmp_path / "pool", tmp_path / "classes.txt", check=tmp_path / "check")
    pool = str(tmp_path / "pool")
    assert [os.path.relpath(p, pool) for p, _ in task.train] == ["b.png", "c.jpeg", "a/z.JPG", "a/b/c.webp"]
    assert all(y is None for _, y in task.train) and data.train_labels(task) is None
    assert task.classnames == ["golden retriever", "Tabby cat"] and task.prompts is None and task.dev == []
    assert task.templates[0] == data.DEFAULT_TEMPLATE and task.root == pool and task.flip and task.exif_orientation
    # the check set: class folders matched to the classes whatever their case and "_", classes in list order
    assert [(os.path.relpath(p, tmp_path / "check"), y) for p, y in task.test] == [
        ("Golden_Retriever/1.png", 0), ("tabby_cat/2.png", 1), ("tabby_cat/sub/1.png", 1)]
    assert data.eval_items(task, "test") == task.test
    # an image without a label reaches the label-free passes as -1, never as a class
    assert data.ImageDataset(task.train, lambda im: 0)[0][1] == -1
    # no check set: nothing to report on; a dev split there never is
    bare = data.open_task(images=tmp_path / "pool", classes=tmp_path / "classes.txt", template="a {} here.",
                          flip=False)
    assert data.eval_items(bare, "test") == [] and bare.templates[0] == "a {} here." and not bare.flip
    assert "no dev split" in data_error(data.eval_items, bare, "dev")
    # a {class: [prompts]} file: the classes in its order, its prompts the zero-shot classifier's
    (tmp_path / "prompts.json").write_text(json.dumps({"tabby cat": ["a striped cat."], "dog": ["a dog.", "a pup."]}))
    task = data.images_task(tmp_path / "pool", tmp_path / "prompts.json")
    assert task.classnames == ["tabby cat", "dog"] and data.zero_shot_prompts(task) == [["a striped cat."],
                                                                                        ["a dog.", "a pup."]]
    # --template beside it would be recorded in the run's fingerprint and never read: refused
    assert "--template and the prompts of --classes" in data_error(
        data.images_task, tmp_path / "pool", tmp_path / "prompts.json", "a photo of the {}.")
    # a named dataset's template set by --template, its fingerprint with it
    digits = data.open_task("digits", template="a digit {}.")
    assert digits.templates[0] == "a digit {}." and data.DIGITS_TEMPLATE in digits.templates
    assert data.zero_shot_prompts(digits)[3] == ["a digit three."]


@pytest.mark.parametrize("case, expect", [
    ("no folder", "is not a folder"),
    ("empty pool", "holds no images"),
    ("no class file", "--classes"),
    ("repeated class", "line 3 repeats the class 'cat' of line 1"),
    ("one class", "at least two"),
    ("same in a prompt", "read the same in a prompt"),
    ("bad json", "is not valid JSON"),
    ("json class twice", "the class 'cat' is a key twice (JSON would keep only its last prompts)"),
    ("pasted csv", "line 1 'class,count' holds a comma"),
    ("trailing comma", "line 1 'dog,' holds a comma"),
    ("tab", "line 1 '0\\tdog' holds a tab"),
    ("inline comment", "line 2 'cat  # the pet' holds a ' #'"),
    ("template beside prompts", "--template and the prompts of --classes"),
    ("json without prompts", "non-empty list"),
    ("bad template", "exactly one {}"),
    ("check folder of no class", "'cow' names none of the 2 classes"),
    ("check inside pool", "overlap"),
    ("unreadable", "2 of 6 images cannot be read (broken.png: not an image (no format Pillow reads); a/empty.jpg: an "
                   "empty file (0 bytes)): fix or remove them"),
])
def test_own_images_mistakes_are_one_line_before_any_work(tmp_path, case, expect):
    own_images(tmp_path)
    classes, pool, check, template = tmp_path / "classes.txt", tmp_path / "pool", None, None
    if case == "no folder":
        pool = tmp_path / "nowhere"
    elif case == "empty pool":
        pool = tmp_path / "empty"
        pool.mkdir()
        (pool / "x.txt").write_text("")
    elif case == "no class file":
        classes = tmp_path / "nothing.txt"
    elif case == "repeated class":
        classes.write_text("cat\ndog\ncat\n")
    elif case == "one class":
        classes.write_text("cat\n")
    elif case == "same in a prompt":
        classes.write_text("red_fox\nRed fox\n")
    elif case == "bad json":
        classes = tmp_path / "c.json"
        classes.write_text("{oops")
    elif case == "json without prompts":
        classes = tmp_path / "c.json"
        classes.write_text('{"cat": [], "dog": ["a dog."]}')
    elif case == "json class twice":
        classes = tmp_path / "c.json"
        classes.write_text('{"cat": ["a cat."], "dog": ["a dog."], "cat": ["a kitten."]}')
    elif case == "pasted csv":
        classes.write_text("class,count\ncat,3\n")
    elif case == "trailing comma":
        classes.write_text("dog,\ncat,\n")
    elif case == "tab":
        classes.write_text("0\tdog\n1\tcat\n")
    elif case == "inline comment":
        classes.write_text("dog\ncat  # the pet\n")
    elif case == "template beside prompts":
        classes, template = tmp_path / "c.json", "a photo of a {}."
        classes.write_text('{"cat": ["a cat."], "dog": ["a dog."]}')
    elif case == "bad template":
        template = "a photo of a {} {}."
    elif case == "check folder of no class":
        check = tmp_path / "check"
        write_image(check / "cow" / "1.png")
    elif case == "check inside pool":
        check = tmp_path / "pool" / "a"
    elif case == "unreadable":
        (pool / "broken.png").write_bytes(b"not a png")
        (pool / "a" / "empty.jpg").write_bytes(b"")
    msg = data_error(data.images_task, pool, classes, template, check)
    assert expect in msg, msg


def test_a_class_list_skips_blank_and_comment_lines(tmp_path):
    """classes.txt: a line whose first character (spaces aside) is # is a comment, as in most list
    files; blank lines are skipped; "C#" (a # inside a name, no space before it) is a name."""
    (tmp_path / "classes.txt").write_text("# my classes, one per line\n\ncat\n  # dogs: both kinds\nC#\ndog\n#\n")
    assert data.read_classes(tmp_path / "classes.txt") == (["cat", "C#", "dog"], None)


def test_labels_file_is_read_class_by_class_and_every_bad_row_is_one_line_naming_it(tmp_path):
    own_images(tmp_path)
    task = data.images_task(tmp_path / "pool", tmp_path / "classes.txt")
    path = tmp_path / "labels.csv"
    # a BOM (spreadsheet export), extra columns, another column order, spaces, a "_" and case in a class, an
    # absolute path, a blank row, the same row twice
    path.write_text("\ufeffscore, Class ,path\n0.1,tabby_cat,b.png\n0.2,Golden Retriever, a/z.JPG\n\n"
                    f"0.3,tabby cat,{tmp_path / 'pool' / 'c.jpeg'}\n0.1,tabby_cat,b.png\n", encoding="utf-8")
    labels = data.read_labels(path, task)
    # pool order: b.png, c.jpeg, a/z.JPG, a/b/c.webp; labels class by class, the file's order within a class:
    # a/z.JPG (golden retriever), then b.png, c.jpeg (tabby cat)
    assert labels.index.tolist() == [2, 0, 1] and labels.y.tolist() == [0, 1, 1] and len(labels) == 3
    assert labels.line == {0: 2, 2: 3, 1: 5} and labels.per_class(2) == [1, 2]
    assert labels.digest() == data.labels_digest(torch.tensor([2, 0, 1]), torch.tensor([0, 1, 1]))
    # in-memory images (the digits) are '#<index>'
    digits = data.digits_task()
    path.write_text("path,class\n#5,three\n#0,one\n")
    assert data.read_labels(path, digits).index.tolist() == [0, 5]
    for content, expect in [
            ("file,label\nb.png,tabby cat\n", "header naming the columns path and class"),
            ("", "header naming the columns path and class"),
            ("path,class\nb.png,tabby cat\nnope.png,tabby cat\n", "line 3: 'nope.png' is not an image of the pool"),
            ("path,class\nb.png,tabby cat\nc.jpeg,cow\n", "line 3: class 'cow' is not one of the 2 classes"),
            ("path,class\nb.png,tabby cat\nc.jpeg,golden retriever\nb.png,golden retriever\n",
             "line 4 labels 'b.png' 'golden retriever', but line 2 labelled it 'Tabby cat'"),
            ("path,class\n,tabby cat\n", "line 2: the class 'tabby cat' has no path"),
            ("path,class\nb.png,\n c.jpeg , \n", "labels no image: every row of it (2) has an empty class cell"),
            ("path,class\n", "labels no image: add rows path,class")]:
        path.write_text(content)
        msg = data_error(data.read_labels, path, task)
        assert expect in msg, msg
    # a row with an empty class cell is no label (a form not filled in yet), counted
    path.write_text("path,class,score\nb.png,,1\nc.jpeg,tabby cat,2\na/z.JPG, ,3\n,,\n")
    labels = data.read_labels(path, task)
    assert labels.index.tolist() == [1] and (labels.labelled_rows, labels.no_class_rows) == (1, 2)
    assert "1 labelled row read (1 image), 2 rows with an empty class cell (no label)" in labels.summary()
    path.write_text("path,class\nb.png,\n")
    assert len(data.read_labels(path, task, missing_ok=True)) == 0  # a list nobody has filled in yet
    assert "no such file" in data_error(data.read_labels, tmp_path / "none.csv", task)
    assert len(data.read_labels(tmp_path / "none.csv", task, missing_ok=True)) == 0  # a person has not started
    # a check-set image is not a pool image
    path.write_text(f"path,class\n{tmp_path / 'check' / 'tabby_cat' / '2.png'},tabby cat\n")
    assert "is not an image of the pool" in data_error(data.read_labels, path, task)


def test_the_example_folder_is_the_digits_as_your_own_images(tmp_path):
    """python data.py --write-example: the train split unlabelled (in an order that is not by class),
    the test split as a check set, the classes, and answers.csv with every pool image's true class,
    itself a labels file."""
    data.write_example(tmp_path)
    task = data.images_task(tmp_path / "images", tmp_path / "classes.txt", check=tmp_path / "check")
    digits = data.digits_task()
    assert task.classnames == digits.classnames and len(task.train) == len(digits.train)
    assert sorted(y for _, y in task.test) == sorted(y for _, y in digits.test)  # all: the whole test split
    answers = data.read_labels(tmp_path / "answers.csv", task)
    assert len(answers) == len(task.train)
    y = torch.empty(len(task.train), dtype=torch.long)
    y[answers.index] = answers.y
    assert sorted(y.tolist()) == sorted(label for _, label in digits.train) and not torch.equal(y, y.sort().values)
    for i in (0, 100, 500):  # each file is its image, and answers.csv names its class
        x = torch.from_numpy(np.array(Image.open(task.train[i][0]))).permute(2, 0, 1)
        assert any(torch.equal(x, im) and lab == y[i] for im, lab in digits.train)


# ---- one listing, and every image known by its content (issue 45: real image folders, trusted)

def distinct_images(folder, names, start=0):
    """A small PNG of its own content at each name below folder (no two files alike: a colour per
    number from `start`)."""
    for n, name in enumerate(names, start):
        write_image(folder / name, color=(10 * n, 255 - 10 * n, 7 * n))
    return folder


def rel(paths, root):
    return [os.path.relpath(p, root) for p in paths]


def test_a_file_reached_by_many_links_counts_once_and_a_link_loop_is_no_loop(tmp_path, capsys):
    """A link to a folder above (a loop), a second link to a folder, a file link and a hard link
    reach the files a.png ... d.png again: each is listed once, where the walk meets it first;
    hidden files and folders are left out; the run says what it counted once."""
    pool = distinct_images(tmp_path / "pool", ["a.png", "b.png", "sub/c.png", "sub/deeper/d.png"])
    os.symlink("..", pool / "sub" / "up")  # a loop
    os.symlink(pool / "sub", pool / "zz-again")  # the same folder twice
    os.symlink(pool / "a.png", pool / "z-link.png")
    os.link(pool / "b.png", pool / "sub" / "hard.png")
    write_image(pool / ".thumbnails" / "t.png")
    write_image(pool / ".hidden.png")
    listing = imagefiles.list_images(pool)
    assert rel(listing.files, pool) == ["a.png", "b.png", "sub/c.png", "sub/deeper/d.png"]
    assert sorted(rel([p for p, _ in listing.repeats], pool)) == ["sub/hard.png", "sub/up", "z-link.png", "zz-again"]
    assert listing.problems == [] and listing.others == []
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    task = data.images_task(pool, tmp_path / "classes.txt")
    assert rel([p for p, _ in task.train], pool) == ["a.png", "b.png", "sub/c.png", "sub/deeper/d.png"]
    assert "4 files or folders reached again through links (first: " in capsys.readouterr().out
    # deploy.py lists a folder as --images does
    import deploy
    assert deploy.image_files([str(pool)])[0] == listing.files


def test_a_check_set_reached_from_the_pool_through_a_link_is_refused(tmp_path, capsys):
    """The pool and the check set share no file, whatever link or nesting joins them, and no check
    file is an image of two classes; a check image with the bytes of a pool image is warned about."""
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    classes = tmp_path / "classes.txt"

    def fresh(name):
        root = tmp_path / name
        distinct_images(root / "pool", ["a.png", "b.png"])
        distinct_images(root / "check", ["cat/1.png", "dog/2.png", "dog/3.png"], start=10)
        return root / "pool", root / "check"
    pool, check = fresh("folder-link")
    os.symlink(check, pool / "checked")
    assert "share files" in data_error(data.images_task, pool, classes, None, check)
    pool, check = fresh("file-link")
    os.symlink(check / "dog" / "2.png", pool / "two.png")
    assert "share files" in data_error(data.images_task, pool, classes, None, check)
    pool, check = fresh("hard-link")
    os.link(check / "cat" / "1.png", pool / "one.png")
    assert "share files" in data_error(data.images_task, pool, classes, None, check)
    pool, check = fresh("nested-by-link")  # --check names a link to a folder inside the pool
    os.symlink(pool, tmp_path / "nested-by-link" / "alias")
    assert "overlap" in data_error(data.images_task, pool, classes, None, tmp_path / "nested-by-link" / "alias")
    pool, check = fresh("two-classes")
    os.symlink(check / "dog" / "3.png", check / "cat" / "3.png")
    assert "image of two classes, 'cat' and 'dog'" in data_error(data.images_task, pool, classes, None, check)
    pool, check = fresh("copy")
    (pool / "copy.png").write_bytes((check / "dog" / "3.png").read_bytes())
    capsys.readouterr()
    task = data.images_task(pool, classes, None, check)
    assert len(task.test) == 3 and len(task.train) == 3
    assert "1 of 3 check images have the content of a pool image (first: " in capsys.readouterr().out


def test_whatever_cannot_be_read_is_named_in_one_line_all_at_once(tmp_path, monkeypatch):
    """Files that cannot be read or decoded, links to nothing and folders that cannot be listed,
    in the pool and in the check set, are counted and the first named in one line, before any work."""
    pool = distinct_images(tmp_path / "pool", ["a.png", "b.png", "c.png", "locked/d.png"])
    check = distinct_images(tmp_path / "check", ["cat/1.png"], start=10)
    jpeg = pool / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:-200])
    (pool / "empty.png").write_bytes(b"")
    os.symlink(tmp_path / "gone.png", pool / "link.png")
    png = check / "cat" / "cut.png"
    png.write_bytes((pool / "a.png").read_bytes()[:40])
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    locked, scandir = str(pool / "locked"), os.scandir

    def no_permission(path="."):  # what a folder without read permission gives (the tests may run as root)
        if str(path) == locked:
            raise PermissionError(13, "Permission denied")
        return scandir(path)
    monkeypatch.setattr(imagefiles.os, "scandir", no_permission)
    msg = data_error(data.images_task, pool, tmp_path / "classes.txt", None, check)
    assert "4 of 9 images cannot be read, 1 folder cannot be listed (" in msg
    for name in ("empty.png: ", "link.png: a link to nothing", "locked: cannot be listed (Permission denied)"):
        assert name in msg, msg


def test_digests_are_read_again_only_where_a_file_may_have_changed(tmp_path, monkeypatch):
    """A repeated pass reads no file whose size, times and inode are those cached, unless they
    were within SETTLE_NS of the pass that read it: a change within a clock tick can keep them."""
    folder = distinct_images(tmp_path / "images", [f"{n}.png" for n in range(5)])
    paths = [str(folder / f"{n}.png") for n in range(5)]
    reads, real_read = [], imagefiles._read_file
    monkeypatch.setattr(imagefiles, "_read_file", lambda p: reads.append(os.path.basename(p)) or real_read(p))
    first, problems = imagefiles.contents(paths)
    assert problems == [] and len(reads) == 5
    assert [bytes(d) for d in first.numpy()] == [hashlib.sha256(open(p, "rb").read()).digest()[:16] for p in paths]
    reads.clear()
    imagefiles.contents(paths)
    assert len(reads) == 5  # written moments ago: not trusted yet
    later = imagefiles.time.time_ns() + 10 * imagefiles.SETTLE_NS
    monkeypatch.setattr(imagefiles.time, "time_ns", lambda: later)
    reads.clear()
    imagefiles.contents(paths)
    imagefiles.contents(paths)
    assert len(reads) == 5  # the first of the two passes: settled from then on, the second reads nothing
    (folder / "3.png").write_bytes((folder / "0.png").read_bytes() + b"x")
    reads.clear()
    again, _ = imagefiles.contents(paths)
    assert reads == ["3.png"] and torch.equal(again[[0, 1, 2, 4]], first[[0, 1, 2, 4]])
    assert bytes(again[3].numpy()) == hashlib.sha256((folder / "3.png").read_bytes()).digest()[:16]


def test_a_change_that_keeps_a_files_size_and_times_is_found_while_they_are_recent(tmp_path, monkeypatch):
    """A file rewritten within the same clock tick keeps its size and times: a digest read within
    SETTLE_NS of the file's times is read again, so the change is found."""
    folder = distinct_images(tmp_path / "images", ["a.bmp", "b.bmp"])  # BMP: the same size for the same shape
    a = str(folder / "a.bmp")
    imagefiles.contents([a])
    st, stat = os.stat(a), os.stat
    (folder / "a.bmp").write_bytes((folder / "b.bmp").read_bytes())
    assert os.path.getsize(a) == st.st_size
    monkeypatch.setattr(imagefiles.os, "stat", lambda p, *k, **kw: st if str(p) == a else stat(p, *k, **kw))
    digest, _ = imagefiles.contents([a])
    assert bytes(digest[0].numpy()) == hashlib.sha256((folder / "b.bmp").read_bytes()).digest()[:16]


def test_a_record_follows_contents_not_where_the_folders_are(tmp_path, capsys):
    """A record (what a run keeps of its data) is the same for a moved copy of the folders; any
    change of content, name, label or class list is said in words."""
    root = tmp_path / "a"
    distinct_images(root / "pool", ["x.png", "y.png", "sub/z.png"])
    distinct_images(root / "check", ["cat/1.png", "dog/2.png"], start=10)
    (root / "classes.txt").write_text("cat\ndog\n")

    def record(r, classes="classes.txt"):
        return data.record(data.images_task(r / "pool", r / classes, None, r / "check"))
    before = record(root)
    import shutil
    shutil.copytree(root, tmp_path / "b")
    moved = record(tmp_path / "b")
    assert data.fingerprint(moved) == data.fingerprint(before) and data.changes(before, moved) == []
    b = tmp_path / "b"
    (b / "pool" / "y.png").write_bytes((b / "check" / "cat" / "1.png").read_bytes())  # same name, other image
    (b / "pool" / "x.png").rename(b / "pool" / "w.png")
    write_image(b / "pool" / "new.png", color=(1, 2, 3))
    (b / "check" / "dog" / "2.png").rename(b / "check" / "cat" / "2.png")
    (b / "classes2.txt").write_text("cat\ndog\nbird\n")
    assert data.changes(before, record(b, "classes2.txt")) == [
        "the class names changed",
        "pool: 1 image renamed, 1 changed, 1 added (first: w.png renamed)",
        "check set: 1 image added, 1 removed (first: cat/2.png added)"]
    capsys.readouterr()
    assert data.fingerprint(record(b)) != data.fingerprint(before)
# ---- image files as a viewer shows them, and the check of every file before any work

@pytest.fixture(scope="module")
def image_forms(tmp_path_factory):
    return write_image_forms(tmp_path_factory.mktemp("forms"))


def test_every_form_of_an_image_decodes_to_what_a_viewer_shows_and_predicts_as_the_plain_file(image_forms):
    """The same 10 images in 43 forms (conftest.write_image_forms: EXIF orientation 2..8 in JPEG,
    PNG, TIFF and WebP; 16-bit, 32-bit integer and float grey; alpha, transparent palette
    indices and transparency keys over junk colour; CMYK; 1-bit; a GIF's first frame): each
    decodes to exactly the pixels of its plain upright 8-bit reference PNG, and the stand-in CLIP
    gives each exactly the reference's logits through the path training and check sets take
    (ImageDataset, the test transform) and deploy.py's classify. On Image.open(p).convert("RGB")
    every form but CMYK, 1-bit and TIFF's orientation (Pillow 13 turns TIFFs itself) fails."""
    import deploy
    forms = sorted({form for form, _, _ in image_forms})
    assert len(forms) == 43 and len(image_forms) == 430
    wrong = sorted({form for form, path, ref in image_forms
                    if not np.array_equal(np.asarray(imagefiles.decode_image(path)), np.asarray(Image.open(ref).convert("RGB")))})
    assert wrong == [], wrong
    clip, _ = standin.load("--clip", "demo", None, "cpu")
    task = data.digits_task()
    transform = data.make_transform("test", clip.visual, task)
    W = clip_model.text_classifier(clip, data.zero_shot_prompts(task), "cpu")

    def logits(paths):
        ds = data.ImageDataset([(p, 0) for p in paths], transform)
        with torch.no_grad():
            return clip_model.zero_shot_logits(clip, W, torch.stack([ds[i][0] for i in range(len(ds))]), 0.01)
    files, refs = [p for _, p, _ in image_forms], [r for _, _, r in image_forms]
    got, expected = logits(files), logits(refs)
    assert [f for f, a, b in zip([f for f, _, _ in image_forms], got, expected) if not torch.equal(a, b)] == []
    assert len(set(expected.argmax(1).tolist())) >= 5  # the references are told apart: predictions mean something

    def zero_shot(x):
        return clip_model.zero_shot_logits(clip, W, x, 0.01)
    deployed = list(deploy.classify(zero_shot, files, transform, "cpu", topk=3, batch=50))
    assert [top for _, top, _ in deployed] == [top for _, top, _ in deploy.classify(zero_shot, refs, transform, "cpu",
                                                                                     topk=3, batch=50)]
    assert all(err is None for _, _, err in deployed)


def test_without_orientation_the_stored_pixels_are_read_as_the_papers_pipelines_read_them(image_forms):
    """exif_orientation=False (the papers' benchmark datasets): a JPEG, PNG or WebP with an
    orientation tag gives its stored pixels, as Image.open(p).convert("RGB"), through decode_image
    and ImageDataset; the benchmark loaders set it, imagefolder and your own images do not."""
    turned = [(form, path) for form, path, _ in image_forms if form.split("-")[0] in ("jpeg", "png", "webp")
              and "-o" in form]
    assert len(turned) == 3 * 7 * 10
    ds = data.ImageDataset([(p, 0) for _, p in turned], lambda im: np.asarray(im), exif_orientation=False)
    for i, (form, path) in enumerate(turned):
        stored = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(np.asarray(imagefiles.decode_image(path, exif_orientation=False)), stored), form
        assert np.array_equal(ds[i][0], stored), form
        assert not np.array_equal(np.asarray(imagefiles.decode_image(path)), stored) or stored.shape[0] == stored.shape[1]


def test_every_kind_of_unusable_file_is_named_and_all_of_them_in_one_line_before_any_work(tmp_path, monkeypatch):
    """image_problem names why each file cannot be used (and nothing for a usable one, where
    decode_image then succeeds); the pass over every file (know_contents) counts them all and names
    the first three, paths relative to the folder, in one line."""
    folder = tmp_path / "pool"
    folder.mkdir()
    grey, colour = form_images(1)
    image, grey = Image.fromarray(colour[0]), grey[0].astype(np.int64)  # grey: 0..255
    expected = {}
    for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp"), ("TIFF", "tif"),
                        ("BMP", "bmp")):
        path = folder / f"cut.{suffix}"
        image.resize((256, 320)).save(path, fmt)
        path.write_bytes(path.read_bytes()[:path.stat().st_size * 3 // 4])
        if fmt != "WEBP":  # Pillow decodes a WebP as it opens it
            Image.open(path).close()  # the header is whole: a check that reads it alone passes the file
        expected[path] = "truncated"
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    (folder / "album.jpg").mkdir()
    (folder / "locked.png").write_bytes((folder / "cut.png").read_bytes())
    Image.fromarray((grey * 1000).astype(np.int32)).save(folder / "counts.tif")
    Image.fromarray(grey.astype(np.float32)).save(folder / "floats.tif")
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(folder / "nan.tif")
    expected.update({folder / "empty.png": "an empty file (0 bytes)", folder / "notes.jpg": "not an image",
                     folder / "album.jpg": "a folder, not a file", folder / "locked.png": "permission denied",
                     folder / "gone.png": "no such file",
                     folder / "counts.tif": "32-bit integer pixels outside 0..65535 (0..255000), with no white point "
                                            "viewers agree on",
                     folder / "floats.tif": "float pixels outside [0, 1] (0..255)",
                     folder / "nan.tif": "float pixels outside [0, 1] (NaN among them)"})
    good = []
    for name, saved in (("a.png", image), ("b.jpg", image), ("c.png", Image.fromarray((grey * 257).astype(np.uint16))),
                        ("d.tif", Image.fromarray((grey / 255).astype(np.float32)))):
        saved.save(folder / name)
        good.append(folder / name)
    real_open = open

    def locked_open(file, *a, **k):  # the tests may run as root, whom file permissions do not stop
        if str(file) == str(folder / "locked.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)
    monkeypatch.setattr("builtins.open", locked_open)
    for path, why in expected.items():
        assert why in (imagefiles.image_problem(str(path)) or ""), (path.name, imagefiles.image_problem(str(path)))
        assert why in data_error(imagefiles.decode_image, str(path)) and str(path) in data_error(imagefiles.decode_image, str(path))
    assert imagefiles.image_problem(str(folder / "floats.tif")).endswith(": convert it to 8- or 16-bit")
    for path in good:
        assert imagefiles.image_problem(str(path)) is None and imagefiles.decode_image(str(path)).mode == "RGB"
    items = [(str(p), None) for p in sorted(good + list(expected))]
    msg = data_error(data.know_contents, data.Task("images", ["a", "b"], ["{}"], items, [], root=str(folder)))
    assert msg.startswith(f"--images {folder}: 14 of 18 images cannot be read (album.jpg: a folder, not a file; "
                          f"counts.tif: 32-bit integer pixels outside 0..65535") and msg.endswith(
        "; cut.bmp: truncated (the file ends before its image does); ...): fix or remove them"), msg
    assert msg.count(": ") == 6  # the folder, the three files named (and counts.tif's advice), the advice: no more
    data.know_contents(data.Task("x", ["a", "b"], ["{}"], [(str(p), None) for p in good] +
                                 [(torch.zeros(3, 2, 2, dtype=torch.uint8), 0)], []))
def test_the_example_is_never_written_over_a_folder_that_holds_files(tmp_path, capsys):
    """python data.py --write-example FOLDER: a folder that holds anything (a classes.txt of yours) is
    refused in one line, and nothing in it changes."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(SystemExit) as e:
        data.main(["--write-example", str(tmp_path / "mine"), "--size", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0
    assert f"--write-example {tmp_path / 'mine'} is not empty" in err
    assert os.listdir(tmp_path / "mine") == ["classes.txt"] and (tmp_path / "mine" / "classes.txt").read_text() == \
        "cat\ndog\n"


# -----------------------------------------------------------------------------
# Names in the files a person reads and writes: formula guards, spaces, Unicode forms

NFD_CAFE = "cafe\u0301.png"  # café as macOS names files (decomposed); "caf\u00e9.png" is how a keyboard types it


def test_csv_text_guards_every_cell_a_spreadsheet_reads_as_a_formula_and_csv_untext_gives_it_back_exactly():
    """Every text cell that starts with = + - @ tab CR or ' gets one leading ', no other does; csv_untext
    is its exact inverse on any string (an apostrophe before one of those characters included), and
    leaves a cell a person wrote without the guard as written."""
    starts = ["=", "+", "-", "@", "\t", "\r", "'"]
    for cell in ["=cmd.png", "+SUM(1).png", "-x.png", "@a.png", "\tt.png", "\rr.png", "'q.png", "'=q.png", "''",
                 "'", "", "a.png", " lead.png", "a,b.png", 'quo"te.png', "new\nline.png", NFD_CAFE, "#5", "x=1"]:
        written = data.csv_text(cell)
        assert written == ("'" + cell if cell[:1] in starts else cell), cell
        assert data.csv_untext(written) == cell, cell
    assert data.csv_untext("'q.png") == "'q.png" and data.csv_untext("'=x") == "=x" and data.csv_untext("=x") == "=x"
    every = "".join(chr(c) for c in range(1, 200))  # every two-character start, round trip
    assert all(data.csv_untext(data.csv_text(a + b + "x")) == a + b + "x" for a in every for b in every[:60])


def test_a_written_path_finds_its_file_as_written_then_without_spaces_then_composed_and_two_files_are_refused():
    """PoolNames.find: the name as written wins; then without spaces around it (on both sides); then in
    Unicode's composed form (a row typed in NFC finds a file named in NFD); then an absolute path or
    one relative to the current folder. Where two pool files read the same at the step that finds
    one, the path is ambiguous: both are named."""
    root = os.path.abspath("pool")
    names = [" lead.png", "trail .png", NFD_CAFE, "a.png", " a.png", "sub/b.png", "=x.png", "'=x.png"]
    pool = data.PoolNames([(os.path.join(root, n), None) for n in names], root)
    find = pool.find
    assert [find(n) for n in names] == list(range(len(names)))  # as written: each its own file
    assert find("lead.png") == 0 and find("trail .png ") == 1 and find("  trail .png") == 1 and find("trail.png") is None
    assert find("caf\u00e9.png") == 2 and find(" caf\u00e9.png") == 2
    assert find(os.path.join(root, "sub", "b.png")) == 5 and find("sub//b.png") == 5 and find("pool/sub/b.png") == 5
    with pytest.raises(data.NameIsAmbiguous) as e:  # without its spaces, "a.png " reads as "a.png" and " a.png"
        find("a.png ")
    assert e.value.args == ("a.png", " a.png")
    assert find("nope.png") is None
    assert find("'=x.png", guarded=True) == 6 and find("''=x.png", guarded=True) == 7  # csv_text's spellings
    assert find("'=x.png") == 7  # not a CSV cell (a captions key): as written
    two = data.PoolNames([(os.path.join(root, n), None) for n in (" b.png", "b.png ")], root)
    with pytest.raises(data.NameIsAmbiguous) as e:
        two.find("b.png")
    assert e.value.args == (" b.png", "b.png ")
    nfc_and_nfd = data.PoolNames([(os.path.join(root, n), None) for n in (NFD_CAFE, "caf\u00e9.png")], root)
    assert nfc_and_nfd.find("caf\u00e9.png") == 1 and nfc_and_nfd.find(NFD_CAFE) == 0
    assert nfc_and_nfd.find(" caf\u00e9.png ") == 1  # found without its spaces, as written
    angstrom = data.PoolNames([(os.path.join(root, n), None) for n in ("A\u030a.png", "\u00c5.png")], root)
    with pytest.raises(data.NameIsAmbiguous):  # the Angstrom sign: neither file as written, both composed
        angstrom.find("\u212b.png")


def test_labels_rows_name_files_with_spaces_formula_characters_and_other_unicode_forms(tmp_path):
    """read_labels on a pool of hard names: the labels file data.csv_text writes reads back exactly, a
    row typed in NFC finds the NFD file, and a row that reads as two pool files is one line naming both."""
    names = [" lead.png", "trail .png", "=cmd.png", "'=cmd.png", "-x.png", "a,b.png", 'quo"te.png', "new\nline.png",
             NFD_CAFE]
    for n in names:
        write_image(tmp_path / "pool" / n)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    task = data.images_task(tmp_path / "pool", tmp_path / "classes.txt")
    keys = [data.item_key(s, i, task.root) for i, (s, _) in enumerate(task.train)]
    assert sorted(keys) == sorted(names)
    truth = {k: ["cat", "dog"][i % 2] for i, k in enumerate(keys)}
    with open(tmp_path / "labels.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("path", "class")] + [(data.csv_text(unicodedata.normalize("NFC", k)), c)
                                                       for k, c in truth.items()])
    labels = data.read_labels(tmp_path / "labels.csv", task)
    assert {keys[i]: task.classnames[y] for i, y in zip(labels.index.tolist(), labels.y.tolist())} == truth
    write_image(tmp_path / "pool" / "  lead.png")
    task = data.images_task(tmp_path / "pool", tmp_path / "classes.txt")
    (tmp_path / "labels.csv").write_text("path,class\nlead.png,cat\n")
    msg = data_error(data.read_labels, tmp_path / "labels.csv", task)
    assert "line 2: 'lead.png' could be the pool's '  lead.png' or ' lead.png'" in msg, msg
