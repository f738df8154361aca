"""
Image files as a run knows them, in one place for training, check sets, captions, deploy.py and
the export: one listing of a folder (list_images: each file once, links followed, nothing skipped
without a word), one decode as a viewer shows a file (decode_image: EXIF orientation, 16-bit and
float grey, transparency), one check that a file can be used (image_problem), and every file known
by its content (contents: a sha256 per file, cached by its size and times so that a repeated
command reads only what changed). data.py builds the tasks on them
(docs/own-images.md#one-set-of-files-known-by-their-content).
"""
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import clip_model


class DataError(Exception):
    """A data file is missing or malformed, or the data flags do not go together."""


# -----------------------------------------------------------------------------
# Image files as a viewer shows them (docs/own-images.md#how-an-image-file-is-read): one decode for
# training, check sets, captions and deploy.py, and one check of every file before any work.

# the EXIF Orientation tag's values 2..8 -> the transpose that turns the stored pixels upright (the
# table of Pillow's ImageOps.exif_transpose); 1 and any other value: as stored
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
REPLACE = "remove or replace the file"


class Unusable(Exception):
    """Why a file cannot be used as an image (a few words, no path), and what to do about it."""

    def __init__(self, why, todo=REPLACE):
        super().__init__(why)
        self.why, self.todo = why, todo


def orientation(image):
    """The EXIF Orientation tag (1..8) of an opened image file; 1 (as stored) where it has none, an
    unknown value, or an EXIF block that cannot be parsed (viewers then show the stored pixels too)."""
    try:
        o = image.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block, whatever Pillow's parser raises on it
        return 1
    return o if isinstance(o, int) and o in UPRIGHT else 1


def eight_bit(image):
    """A grey image of more than 8 bits (Pillow's modes I;16*, I, F) as the 8-bit RGB a viewer
    shows: 16-bit values v scaled to round(255 v / 65535), not clipped (Pillow's own convert makes
    every value above 255 white); mode I (32-bit integers, what some readers give for 16-bit data)
    read as 16-bit where its values lie in 0..65535; mode F (floats) as round(255 v) where they lie
    in [0, 1]. A transparency key (16-bit PNGs' tRNS) becomes white. Outside those ranges no white
    point is agreed on: Unusable."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # exact: every 16-bit value fits a 32-bit integer
    dtype = torch.float32 if image.mode == "F" else torch.int32
    v = torch.frombuffer(bytearray(image.tobytes()), dtype=dtype).reshape(image.height, image.width)
    if image.mode == "F":
        if not bool(((v >= 0) & (v <= 1)).all()):  # NaN fails both comparisons
            raise Unusable(f"float pixels outside [0, 1] ({_extremes(v)}), with no white point viewers agree on",
                           "convert it to 8- or 16-bit")
        grey = (v.double() * 255).round()
    else:
        if v.min() < 0 or v.max() > 65535:
            raise Unusable(f"32-bit integer pixels outside 0..65535 ({_extremes(v)}), with no white point viewers "
                           f"agree on", "convert it to 8- or 16-bit")
        grey = (v.double() * (255 / 65535)).round()  # v / 257: never a tie, so no rounding rule decides
    grey = grey.to(torch.uint8)
    key = image.info.get("transparency")
    if isinstance(key, int) and image.mode != "F":
        grey[v == key] = 255  # white where the key marks a pixel transparent
    return Image.frombytes("L", image.size, grey.numpy().tobytes()).convert("RGB")


def _extremes(v):
    """'min..max' of a tensor of pixel values, NaN named."""
    if v.is_floating_point() and bool(v.isnan().any()):
        return "NaN among them"
    return f"{v.min().item():g}..{v.max().item():g}"


def _read(path, exif_orientation):
    """The first frame of the image file at `path` as a viewer shows it, a PIL RGB image; any
    reason it cannot be is Unusable. High bit depths: eight_bit; every other mode through
    clip_model.rgb (transparency over white, then Pillow's conversion: grey, palette, CMYK, ...)."""
    try:
        with Image.open(path) as image:  # the first frame; a multi-frame file's others are never read
            image.load()  # every pixel decoded here, so a truncated or damaged file fails now
            turn = UPRIGHT.get(orientation(image)) if exif_orientation else None
    except FileNotFoundError:
        raise Unusable("no such file") from None
    except IsADirectoryError:
        raise Unusable("a folder, not a file") from None
    except PermissionError:
        raise Unusable("permission denied", "make it readable, or remove it") from None
    except Image.DecompressionBombError as e:  # Pillow's guard against huge images (not an OSError)
        raise Unusable(f"over Pillow's size limit ({e})", "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you "
                                                          "trust the file") from None
    except Image.UnidentifiedImageError:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise Unusable("an empty file (0 bytes)" if empty else "not an image (no format Pillow reads)") from None
    except Exception as e:  # whatever a damaged file makes Pillow's decoders raise (OSError, SyntaxError, ...)
        msg = " ".join(str(e).split())[:80]
        if "truncated" in msg:
            raise Unusable("truncated (the file ends before its image does)") from None
        raise Unusable(f"damaged or truncated ({type(e).__name__}: {msg})") from None
    try:
        wide = image.mode.startswith("I") or image.mode == "F"
        rgb = eight_bit(image) if wide else clip_model.rgb(image).convert("RGB")  # convert: a plain image, a copy
    except ValueError as e:  # a mode Pillow cannot convert to RGB
        raise Unusable(f"mode {image.mode}, which Pillow cannot show as RGB ({e})") from None
    return rgb.transpose(turn) if turn is not None else rgb


def decode_image(path, exif_orientation=True, name=None):
    """The image file at `path` as a viewer shows it, a PIL RGB image: turned as its EXIF
    Orientation tag says (unless exif_orientation=False: the papers' benchmark datasets, read as
    their pipelines read them), 16-bit and float grey scaled to 8 bits, transparent pixels over
    white, other modes by Pillow's conversion, a multi-frame file's first frame. A file that
    cannot be used (image_problem) is a one-line DataError naming it (`name`: what to call an open
    file, `path` as a file object)."""
    try:
        return _read(path, exif_orientation)
    except Unusable as e:
        raise DataError(f"cannot read image {name or path}: {e.why}; {e.todo}") from None


def image_problem(path):
    """Why the file at `path` cannot be used as an image, in a few words without the path
    (missing, unreadable, not an image, empty, truncated or damaged, a mode with no agreed white
    point, over Pillow's size limit), or None if it can: decode_image succeeds exactly where this
    is None, since this is that decode. The cost is a full decode (bench.py --sections decode,
    docs/efficiency.md#checking-every-image-before-training)."""
    try:
        _read(path, exif_orientation=False)
    except Unusable as e:
        return e.why if e.todo == REPLACE else f"{e.why}: {e.todo}"
    return None


def load_image(source, decode=True, exif_orientation=True):
    """A uint8 tensor image [3, H, W] as it is; an image file (a path) through decode_image, its
    errors one line naming the file. decode=False only checks that the file can be used (the same
    full decode, see image_problem) and returns None."""
    if torch.is_tensor(source):
        return source
    if decode:
        return decode_image(source, exif_orientation)
    problem = image_problem(source)
    if problem is not None:
        raise DataError(f"cannot read image {source}: {problem}")
    return None


# -----------------------------------------------------------------------------
# One listing of a folder's image files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _is_image(filename):
    return filename.lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class Listing:
    """The image files below a folder (list_images): each file once, and what could not be read."""
    files: list  # paths as first reached from the folder, in walk order
    problems: list  # (path, why): folders that cannot be listed, links that lead nowhere
    repeats: list  # (path, the path it repeats): a file or folder reached again through a link, counted once
    others: list  # files that are not images by their extension (left out)

    def refuse_problems(self, what):
        """One line naming what could not be listed, if anything."""
        if self.problems:
            raise DataError(f"{what}: {problems_line(self.problems)}")


def problems_line(problems, total=None):
    """Problems [(path, why)] in one line: how many images cannot be read (of `total`) and folders
    cannot be listed, the first three named, and what to do."""
    folders = sum(why.startswith("cannot be listed") for _, why in problems)
    files = len(problems) - folders
    of = f" of {total}" if total is not None else ""
    images = f"image{'s' if (files if total is None else total) != 1 else ''}"
    counts = [f"{files}{of} {images} cannot be read"] * bool(files) + \
        [f"{folders} folder{'s' if folders != 1 else ''} cannot be listed"] * bool(folders)
    shown = "; ".join(f"{path}: {why}" for path, why in problems[:3]) + ("; ..." if len(problems) > 3 else "")
    return f"{', '.join(counts)} ({shown}): fix or remove {'it' if len(problems) == 1 else 'them'}"


def left_out(others):
    """The files of other extensions a listing left out, in words: how many, of which kinds."""
    kinds = sorted({os.path.splitext(f)[1].lower() or "(none)" for f in others})
    more = ", ..." if len(kinds) > 5 else ""
    return f"{len(others)} file{'s' if len(others) != 1 else ''} ({', '.join(kinds[:5])}{more})"


def identity(st):
    """A file's identity from its os.stat: its device and inode, as one int."""
    return st.st_dev << 64 | st.st_ino


def list_images(folder, seen=None):
    """Every image file below `folder` (by extension, case aside), the one listing of your own
    images, check sets, image-folder datasets and deploy.py: each folder's files in sorted order,
    then its subfolders in sorted order (as torchvision's ImageFolder walks); hidden files and
    folders (.thumbnails, .ipynb_checkpoints) left out; links followed, but every file and folder
    counted once by its identity (device and inode), however many links or hard links reach it,
    so that a link to a folder above is no loop and a link to another folder no second copy.
    What cannot be read (a folder without permission, a link to nothing) is listed in
    `problems`, never skipped without a word, and files of other extensions in `others`. `seen`
    (identity -> path) may be shared by several calls, so that a file reached from two folders
    counts once (and is named in `repeats`)."""
    seen = {} if seen is None else seen
    files, problems, repeats, others = [], [], [], []
    stack = [str(folder)]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            key = identity(st)
            if key in seen:  # a folder met before: a loop, or a second link to it
                repeats.append((d, seen[key]))
                continue
            seen[key] = d
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append((d, f"cannot be listed ({e.strerror or type(e).__name__})"))
            continue
        subfolders = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():  # follows a link
                    subfolders.append(e.path)
                    continue
                if not _is_image(e.name):
                    others.append(e.path)
                    continue
                st = e.stat()  # follows a link
            except OSError as err:
                why = "a link to nothing" if e.is_symlink() and not os.path.exists(e.path) else \
                    f"cannot be read ({err.strerror or type(err).__name__})"
                problems.append((e.path, why))
                continue
            key = identity(st)
            if key in seen:
                repeats.append((e.path, seen[key]))
                continue
            seen[key] = e.path
            files.append(e.path)
        stack.extend(reversed(subfolders))  # popped in sorted order, depth first
    return Listing(files, problems, repeats, others)


def check_threads():
    """Threads for checking images: the CPU cores this process may use, at most 16 (the measured
    speed-up, docs/efficiency.md#checking-every-image-before-training)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores))


# -----------------------------------------------------------------------------
# Every file known by its content

DIGEST_BYTES = 16  # sha256 cut to 128 bits
# File times are coarse (a clock tick on ext4, 2 s on FAT): a file changed within this long of
# being read could keep its size and times, so its cached digest is not trusted (read again next time)
SETTLE_NS = 2_000_000_000
CHUNK = 20_000  # files per step of the pass: its memory is that of one step's folder caches


def cache_folder():
    """The folder of the digest caches: $COFT_CACHE/images, else ~/.cache/coft/images (one JSON file
    per image folder, never in the image folder itself: the project writes nothing it was given)."""
    return Path(os.environ.get("COFT_CACHE", Path.home() / ".cache" / "coft")) / "images"


def _cache_file(folder):
    key = hashlib.sha256(os.path.realpath(folder).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return cache_folder() / f"{key}.json"


def _read_cache(folder):
    """A folder's cache: file name -> [size, mtime_ns, ctime_ns, inode, digest (hex), problem, settled];
    {} where there is none or it cannot be read (then every file is read again)."""
    try:
        saved = json.loads(_cache_file(folder).read_text(encoding="utf-8"))
        return saved["files"] if saved.get("folder") == os.path.realpath(folder) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


_cache_warned = []


def _write_cache(folder, files):
    """Write a folder's cache atomically (a temporary file of this process, then rename: several
    processes may write the same cache); a cache that cannot be written is said once, not fatal."""
    path = _cache_file(folder)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"folder": os.path.realpath(folder), "files": files}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True) if tmp.parent.is_dir() else None
        if not _cache_warned:
            _cache_warned.append(path)
            print(f"note: cannot write the image digest cache in {cache_folder()} ({e.strerror or e}): every image "
                  f"is read again by the next command (set COFT_CACHE to a writable folder)", flush=True)


def bytes_digest(data):
    """The digest of bytes held in memory (an image file's, an in-memory image's): their sha256 cut
    to DIGEST_BYTES, as a pass over files gives it (_read_file reads a file in blocks)."""
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


def _read_file(path):
    """(the file's digest, why it cannot be used as an image or None): its bytes read once."""
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError as e:  # image_problem says why in the words it has for each case (a folder, no permission)
        return None, image_problem(path) or f"cannot be read ({e.strerror or type(e).__name__})"
    return h.digest()[:DIGEST_BYTES], image_problem(path)


def contents(sources):
    """Every source's digest, as uint8 [N, DIGEST_BYTES] (an in-memory image: its bytes'), and the
    problems found [(path, why)]: files that cannot be read or used as images (image_problem).
    A file's digest and problem are cached by its size, times and inode (cache_folder), so a
    repeated pass reads only the files that changed; a file whose times are within SETTLE_NS of
    the pass that read it is read again next time, since a change within a clock tick can leave
    them as they were. Files are read by a pool of threads (hashing and decoding release the
    GIL): the results do not depend on their number."""
    blob = bytearray(len(sources) * DIGEST_BYTES)  # row i: source i's digest
    problems = {}
    folders = {}  # folder -> [index of each of its files], in order of first appearance
    for i, source in enumerate(sources):
        if torch.is_tensor(source):
            blob[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] = bytes_digest(source.contiguous().numpy().tobytes())
        else:
            folders.setdefault(os.path.dirname(source), []).append(i)
    steps, step = [], []
    for folder, rows in folders.items():  # steps of whole folders, about CHUNK files each
        step.append((folder, rows))
        if sum(len(r) for _, r in step) >= CHUNK:
            steps, step = steps + [step], []
    steps += [step] if step else []
    with ThreadPoolExecutor(check_threads()) as threads:
        for step in steps:
            started = time.time_ns()  # before any file of this step is looked at
            caches, todo = {}, []
            for folder, rows in step:
                cache = caches[folder] = _read_cache(folder)
                for i in rows:
                    try:
                        st = os.stat(sources[i])
                    except OSError as e:
                        problems[i] = f"cannot be read ({e.strerror or type(e).__name__})"
                        continue
                    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
                    hit = cache.get(os.path.basename(sources[i]))
                    if hit and hit[:4] == stamp and hit[6]:
                        blob[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] = bytes.fromhex(hit[4])
                        if hit[5]:
                            problems[i] = hit[5]
                    else:
                        todo.append((i, folder, stamp))
            for (i, folder, stamp), (digest, problem) in zip(todo, threads.map(_read_file,
                                                                              [sources[i] for i, _, _ in todo])):
                if problem:
                    problems[i] = problem
                if digest is None:
                    continue
                blob[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] = digest
                settled = max(stamp[1], stamp[2]) < started - SETTLE_NS
                caches[folder][os.path.basename(sources[i])] = stamp + [digest.hex(), problem, settled]
            for folder in {folder for _, folder, _ in todo}:
                _write_cache(folder, caches[folder])
    digests = torch.frombuffer(blob, dtype=torch.uint8).reshape(len(sources), DIGEST_BYTES) if sources else \
        torch.zeros(0, DIGEST_BYTES, dtype=torch.uint8)  # [N, DIGEST_BYTES]
    return digests, [(sources[i], problems[i]) for i in sorted(problems)]
