"""
The offline stand-in: a tiny CLIP that we pretrain ourselves, so the demo runs with no download.

Source domain: digits drawn from random strokes and from Pillow's built-in font, augmented, then
pushed through the UCI acquisition (32x32 binary -> ink count per 4x4 block -> 8x8 with levels
0..16, data.digits_to_images), each with a caption that names it ("a handwritten 7.", "the digit
seven"). The target (data.digits_task) is real handwritten UCI digits through the same
acquisition, so the gap between the domains is the glyph style only.

Pretraining: CLIP's contrastive loss on (image, caption) pairs, every caption of the same digit
counting as a match, with the shared loop (train.fit) under AdamW and warm-up + cosine.

The result is shipped, content-addressed: assets/standin.safetensors, whose sha256 is
SHIPPED_SHA256 (matrices in fp16). Pretraining again gives the same tensors only with the same
torch version and thread count (float sums), so the demos load the shipped file and never
pretrain; `--rebuild` shows how it was made and whether this machine makes the same one.

    python standin.py                  check the shipped checkpoint
    python standin.py --rebuild        pretrain it again (~4 min on a CPU core), compare
    --clip demo                        what every method's CLI calls it (load)
"""
import argparse
import dataclasses
import math
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import checkpoints
import clip_model
import ddp
import train
from data import DIGIT_NAMES, digits_to_images

# -----------------------------------------------------------------------------
# The source domain: glyphs drawn from strokes, in a unit box (x right, y down)

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
        # round joints only where corners are sharp; splines are dense enough without
        draw.line(pts, fill=255, width=width, joint="curve" if kind == "L" else None)
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


@lru_cache(maxsize=2)
def _glyph_bank(seed, per_digit=400, font_share=0.1):
    """
    Base glyphs, drawn with PIL once per seed (~1 s); all per-image variety
    comes later, from torch. Returns
      soft: float [B, 1, 48, 48], the glyphs Gaussian-blurred, so that the final
            threshold sets the stroke thickness (low threshold = bold)
      hull: float [B, 16, 2], extreme ink points (x, y) in 16 directions, to find
            the bounding box of a transformed glyph without rendering it
      labels: int64 [B]
    """
    g = torch.Generator().manual_seed(2**32 + seed)  # a stream apart from render_digits'
    ims, labels = [], []
    for c in range(10):
        styles = STROKES[c]
        for i in range(per_digit):
            strokes = styles[i % len(styles)]
            n_pts = sum(len(p) for _, p in strokes)
            noise = (0.045 * torch.randn(n_pts, 2, generator=g)).tolist()
            aspect = 0.45 + 0.3 * torch.rand(1, generator=g).item()
            width = int(torch.randint(3, 7, (1,), generator=g))
            ims.append(_stroke_glyph(strokes, noise, aspect, width))
            labels.append(c)
    # the font glyphs are few (one face); repeat them to make font_share of the bank.
    # Kept small: alone they transfer poorly to handwriting (~42% vs ~92% for strokes)
    font = _font_glyphs()
    for im, c in font * round(font_share * len(ims) / max(1, len(font))):
        ims.append(im)
        labels.append(c)
    ink = torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8) for im in ims])
    ink = ink.view(-1, CANVAS * CANVAS) > 127  # [B, 2304]
    # support points: for each of 16 directions, the ink pixel furthest along it
    yx = torch.stack(torch.meshgrid(torch.arange(float(CANVAS)), torch.arange(float(CANVAS)),
                                    indexing="ij"), -1).view(-1, 2).flip(1)  # [2304, 2] as (x, y)
    ang = torch.arange(16) * (2 * math.pi / 16)
    proj = yx @ torch.stack([ang.cos(), ang.sin()])  # [2304, 16]
    best = torch.cat([torch.where(m[:, :, None], proj, -1e9).argmax(1)
                      for m in ink.split(256)])  # [B, 16], chunked to bound memory
    hull = yx[best]  # [B, 16, 2]
    # blur: a 5x5 box filter twice, about a Gaussian with sigma 2 px; wide enough
    # that a low threshold can thicken a stroke by ~3 px on either side
    soft = ink.float().view(-1, 1, CANVAS, CANVAS)  # [B, 1, 48, 48]
    soft = F.avg_pool2d(F.avg_pool2d(soft, 5, 1, 2), 5, 1, 2)
    return soft, hull, torch.tensor(labels)


def _augment(soft, hull, g):
    """
    Randomly warps base glyphs and acquires them the way the UCI data was made.
    The UCI bitmaps show NIST's normalisation: every digit, a 1 included, fills
    the full height and ~20-24 of the 32 columns (the aspect is not kept), and
    holds ~30% ink whatever its shape (the stroke width is normalised). So:
    fit the bounding box to ~20 pixels wide by the full height, binarise at
    32x32 with the threshold that gives the ink count, then count the ink in
    each 4x4 block.
    soft [N, 1, 48, 48], hull [N, 16, 2] -> uint8 [N, 8, 8] with values 0..16.
    """
    n = soft.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)
    # forward affine A: stretch @ rotation (radians) @ slant, before the normalisation
    rot, shear, stretch = u(-0.25, 0.25), u(-0.35, 0.35), torch.exp(u(-0.3, 0.3))
    cos, sin, zero, one = torch.cos(rot), torch.sin(rot), torch.zeros(n), torch.ones(n)
    mat = lambda a, b, c, d: torch.stack([torch.stack([a, b], 1), torch.stack([c, d], 1)], 1)
    A = mat(stretch, zero, zero, one) @ mat(cos, -sin, sin, cos) @ mat(one, -shear, zero, one)
    # bounding box of the transformed glyph from its support points, no rendering needed
    q = hull @ A.transpose(1, 2)  # [N, 16, 2]
    lo, hi = q.min(1).values, q.max(1).values  # [N, 2]
    size = hi - lo + 1  # [N, 2] glyph width, height in source pixels
    scale_y = u(30, 33) / size[:, 1]  # output pixels per source pixel
    # a plain 1 is too thin to be stretched to full width; cap the anisotropy
    scale_x = torch.minimum(u(15, 24) / size[:, 0], scale_y * u(1.2, 2.5))
    mid = (lo + hi) / 2 + torch.stack([u(-1, 1), u(-1, 1)], 1)  # centre, with a little jitter
    # output coords v in [-1, 1] -> glyph space mid + 16 v / scale -> source pixels A^-1(...)
    Ainv = torch.linalg.inv(A)
    S = mat(16 / scale_x, zero, zero, 16 / scale_y)
    # and source pixel p -> grid_sample's normalised coords (2p + 1) / CANVAS - 1
    theta = torch.cat([2 * Ainv @ S / CANVAS, (2 * Ainv @ mid[:, :, None] + 1) / CANVAS - 1], 2)
    grid = F.affine_grid(theta, (n, 1, 32, 32), align_corners=False)  # [N, 32, 32, 2]
    # light elastic warp: a smooth random displacement field (4x4 knots, bicubic)
    amp = (u(0.0, 0.06) * 32 / scale_y / CANVAS).view(n, 1, 1, 1)
    field = F.interpolate(torch.randn(n, 2, 4, 4, generator=g), size=(32, 32), mode="bicubic",
                          align_corners=True)  # [N, 2, 32, 32]
    x = F.grid_sample(soft, grid + amp * field.permute(0, 2, 3, 1), align_corners=False)
    x = x.view(n, 1024)  # [N, 32*32]
    # stroke width normalisation: threshold at the k-th brightest value, k = target ink count.
    # A low threshold thickens the blurred strokes, a high one thins them.
    k = (u(0.23, 0.39) * 1024).long()
    t = x.sort(1, descending=True).values.gather(1, k[:, None]).clamp(0.03, 0.9)  # [N, 1]
    bits = (x > t).float()  # the binary 32x32 bitmap, as scanned
    flip = torch.rand(n, 1024, generator=g) < u(0.0, 0.003)[:, None]  # sparse speckle noise
    bits = torch.where(flip, 1 - bits, bits).view(n, 1, 32, 32)
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
    """n digits from the glyph bank of bank_seed, all randomness drawn from g."""
    soft, hull, bank_labels = _glyph_bank(bank_seed)
    idx = torch.randint(len(soft), (n,), generator=g)
    # chunks of 4096 bound the memory (and stay in cache) when n is large
    x8 = torch.cat([_augment(soft[i], hull[i], g) for i in idx.split(4096)])  # [n, 8, 8]
    labels = bank_labels[idx]
    captions = [_caption(c, g) for c in labels.tolist()]
    return digits_to_images(x8, size), labels, captions


def render_digits(n, seed, size=32):
    """
    n rendered, captioned digits. Deterministic for a seed: no system fonts are
    used, only procedural strokes and Pillow's built-in face. Returns images float
    [n, 3, size, size] in [0, 1] (17 levels, exactly like digits_to_images on UCI data),
    labels int64 [n], captions list[str].
    """
    return _render(n, seed, torch.Generator().manual_seed(seed), size)


class RenderedBatches:
    """`steps` batches (images, labels, captions) of `batch_size` rendered digits, all drawn from
    one generator seeded by `seed`: a fixed stream, the same at every iteration."""

    def __init__(self, batch_size, steps, seed, size=32):
        self.batch_size, self.steps, self.seed, self.size = batch_size, steps, seed, size

    def __len__(self):
        return self.steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            yield _render(self.batch_size, self.seed, g, self.size)


# -----------------------------------------------------------------------------
# Pretraining and the cache

STANDIN = dict(config="demo", steps=400, batch=256, lr=1e-3, weight_decay=0.1, warmup=40, seed=0, version=1)
NAME = "demo"  # what --clip calls the stand-in
# The shipped checkpoint, content-addressed: rebuild(STANDIN) on torch 2.14.1 (CPU, one thread)
SHIPPED = clip_model.ASSETS / "standin.safetensors"
SHIPPED_SHA256 = "275a008b0d646bd370366b54809e07d160f340d3243f9506d40eec47bbe38f8a"


def clip_loss(v, t, logit_scale, labels):
    """CLIP's symmetric contrastive loss where every caption of the same digit counts as a match:
    soft targets spread evenly over the batch's same-label pairs (the diagonal included)."""
    logits = logit_scale * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()  # [B, B]
    match = (labels[:, None] == labels[None, :]).float()
    target = match / match.sum(1, keepdim=True)  # symmetric label structure: rows and columns alike
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def pretrain(model, steps, batch, lr, weight_decay, warmup, seed, log_every=50, **_):
    """Contrastive pretraining on `steps` batches of rendered digits with train.fit (one epoch of
    the stream): AdamW as CLIP (betas 0.9/0.98, eps 1e-6, no decay on gains, biases, embeddings
    and the temperature), LR warm-up over `warmup` steps capped by a cosine over all steps, and
    CLIP's temperature cap at 100. Returns the loss of every step."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    mean = torch.tensor(clip_model.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(clip_model.CLIP_STD).view(3, 1, 1)

    def schedule(step, total, _):
        return min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / total)))

    def cap_temperature():
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    def contrastive_step(model, batch, _):
        # the cap after the previous step, applied before this step's forward (the same values)
        cap_temperature()
        images, labels, captions = batch
        tokens = clip_model.tokenize(captions, model.context_length, truncate=True)
        v, t = model.encode_image((images - mean) / std), model.encode_text(tokens)
        return {"loss": (clip_loss(v, t, model.logit_scale.exp(), labels), len(labels))}

    history = train.fit(model, contrastive_step,
                        lambda epoch: RenderedBatches(batch, steps, seed, model.visual.resolution), epochs=1, opt=opt,
                        schedule=schedule, device="cpu", seed=seed, precision="fp32", tag="pretrain",
                        log_every=log_every)
    cap_temperature()  # after the last step too
    return history["loss"]


def shipped():
    """The shipped stand-in (assets/standin.safetensors), refused in one line unless its sha256 is
    SHIPPED_SHA256: the demo tables were measured from exactly these bytes."""
    if not SHIPPED.is_file():
        raise train.RunError(f"{SHIPPED} is missing: restore it (git checkout -- assets/{SHIPPED.name})")
    got = checkpoints.sha256_of(SHIPPED)
    if got != SHIPPED_SHA256:
        raise train.RunError(f"{SHIPPED} has sha256 {got[:16]}..., not the stand-in the demo tables were measured "
                             f"with ({SHIPPED_SHA256[:16]}...): restore it (git checkout -- assets/{SHIPPED.name}), "
                             f"or adopt a rebuilt one by setting standin.SHIPPED_SHA256 to its hash")
    return SHIPPED


def as_shipped(state_dict):
    """The stand-in as it is stored: matrices (the bulk: the token embedding) in fp16, vectors
    and scalars (norms, biases, the temperature) in fp32; loading casts everything to fp32."""
    return {k: v.half() if v.is_floating_point() and v.ndim >= 2 else v.float() if v.is_floating_point() else v
            for k, v in state_dict.items()}


def rebuild(out, settings=None):
    """Pretrain the stand-in again from STANDIN's settings and store it as shipped at `out`.
    Returns (path, sha256): the same sha256 as SHIPPED_SHA256 means the very same tensors
    (write_safetensors' bytes depend on the tensors alone)."""
    settings = {**STANDIN, **(settings or {})}
    print(f"pretraining the offline stand-in CLIP on rendered digits ({settings['steps']} steps of "
          f"{settings['batch']}) into {out}", flush=True)
    model = clip_model.tiny_clip(settings["config"], seed=settings["seed"])
    t0 = time.time()
    pretrain(model, **settings)
    print(f"  pretraining took {time.time() - t0:.0f}s", flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    path = checkpoints.write_safetensors(as_shipped(model.state_dict()), out)
    return path, checkpoints.sha256_of(path)


def check_backbone(flag, name, act=None):
    """A --clip-like flag's value -> checkpoints.Backbone (None for no value): the stand-in, or any
    form checkpoints.describe reads, with `act` from --clip-act; refused in one line naming the
    flag before anything is loaded."""
    if name is None:
        return None
    if name == NAME:  # ours, built with CLIP's QuickGELU
        if act not in (None, "quick_gelu"):
            raise train.RunError(f"{flag} {NAME} runs quick_gelu, as it was pretrained: drop --clip-act {act}")
        return checkpoints.Backbone(NAME, shipped(), "openai", "quick_gelu")
    try:
        return checkpoints.describe(name, act)
    except clip_model.CLIPError as e:
        raise train.RunError(f"{flag}: {e}") from None


def backbone_id(flag, name, act=None):
    """A backbone as a run's config records it: an OpenAI release's name (its file's sha256 is
    checked whenever it is loaded), the stand-in's sha256, else the name with its weights' sha256
    and activation (so moving a file does not matter, changing it or its activation does)."""
    b = check_backbone(flag, name, act)
    return None if b is None else f"demo (sha256:{SHIPPED_SHA256[:16]})" if name == NAME else b.identity()


def load(flag, name, act, device):
    """(CLIP, test transform) of a --clip-like flag's value: an OpenAI release is downloaded into
    the cache on first use, rank 0 first under torchrun (ddp.rank0_first); the stand-in is the
    shipped file."""
    b = check_backbone(flag, name, act)

    def fetch():
        return checkpoints.checkpoint_path(b.release) if b.release else b.path
    return checkpoints.load(dataclasses.replace(b, path=ddp.rank0_first(fetch)), device)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="the offline stand-in CLIP: check the shipped checkpoint, or rebuild it")
    p.add_argument("--rebuild", action="store_true", help="pretrain it again and compare with the shipped file")
    p.add_argument("--out", default=None, help="--rebuild: where to write (default: the cache folder)")
    args = p.parse_args()
    if not args.rebuild:
        print(f"stand-in checkpoint: {shipped()} (sha256 {SHIPPED_SHA256})")
    else:
        path, sha = rebuild(args.out or checkpoints.default_cache_dir() / "standin-rebuilt.safetensors")
        same = "the same tensors as" if sha == SHIPPED_SHA256 else "other tensors than"
        print(f"rebuilt stand-in: {path} (sha256 {sha}): {same} the shipped {SHIPPED.name}")
