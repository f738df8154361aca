"""
Data for the offline demo: real handwritten digits (the target domain) and
rendered, captioned digits (the source domain a tiny CLIP is pretrained on).

Target: the UCI "Optical Recognition of Handwritten Digits" test set, vendored
as assets/uci_digits_test.csv.gz (1,797 images of 8x8 pixels, 17 grey levels).
UCI made each image from a 32x32 binary bitmap of a handwritten digit by
counting the ink pixels in every 4x4 block.

Source: digits drawn from random strokes and from Pillow's built-in font, then
augmented and pushed through the same acquisition (32x32 binary -> 4x4 block
counts -> 8x8 with levels 0..16). Both domains share the pipeline after 8x8,
so the gap between them is the glyph style only.
"""

import csv
import gzip
import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

ASSETS = Path(__file__).parent / "assets"

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_CLASSNAMES = DIGIT_NAMES  # zero-shot class names: the words, as in the captions
DIGITS_TEMPLATE = "a photo of the number {}."  # also one of the caption templates below


class DataError(Exception):
    """A data file is missing or malformed."""


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
    method adapts on. Sizes for seed 0 (any seed): train 903, dev 176, test 718.
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
# source domain: glyphs drawn from strokes, in a unit box (x right, y down)

def _ell(cx, cy, rx, ry, a0=-90, a1=270, n=8):
    """n points on an elliptic arc from angle a0 to a1 (degrees, clockwise from +x)."""
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in torch.linspace(a0, a1, n).tolist()]


# A stroke is (kind, points): "L" polyline with sharp corners, "C" smooth open
# curve through the points, "O" smooth closed curve. Several styles per digit,
# because people write 1, 4, 7, 9 in visibly different ways.
STROKES = {
    0: [[("O", _ell(.5, .5, .5, .5, n=8)[:-1])],
        [("C", _ell(.5, .5, .5, .5, -60, 320, n=10))]],
    1: [[("L", [(.5, 0), (.5, 1)])],
        [("L", [(.1, .3), (.6, 0), (.6, 1)])],
        [("L", [(.1, .3), (.55, 0), (.55, 1)]), ("L", [(.1, 1), (1, 1)])],
        [("C", [(.2, .25), (.5, .1), (.7, 0)]), ("L", [(.7, 0), (.5, 1)])]],
    2: [[("C", [(.05, .25), (.3, .03), (.7, .02), (.95, .25), (.85, .5), (.45, .78), (0, 1)]),
         ("L", [(0, 1), (1, .98)])],
        [("C", [(.05, .2), (.5, 0), (.95, .25), (.8, .5)]), ("L", [(.8, .5), (0, 1), (1, 1)])],
        [("C", [(.05, .25), (.35, .02), (.8, .05), (.9, .35), (.5, .75), (.1, .95),
                (.2, .8), (.4, .95), (1, 1)])]],
    3: [[("C", [(.05, .12), (.45, 0), (.85, .15), (.8, .38), (.4, .48)]),
         ("C", [(.4, .48), (.85, .58), (.95, .8), (.6, 1), (.05, .9)])],
        [("L", [(.05, 0), (.95, 0), (.45, .42)]),
         ("C", [(.45, .42), (.85, .55), (.95, .8), (.6, 1), (.05, .9)])]],
    4: [[("L", [(.7, 0), (0, .68), (1, .68)]), ("L", [(.7, 0), (.7, 1)])],
        [("L", [(.15, 0), (.05, .62), (1, .62)]), ("L", [(.72, 0), (.72, 1)])],
        [("L", [(.3, 0), (0, .6), (.95, .6)]), ("L", [(.7, .25), (.7, 1)])]],
    5: [[("L", [(.95, 0), (.2, 0), (.15, .45)]),
         ("C", [(.15, .45), (.55, .36), (.95, .6), (.9, .86), (.5, 1), (.05, .9)])],
        [("L", [(.2, .02), (.95, 0)]), ("L", [(.2, .02), (.12, .5)]),
         ("C", [(.12, .5), (.6, .4), (.95, .65), (.85, .9), (.45, 1), (.05, .88)])]],
    6: [[("C", [(.85, .02), (.4, .15), (.1, .55), (.15, .88), (.5, 1), (.88, .82),
                (.85, .58), (.5, .48), (.15, .65)])],
        [("C", [(.7, 0), (.35, .3), (.1, .7), (.3, 1), (.75, .95), (.85, .65), (.5, .5), (.15, .7)])]],
    7: [[("L", [(0, 0), (1, 0), (.35, 1)])],
        [("L", [(0, 0), (1, 0), (.4, 1)]), ("L", [(.3, .5), (.9, .5)])],
        [("L", [(0, .18), (.02, 0), (1, .02), (.4, 1)])],
        [("L", [(0, 0), (1, 0)]), ("C", [(1, 0), (.6, .45), (.45, 1)])]],
    8: [[("C", [(.55, .48), (.9, .22), (.5, 0), (.1, .22), (.5, .5), (.95, .76), (.5, 1),
                (.05, .76), (.55, .48)])],
        [("O", _ell(.5, .24, .38, .24, n=8)[:-1]), ("O", _ell(.5, .73, .5, .27, n=8)[:-1])]],
    9: [[("O", _ell(.45, .28, .45, .28, n=8)[:-1]), ("L", [(.9, .25), (.9, 1)])],
        [("O", _ell(.45, .28, .45, .28, n=8)[:-1]), ("C", [(.9, .25), (.88, .65), (.6, .98), (.2, .92)])],
        [("O", _ell(.45, .28, .45, .28, n=8)[:-1]), ("L", [(.9, .28), (.45, 1)])],
        [("C", [(.9, .15), (.5, 0), (.1, .2), (.2, .5), (.6, .5), (.9, .25), (.85, 1)])]],
}


def _spline(pts, closed, k=6):
    """Catmull-Rom curve through pts, k samples per segment: smooth, passes every point."""
    p = pts + pts[:3] if closed else [pts[0]] + pts + [pts[-1]]
    out = []
    for i in range(len(p) - 3):
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = p[i:i + 4]
        for t in [j / k for j in range(k)]:
            a, b, c, d = -t**3 + 2*t*t - t, 3*t**3 - 5*t*t + 2, -3*t**3 + 4*t*t + t, t**3 - t*t
            out.append((0.5 * (a*x0 + b*x1 + c*x2 + d*x3), 0.5 * (a*y0 + b*y1 + c*y2 + d*y3)))
    return out + [p[-2]]


CANVAS = 48  # base glyphs are drawn on a 48x48 canvas, about the size of the 32x32 output


def _stroke_glyph(strokes, noise, aspect, width):
    """Draws one jittered glyph; noise is a list of (dx, dy) per control point, in box units."""
    im = Image.new("L", (CANVAS, CANVAS))
    draw = ImageDraw.Draw(im)
    h = 0.7 * CANVAS  # glyph box height; the margin leaves room for thick strokes
    w = aspect * h
    ox, oy = (CANVAS - w) / 2, (CANVAS - h) / 2
    noise = iter(noise)
    for kind, pts in strokes:
        pts = [(x + dx, y + dy) for (x, y), (dx, dy) in zip(pts, noise)]
        if kind != "L":
            pts = _spline(pts, closed=(kind == "O"))
        pts = [(ox + x * w, oy + y * h) for x, y in pts]
        draw.line(pts, fill=255, width=width, joint="curve")
        for x, y in (pts[0], pts[-1]):  # round caps
            r = width / 2
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return im


def _font_glyphs():
    """Digits from Pillow's built-in Aileron face at several stroke widths (bold)."""
    try:
        font = ImageFont.load_default(size=28)
        if not isinstance(font, ImageFont.FreeTypeFont):
            return []  # no FreeType: only the bitmap font, skip this source
    except (TypeError, ImportError, OSError):  # Pillow < 10.1
        return []
    out = []
    for c in range(10):
        for sw in (0, 1, 2):
            im = Image.new("L", (CANVAS, CANVAS))
            ImageDraw.Draw(im).text((CANVAS / 2, CANVAS / 2), str(c), fill=255, font=font,
                                    anchor="mm", stroke_width=sw, stroke_fill=255)
            out.append((im, c))
    return out


@lru_cache(maxsize=4)
def _glyph_bank(seed, per_digit=400):
    """
    Base glyphs, drawn with PIL once per seed (~0.5 s); all per-image variety
    comes later, from torch. Returns
      soft: float [B, 1, 48, 48], the glyphs Gaussian-blurred, so that the final
            threshold sets the stroke thickness (low threshold = bold)
      hull: float [B, 32, 2], extreme ink points (x, y) in 32 directions, to find
            the bounding box of a transformed glyph without rendering it
      labels: int64 [B]
    """
    g = torch.Generator().manual_seed(seed)
    ims, labels = [], []
    for c in range(10):
        styles = STROKES[c]
        for i in range(per_digit):
            strokes = styles[i % len(styles)]
            n_pts = sum(len(p) for _, p in strokes)
            noise = (0.045 * torch.randn(n_pts, 2, generator=g)).tolist()
            aspect = 0.45 + 0.3 * torch.rand(1, generator=g).item()
            width = int(torch.randint(3, 8, (1,), generator=g))
            ims.append(_stroke_glyph(strokes, noise, aspect, width))
            labels.append(c)
    # the font glyphs are few; repeat them so they make ~10% of the bank
    font = _font_glyphs()
    for im, c in font * max(1, round(0.1 * len(ims) / max(1, len(font)))):
        ims.append(im)
        labels.append(c)
    ink = torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8) for im in ims])
    ink = ink.view(-1, CANVAS * CANVAS) > 127  # [B, 2304]
    # support points: for each of 32 directions, the ink pixel furthest along it
    yx = torch.stack(torch.meshgrid(torch.arange(float(CANVAS)), torch.arange(float(CANVAS)),
                                    indexing="ij"), -1).view(-1, 2).flip(1)  # [2304, 2] as (x, y)
    ang = torch.arange(32) * (2 * math.pi / 32)
    proj = yx @ torch.stack([ang.cos(), ang.sin()])  # [2304, 32]
    best = torch.cat([torch.where(m[:, :, None], proj, -1e9).argmax(1)
                      for m in ink.split(256)])  # [B, 32], chunked to bound memory
    hull = yx[best]  # [B, 32, 2]
    # blur: sigma 1.2 px, separable
    k = torch.exp(-0.5 * (torch.arange(-3.0, 4.0) / 1.2) ** 2)
    k = k / k.sum()
    soft = ink.float().view(-1, 1, CANVAS, CANVAS)
    soft = F.conv2d(F.conv2d(soft, k.view(1, 1, 1, 7), padding=(0, 3)), k.view(1, 1, 7, 1), padding=(3, 0))
    return soft, hull, torch.tensor(labels)


def _augment(soft, hull, g):
    """
    Randomly warps base glyphs and acquires them like UCI did: size-normalise
    into a 32x32 binary bitmap, then count the ink in each 4x4 block.
    soft [N, 1, 48, 48], hull [N, 32, 2] -> uint8 [N, 8, 8] with values 0..16.
    """
    n = soft.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)
    # forward affine A: stretch @ rotation @ slant (overall size is normalised away below)
    rot, shear, stretch = u(-0.25, 0.25), u(-0.4, 0.4), torch.exp(u(-0.3, 0.15))
    cos, sin, zero, one = torch.cos(rot), torch.sin(rot), torch.zeros(n), torch.ones(n)
    mat = lambda a, b, c, d: torch.stack([torch.stack([a, b], 1), torch.stack([c, d], 1)], 1)
    A = mat(stretch, zero, zero, one) @ mat(cos, -sin, sin, cos) @ mat(one, -shear, zero, one)
    # size normalisation like NIST's: fit the bounding box into 32x32, keep the aspect
    q = hull @ A.transpose(1, 2)  # [N, 32, 2] transformed support points
    lo, hi = q.min(1).values, q.max(1).values  # [N, 2]
    side = (hi - lo).max(1).values + 1 + u(0, 4)  # source pixels that span the 32 output pixels
    mid = (lo + hi) / 2 + torch.stack([u(-1, 1), u(-1, 1)], 1)  # centre, with a little jitter
    # output coords v in [-1, 1] -> glyph space mid + v * side / 2 -> source pixel A^-1(...)
    Ainv = torch.linalg.inv(A)
    theta = torch.cat([Ainv * (side / CANVAS).view(n, 1, 1),
                       (2 * Ainv @ mid[:, :, None] + 1) / CANVAS - 1], 2)  # [N, 2, 3]
    grid = F.affine_grid(theta, (n, 1, 32, 32), align_corners=False)  # [N, 32, 32, 2]
    # light elastic warp: a smooth random displacement field (4x4 knots, bicubic)
    amp = (u(0.0, 0.05) * side / CANVAS).view(n, 1, 1, 1)
    field = F.interpolate(torch.randn(n, 2, 4, 4, generator=g), size=(32, 32), mode="bicubic",
                          align_corners=True)  # [N, 2, 32, 32]
    x = F.grid_sample(soft, grid + amp * field.permute(0, 2, 3, 1), align_corners=False)  # [N, 1, 32, 32]
    # binary bitmap like the scans; the threshold thickens (low) or thins (high) the strokes
    bits = (x > u(0.15, 0.6).view(n, 1, 1, 1)).float()
    flip = torch.rand(n, 1, 32, 32, generator=g) < u(0.0, 0.01).view(n, 1, 1, 1)  # speckle noise
    bits = torch.where(flip, 1 - bits, bits)
    counts = F.avg_pool2d(bits, 4) * 16  # [N, 1, 8, 8], ink pixels per 4x4 block
    return counts.round().to(torch.uint8).view(n, 8, 8)


# captions name the digit by word or numeral; {d} is the name, {a_d} is "a seven" / "an 8"
CAPTION_TEMPLATES = [
    "a photo of the number {d}.",
    "the digit {d}",
    "a bold {d}.",
    "a handwritten {d}.",
    "an image of the digit {d}.",
    "a blurry photo of {a_d}.",
    "a low resolution image of the number {d}.",
    "a pixelated {d}.",
    "the number {d}, written by hand.",
    "a scan of the digit {d}.",
    "a sketch of {a_d}.",
    "white ink on black: the number {d}.",
    "a tiny picture of {a_d}.",
    "this is {a_d}.",
    "a drawing of the numeral {d}.",
    "{d}",
]


def _caption(label, g):
    """One random caption for a digit label; the same generator keeps it deterministic."""
    t = CAPTION_TEMPLATES[int(torch.randint(len(CAPTION_TEMPLATES), (1,), generator=g))]
    d = DIGIT_NAMES[label] if torch.rand(1, generator=g).item() < 0.5 else str(label)
    article = "an" if d in ("eight", "8") else "a"
    return t.format(d=d, a_d=f"{article} {d}")


def _render(n, bank_seed, g, size):
    soft, hull, bank_labels = _glyph_bank(bank_seed)
    idx = torch.randint(len(soft), (n,), generator=g)
    x8 = _augment(soft[idx], hull[idx], g)  # [n, 8, 8]
    labels = bank_labels[idx]
    captions = [_caption(c, g) for c in labels.tolist()]
    return digits_to_images(x8, size), labels, captions


def render_digits(n, seed, size=32):
    """
    n rendered, captioned digits, deterministic for a seed on any machine (no
    system fonts). Returns images float [n, 3, size, size] in [0, 1] (17 levels,
    exactly like digits_to_images on UCI data), labels int64 [n], captions list[str].
    """
    return _render(n, seed, torch.Generator().manual_seed(seed), size)


def rendered_batches(batch_size, steps, seed, size=32):
    """Yields `steps` batches (images, labels, captions); the stream is fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield _render(batch_size, seed, g, size)
