"""
The CLIP weights researchers have, read into clip_model's CLIP (whose keys are the OpenAI layout):

    RN50 ... ViT-L/14@336px      OpenAI's releases: downloaded into the cache, sha256 checked
    open_clip:ARCH/TAG           open_clip's weights (LAION, DataComp, MetaCLIP, DFN, ...), found
                                 offline where open_clip and huggingface_hub cache them
    open_clip:ARCH[/TAG]=FILE    the same weights (or your own open_clip ARCH) from a file
    FOLDER, hf:ORG/NAME          a Hugging Face CLIPModel (config.json + model.safetensors or
                                 pytorch_model.bin), from a folder or the huggingface_hub cache
    FILE                         an OpenAI-layout state dict or TorchScript archive: an OpenAI
                                 release (recognised by its sha256), else given its activation

The tensors fix every size but not the MLP activation: QuickGELU (OpenAI, MetaCLIP, DFN) and GELU
(open_clip's LAION and DataComp runs) have the same keys and give different features. Nor do
they fix a ViT's heads where the head width is not 64 (ViT-H-14: 16 heads of 80), the image
mean/std or the test resize. These come from the name (OPEN_CLIP, checked against open_clip's
own pretrained configs in the tests), the folder's config.json / preprocessor_config.json, or the
user (act=, the CLIs' --clip-act); never from a guess: a file that names none of them is refused.

    describe(name, act=None) -> Backbone   what a name means, checked without reading weights
    load(name or Backbone, device)          -> (clip_model.CLIP, its test transform)

Nothing here imports more than torch and clip_model; huggingface_hub, open_clip and
transformers are never imported (their cache layouts and key names are read as plain files).
"""
import collections
import hashlib
import io
import json
import os
import pickle
import re
import struct
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

import clip_model
from clip_model import CLIPError

# -----------------------------------------------------------------------------
# OpenAI's releases: names, download, cache

CHECKPOINTS = {  # name -> (file, sha256); the hash is also a path segment of the URL
    "RN50": ("RN50.pt", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"),
    "RN101": ("RN101.pt", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599"),
    "RN50x4": ("RN50x4.pt", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd"),
    "RN50x16": ("RN50x16.pt", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa"),
    "RN50x64": ("RN50x64.pt", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c"),
    "ViT-B/32": ("ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    "ViT-B/16": ("ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "ViT-L/14": ("ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
    "ViT-L/14@336px": ("ViT-L-14-336px.pt", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"),
}
URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"
RELEASE_OF_SHA = {sha: name for name, (_, sha) in CHECKPOINTS.items()}


def default_cache_dir():
    return Path(os.environ.get("CLIP_CACHE", Path.home() / ".cache" / "clip"))


@lru_cache(maxsize=64)
def cached_sha256(path, size, mtime_ns):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sha256_of(path):
    """A file's sha256, hashed once per process while the file is unchanged (size, mtime)."""
    st = os.stat(path)
    return cached_sha256(str(path), st.st_size, st.st_mtime_ns)


def download(url, dest, sha256, retries=3, progress=True):
    """Fetch url to dest (a file path) and check its SHA256. The bytes go to `dest.part` first,
    which a later call resumes with an HTTP Range request; dest appears (atomically, by rename)
    only once the hash matches, so the cache never holds a corrupt file."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if progress:
        print(f"downloading {url} to {dest}", file=sys.stderr, flush=True)
    last_error = None
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                status = getattr(r, "status", None)
                if have and status != 206:  # server ignored the range: start over
                    have = 0
                total = int(r.headers.get("Content-Length") or 0) + have
                with open(part, "ab" if have else "wb") as f:
                    done, t0 = have, time.time()
                    while block := r.read(1 << 20):
                        f.write(block)
                        done += len(block)
                        if progress and sys.stderr.isatty():
                            rate = (done - have) / max(time.time() - t0, 1e-6) / 2 ** 20
                            print(f"\rdownloading {dest.name}: {done / 2 ** 20:.0f}/{total / 2 ** 20:.0f} MiB "
                                  f"({rate:.1f} MiB/s)", end="", file=sys.stderr)
                if progress and sys.stderr.isatty():
                    print(file=sys.stderr)
            break
        except (urllib.error.URLError, OSError) as e:
            last_error = e
            if attempt + 1 < retries:
                time.sleep(2 ** attempt)
    else:
        raise CLIPError(f"could not download {url} ({getattr(last_error, 'reason', last_error)}); "
                        f"no network? Put the file at {dest} (sha256 {sha256}) and run again")
    got = sha256_of(part)
    if got != sha256:
        part.unlink()
        raise CLIPError(f"{url} downloaded with sha256 {got}, expected {sha256}; the partial file was "
                        f"deleted, run again (or put a good copy at {dest})")
    os.replace(part, dest)
    return dest


def checkpoint_path(name, cache_dir=None, url=None):
    """Local path of an OpenAI release: the cached file (hash verified), else downloaded."""
    file, sha = CHECKPOINTS[name]
    path = Path(cache_dir or default_cache_dir()) / file
    if path.exists():
        if sha256_of(path) != sha:
            raise CLIPError(f"{path} does not have the sha256 of {name} ({sha}): delete it and run again")
        return path
    return download(url or URL.format(sha=sha, file=file), path, sha)


# -----------------------------------------------------------------------------
# open_clip's weights: what the tensors do not say, per architecture and tag

# architecture -> (image resolution, ViT heads where the head width is not 64); the text towers
# all have heads of 64 and OpenAI's vocabulary and context
OPEN_CLIP_ARCHS = {
    "RN50": (224, None), "RN101": (224, None), "RN50x4": (288, None), "RN50x16": (384, None),
    "RN50x64": (448, None), "ViT-B-32": (224, None), "ViT-B-32-256": (256, None), "ViT-B-16": (224, None),
    "ViT-B-16-plus-240": (240, None), "ViT-L-14": (224, None), "ViT-L-14-336": (336, None),
    "ViT-H-14": (224, 16), "ViT-H-14-378": (378, 16),
}
# "ARCH/TAG" -> (the activation the weights were trained with, Hugging Face hub repo, file name of
# the release URL), from open_clip 3.3's pretrained configs (its tags for the architectures above;
# a "-quickgelu" ARCH is the same weights); all use OpenAI's mean/std and test transform, but:
HALF_MEAN_STD = {"ViT-L-14/laion2b_s32b_b82k"}  # mean = std = 0.5
SQUASHED = {"ViT-H-14/dfn5b", "ViT-H-14-378/dfn5b"}  # resized to the square, no crop
OPEN_CLIP = {
    "RN50/openai": ("quick_gelu", "timm/resnet50_clip.openai", "RN50.pt"),
    "RN50/yfcc15m": ("quick_gelu", "timm/resnet50_clip.yfcc15m", "rn50-quickgelu-yfcc15m-455df137.pt"),
    "RN50/cc12m": ("quick_gelu", "timm/resnet50_clip.cc12m", "rn50-quickgelu-cc12m-f000538c.pt"),
    "RN101/openai": ("quick_gelu", "timm/resnet101_clip.openai", "RN101.pt"),
    "RN101/yfcc15m": ("quick_gelu", "timm/resnet101_clip.yfcc15m", "rn101-quickgelu-yfcc15m-3e04b30e.pt"),
    "RN50x4/openai": ("quick_gelu", "timm/resnet50x4_clip.openai", "RN50x4.pt"),
    "RN50x16/openai": ("quick_gelu", "timm/resnet50x16_clip.openai", "RN50x16.pt"),
    "RN50x64/openai": ("quick_gelu", "timm/resnet50x64_clip.openai", "RN50x64.pt"),
    "ViT-B-32/openai": ("quick_gelu", "timm/vit_base_patch32_clip_224.openai", "ViT-B-32.pt"),
    "ViT-B-32/laion400m_e31": ("quick_gelu", "timm/vit_base_patch32_clip_224.laion400m_e31", "vit_b_32-quickgelu-laion400m_e31-d867053b.pt"),
    "ViT-B-32/laion400m_e32": ("quick_gelu", "timm/vit_base_patch32_clip_224.laion400m_e32", "vit_b_32-quickgelu-laion400m_e32-46683a32.pt"),
    "ViT-B-32/laion2b_e16": ("gelu", "timm/vit_base_patch32_clip_224.laion2b_e16", "vit_b_32-laion2b_e16-af8dbd0c.pth"),
    "ViT-B-32/laion2b_s34b_b79k": ("gelu", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", ""),
    "ViT-B-32/datacomp_xl_s13b_b90k": ("gelu", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", ""),
    "ViT-B-32/datacomp_m_s128m_b4k": ("gelu", "laion/CLIP-ViT-B-32-DataComp.M-s128M-b4K", ""),
    "ViT-B-32/commonpool_m_clip_s128m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.M.clip-s128M-b4K", ""),
    "ViT-B-32/commonpool_m_laion_s128m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.M.laion-s128M-b4K", ""),
    "ViT-B-32/commonpool_m_image_s128m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.M.image-s128M-b4K", ""),
    "ViT-B-32/commonpool_m_text_s128m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.M.text-s128M-b4K", ""),
    "ViT-B-32/commonpool_m_basic_s128m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.M.basic-s128M-b4K", ""),
    "ViT-B-32/commonpool_m_s128m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.M-s128M-b4K", ""),
    "ViT-B-32/datacomp_s_s13m_b4k": ("gelu", "laion/CLIP-ViT-B-32-DataComp.S-s13M-b4K", ""),
    "ViT-B-32/commonpool_s_clip_s13m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.S.clip-s13M-b4K", ""),
    "ViT-B-32/commonpool_s_laion_s13m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.S.laion-s13M-b4K", ""),
    "ViT-B-32/commonpool_s_image_s13m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.S.image-s13M-b4K", ""),
    "ViT-B-32/commonpool_s_text_s13m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.S.text-s13M-b4K", ""),
    "ViT-B-32/commonpool_s_basic_s13m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.S.basic-s13M-b4K", ""),
    "ViT-B-32/commonpool_s_s13m_b4k": ("gelu", "laion/CLIP-ViT-B-32-CommonPool.S-s13M-b4K", ""),
    "ViT-B-32/metaclip_400m": ("quick_gelu", "timm/vit_base_patch32_clip_224.metaclip_400m", "b32_400m.pt"),
    "ViT-B-32/metaclip_fullcc": ("quick_gelu", "timm/vit_base_patch32_clip_224.metaclip_2pt5b", "b32_fullcc2.5b.pt"),
    "ViT-B-32-256/datacomp_s34b_b86k": ("gelu", "laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K", ""),
    "ViT-B-16/openai": ("quick_gelu", "timm/vit_base_patch16_clip_224.openai", "ViT-B-16.pt"),
    "ViT-B-16/laion400m_e31": ("gelu", "timm/vit_base_patch16_clip_224.laion400m_e31", "vit_b_16-laion400m_e31-00efa78f.pt"),
    "ViT-B-16/laion400m_e32": ("gelu", "timm/vit_base_patch16_clip_224.laion400m_e32", "vit_b_16-laion400m_e32-55e67d44.pt"),
    "ViT-B-16/laion2b_s34b_b88k": ("gelu", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", ""),
    "ViT-B-16/datacomp_xl_s13b_b90k": ("gelu", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", ""),
    "ViT-B-16/datacomp_l_s1b_b8k": ("gelu", "laion/CLIP-ViT-B-16-DataComp.L-s1B-b8K", ""),
    "ViT-B-16/commonpool_l_clip_s1b_b8k": ("gelu", "laion/CLIP-ViT-B-16-CommonPool.L.clip-s1B-b8K", ""),
    "ViT-B-16/commonpool_l_laion_s1b_b8k": ("gelu", "laion/CLIP-ViT-B-16-CommonPool.L.laion-s1B-b8K", ""),
    "ViT-B-16/commonpool_l_image_s1b_b8k": ("gelu", "laion/CLIP-ViT-B-16-CommonPool.L.image-s1B-b8K", ""),
    "ViT-B-16/commonpool_l_text_s1b_b8k": ("gelu", "laion/CLIP-ViT-B-16-CommonPool.L.text-s1B-b8K", ""),
    "ViT-B-16/commonpool_l_basic_s1b_b8k": ("gelu", "laion/CLIP-ViT-B-16-CommonPool.L.basic-s1B-b8K", ""),
    "ViT-B-16/commonpool_l_s1b_b8k": ("gelu", "laion/CLIP-ViT-B-16-CommonPool.L-s1B-b8K", ""),
    "ViT-B-16/dfn2b": ("quick_gelu", "apple/DFN2B-CLIP-ViT-B-16", ""),
    "ViT-B-16/metaclip_400m": ("quick_gelu", "timm/vit_base_patch16_clip_224.metaclip_400m", "b16_400m.pt"),
    "ViT-B-16/metaclip_fullcc": ("quick_gelu", "timm/vit_base_patch16_clip_224.metaclip_2pt5b", "b16_fullcc2.5b.pt"),
    "ViT-B-16-plus-240/laion400m_e31": ("gelu", "timm/vit_base_patch16_plus_clip_240.laion400m_e31", "vit_b_16_plus_240-laion400m_e31-8fb26589.pt"),
    "ViT-B-16-plus-240/laion400m_e32": ("gelu", "timm/vit_base_patch16_plus_clip_240.laion400m_e31", "vit_b_16_plus_240-laion400m_e32-699c4b84.pt"),
    "ViT-L-14/openai": ("quick_gelu", "timm/vit_large_patch14_clip_224.openai", "ViT-L-14.pt"),
    "ViT-L-14/laion400m_e31": ("gelu", "timm/vit_large_patch14_clip_224.laion400m_e31", "vit_l_14-laion400m_e31-69988bb6.pt"),
    "ViT-L-14/laion400m_e32": ("gelu", "timm/vit_large_patch14_clip_224.laion400m_e32", "vit_l_14-laion400m_e32-3d133497.pt"),
    "ViT-L-14/laion2b_s32b_b82k": ("gelu", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", ""),
    "ViT-L-14/datacomp_xl_s13b_b90k": ("gelu", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", ""),
    "ViT-L-14/commonpool_xl_clip_s13b_b90k": ("gelu", "laion/CLIP-ViT-L-14-CommonPool.XL.clip-s13B-b90K", ""),
    "ViT-L-14/commonpool_xl_laion_s13b_b90k": ("gelu", "laion/CLIP-ViT-L-14-CommonPool.XL.laion-s13B-b90K", ""),
    "ViT-L-14/commonpool_xl_s13b_b90k": ("gelu", "laion/CLIP-ViT-L-14-CommonPool.XL-s13B-b90K", ""),
    "ViT-L-14/metaclip_400m": ("quick_gelu", "timm/vit_large_patch14_clip_224.metaclip_400m", "l14_400m.pt"),
    "ViT-L-14/metaclip_fullcc": ("quick_gelu", "timm/vit_large_patch14_clip_224.metaclip_2pt5b", "l14_fullcc2.5b.pt"),
    "ViT-L-14/dfn2b": ("quick_gelu", "apple/DFN2B-CLIP-ViT-L-14", ""),
    "ViT-L-14/dfn2b_s39b": ("gelu", "apple/DFN2B-CLIP-ViT-L-14-39B", ""),
    "ViT-L-14-336/openai": ("quick_gelu", "timm/vit_large_patch14_clip_336.openai", "ViT-L-14-336px.pt"),
    "ViT-H-14/laion2b_s32b_b79k": ("gelu", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ""),
    "ViT-H-14/metaclip_fullcc": ("quick_gelu", "timm/vit_huge_patch14_clip_224.metaclip_2pt5b", "h14_fullcc2.5b.pt"),
    "ViT-H-14/metaclip_altogether": ("gelu", "timm/vit_huge_patch14_clip_224.metaclip_altogether", "h14_v1.2_altogether.pt"),
    "ViT-H-14/dfn5b": ("quick_gelu", "apple/DFN5B-CLIP-ViT-H-14", ""),
    "ViT-H-14-378/dfn5b": ("quick_gelu", "apple/DFN5B-CLIP-ViT-H-14-378", ""),
}
# open_clip's file names on the hub, the one it prefers first
HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def hf_hub_cache():
    """huggingface_hub's cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def hub_snapshots(repo):
    """The snapshot folders of a hub repo in the cache (models--ORG--NAME/snapshots/REV), the
    one refs/main names first."""
    root = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    ref = root / "refs" / "main"
    main = [root / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    others = sorted((root / "snapshots").glob("*")) if (root / "snapshots").is_dir() else []
    return main + [s for s in others if s not in main]


def open_clip_settings(arch, tag=""):
    """(activation, CLIPConfig fields, resolution) of open_clip's ARCH/TAG: the activation the
    tag's weights were trained with; without a tag, the one open_clip builds ARCH with (GELU, or
    QuickGELU for an ARCH-quickgelu)."""
    base = arch.removesuffix("-quickgelu")
    if base not in OPEN_CLIP_ARCHS:
        raise CLIPError(f"open_clip architecture {arch!r} is not one this CLIP builds: use one of "
                        f"{', '.join(OPEN_CLIP_ARCHS)} (with -quickgelu where it applies)")
    resolution, heads = OPEN_CLIP_ARCHS[base]
    known = {"vision_heads": heads} if heads else {}
    if not tag:
        return ("quick_gelu" if arch != base else "gelu"), known, resolution
    key = f"{base}/{tag}"
    if key not in OPEN_CLIP:
        raise CLIPError(f"open_clip:{arch}/{tag}: unknown tag; {base}'s are "
                        f"{', '.join(k.split('/')[1] for k in OPEN_CLIP if k.startswith(base + '/'))}")
    act = OPEN_CLIP[key][0]
    if arch != base and act != "quick_gelu":
        raise CLIPError(f"open_clip:{key} was trained with GELU: {arch} would run it with QuickGELU; use "
                        f"open_clip:{key}")
    if key in HALF_MEAN_STD:
        known.update(image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    if key in SQUASHED:
        known.update(resize_mode="squash")
    return act, known, resolution


def open_clip_file(key, cache_dir=None):
    """The cached weights of an open_clip ARCH/TAG: the hub cache (safetensors first, as open_clip
    prefers them), then the release URL's file in open_clip's cache (~/.cache/clip) or ours.
    Never downloads: a missing file is one line naming where it was looked for."""
    _, repo, url_file = OPEN_CLIP[key]
    places = [s / f for s in hub_snapshots(repo) for f in HF_WEIGHTS] if repo else []
    if url_file:
        places += [Path(d) / url_file for d in dict.fromkeys([cache_dir or default_cache_dir(),
                                                               Path.home() / ".cache" / "clip"])]
    for p in places:
        if p.is_file():
            return p
    where = (f"{hf_hub_cache() / ('models--' + repo.replace('/', '--'))}/snapshots/<rev>/{HF_WEIGHTS[0]} (or "
             f"{HF_WEIGHTS[1]})" if repo else "") + (" or " if repo and url_file else "") + \
        (f"{Path(cache_dir or default_cache_dir()) / url_file}" if url_file else "")
    raise CLIPError(f"open_clip:{key} is not in the cache: expected {where} (nothing is downloaded here: fetch "
                    f"it with open_clip or huggingface_hub, or give the file as open_clip:{key}=FILE)")


# -----------------------------------------------------------------------------
# Reading tensors: TorchScript, torch.save, safetensors


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}. The format: an 8-byte little-endian header length n,
    n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}} (plus "__metadata__"), then
    the tensors' raw little-endian bytes, offsets counted from the end of the header. The tensors
    are views of one buffer holding the file (one copy in memory)."""
    with open(path, "rb") as f:
        buf = bytearray(f.read())  # writable: torch.frombuffer would warn on read-only bytes
    try:
        (n,) = struct.unpack("<Q", buf[:8])
        header = json.loads(buf[8:8 + n])
        out = {}
        for name, t in header.items():
            if name == "__metadata__":
                continue
            begin, end = t["data_offsets"]
            dtype = SAFETENSORS_DTYPES[t["dtype"]]
            count = (end - begin) // torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end <= len(buf) - 8 - n:
                raise ValueError(f"{name}'s bytes lie outside the file")
            x = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin) if count else \
                torch.empty(0, dtype=dtype)
            out[name] = x.reshape(t["shape"])
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CLIPError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {str(e)[:60]}); is the "
                        f"file complete?") from None
    return out


def write_safetensors(tensors, path):
    """{name: tensor} -> a .safetensors file (read_safetensors' format), names sorted and no
    metadata, so the bytes depend on the tensors alone: equal tensors, equal sha256. Written to a
    temporary name, then renamed (atomic)."""
    names = sorted(tensors)
    header, offset = {}, 0
    dtype_name = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    for k in names:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": dtype_name[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensors start 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in names:
            f.write(tensors[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
    return Path(path)


# what the pickle of a TorchScript archive's tensors may name: a storage type per dtype, the tensor
# rebuild, an ordered dict; its modules (__torch__.*) become _ScriptedModule shells
STORAGE_DTYPES = {f"{name}Storage": dtype for name, dtype in (
    ("Float", torch.float32), ("Half", torch.float16), ("BFloat16", torch.bfloat16), ("Double", torch.float64),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool))}


class _ScriptedModule:
    """What a TorchScript module becomes when its archive is read as data: its attributes only
    (tensors, numbers, child modules); none of its code is loaded or run."""

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(flat, offset, size, stride, *_):
    """A tensor of the archive: a strided view of its storage, copied out."""
    return flat.as_strided(size, stride, offset).clone()


class _TensorsOnly(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl as data: storages are read from the archive's
    data/<key> entries, and any other name than those above is refused, so nothing in the file
    can run code."""

    def __init__(self, raw, archive, root):
        super().__init__(io.BytesIO(raw))
        self.archive, self.root = archive, root

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            return _ScriptedModule
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor, number or module")

    def persistent_load(self, pid):  # ("storage", dtype, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:60]}")
        raw = bytearray(self.archive.read(f"{self.root}/data/{pid[2]}"))
        return torch.frombuffer(raw, dtype=pid[1]) if raw else torch.empty(0, dtype=pid[1])


def read_torchscript(path):
    """{name: tensor} of a TorchScript archive (OpenAI's release format), read as data: the
    tensors of its data.pkl and their dotted names, as torch.jit.load(path).state_dict() gives
    them, without loading or running any of the archive's code (a crafted archive can only be
    refused). None where the file is no TorchScript archive."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        data = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not data or not any(n.endswith("/code/") or "/code/" in n for n in archive.namelist()):
            return None  # a torch.save zip (its pickle is data.pkl too, but no code/ folder)
        root = data[0].split("/")[0]
        try:
            top = _TensorsOnly(archive.read(data[0]), archive, root).load()
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError, RuntimeError, EOFError) as e:
            raise CLIPError(f"{path} is a TorchScript archive holding more than tensors and modules ({str(e)[:80]}): "
                            f"refused, as reading it could run code") from None
    out = {}

    def walk(obj, prefix):
        for k, v in (obj.state.items() if isinstance(obj, _ScriptedModule) and isinstance(obj.state, dict) else ()):
            if torch.is_tensor(v):
                out[prefix + k] = v
            elif isinstance(v, _ScriptedModule):
                walk(v, f"{prefix}{k}.")
    walk(top, "")
    return out


def read_state_dict(path):
    """{name: tensor} from a .safetensors file, a TorchScript archive (OpenAI's release format, read
    as data: read_torchscript) or a torch.save'd state dict (also one under a "state_dict" key),
    read with weights_only=True. Nothing in the file can run code."""
    path = Path(path)
    if not path.is_file():
        raise CLIPError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    scripted = read_torchscript(path)
    if scripted is not None:
        return scripted
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        code = re.search(r"GLOBAL (\S+) was not an allowed|Unsupported class (\S+)", str(e))  # what it would call
        if code:
            raise CLIPError(f"{path} holds more than tensors and numbers (its pickle calls "
                            f"{code.group(1) or code.group(2)}), so "
                            f"reading it could run code: refused") from None
        raise CLIPError(f"{path} is neither a TorchScript archive nor a state dict ({type(e).__name__}); "
                        f"is the file complete?") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CLIPError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


# -----------------------------------------------------------------------------
# Hugging Face CLIPModel: its keys onto ours, its config


HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}
HF_RENAME = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias", "logit_scale": "logit_scale",
}
HF_TOWERS = {"text_model.encoder.layers.": "transformer.resblocks.",
             "vision_model.encoder.layers.": "visual.transformer.resblocks."}
HF_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def openai_layout_of_hf(sd):
    """A Hugging Face CLIPModel state dict -> the same tensors under OpenAI's keys: q, k, v
    projections concatenated into in_proj (in that order), the two projections transposed
    (nn.Linear stores [out, in]; OpenAI's parameters are [in, out]). A key it does not know is one
    line naming it."""
    out, qkv = {}, {}
    for k, v in sd.items():
        if k in HF_IGNORED:
            continue
        if k in HF_RENAME:
            out[HF_RENAME[k]] = v
        elif k in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if k.startswith("visual") else "text_projection"] = v.t()
        elif tower := next((t for t in HF_TOWERS if k.startswith(t)), None):
            i, rest = k[len(tower):].split(".", 1)
            prefix = f"{HF_TOWERS[tower]}{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                qkv.setdefault((prefix, kind), {})[proj] = v
                continue
            part = next((p for p in HF_BLOCK if rest.startswith(p + ".")), None)
            if part is None:
                raise CLIPError(f"Hugging Face key {k} {tuple(v.shape)} has no place in CLIP's layout (not a "
                                f"CLIPModel, or a variant this code does not read)")
            out[prefix + HF_BLOCK[part] + rest[len(part):]] = v
        else:
            raise CLIPError(f"Hugging Face key {k} {tuple(v.shape)} has no place in CLIP's layout (not a CLIPModel, "
                            f"or a variant this code does not read)")
    for (prefix, kind), p in qkv.items():
        if set(p) != {"q_proj", "k_proj", "v_proj"}:
            missing = sorted({"q_proj", "k_proj", "v_proj"} - set(p))
            raise CLIPError(f"{prefix}: the Hugging Face attention lacks {missing}")
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([p["q_proj"], p["k_proj"], p["v_proj"]])
    return out


def hf_folder(name):
    """A Hugging Face CLIPModel folder: a path, or hf:ORG/NAME -> its snapshot in the hub cache."""
    if name.startswith("hf:"):
        repo = name[3:]
        snaps = [s for s in hub_snapshots(repo) if (s / "config.json").is_file()]
        if not snaps:
            raise CLIPError(f"{name} is not in the Hugging Face cache: expected {hf_hub_cache()}/models--"
                            f"{repo.replace('/', '--')}/snapshots/<rev>/config.json (nothing is downloaded here: "
                            f"fetch it with huggingface_hub, or give the folder's path)")
        return snaps[0]
    return Path(name)


def hf_weights(folder):
    for f in ("model.safetensors", "pytorch_model.bin"):
        if (folder / f).is_file():
            return folder / f
    raise CLIPError(f"{folder} has a config.json but neither model.safetensors nor pytorch_model.bin (a sharded "
                    f"checkpoint is not read here: save it unsharded)")


def hf_settings(folder):
    """(activation, CLIPConfig fields) from a CLIPModel folder's config.json and, where present,
    preprocessor_config.json; a missing field takes transformers' default for CLIP."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
        pre = json.loads((folder / "preprocessor_config.json").read_text()) \
            if (folder / "preprocessor_config.json").is_file() else {}
    except (OSError, ValueError) as e:
        raise CLIPError(f"{folder}: unreadable config ({type(e).__name__}: {str(e)[:60]})") from None
    if cfg.get("model_type", "clip") != "clip":
        raise CLIPError(f"{folder} holds a {cfg.get('model_type')!r} model, not a CLIPModel ('clip')")
    text, vision = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) > 1 or not acts <= set(clip_model.ACTIVATIONS):
        raise CLIPError(f"{folder}: activations {sorted(acts)} (text, vision); this CLIP runs one of "
                        f"{', '.join(clip_model.ACTIVATIONS)} in both towers")
    for tower, c, width in (("text", text, 512), ("vision", vision, 768)):
        if c.get("intermediate_size", 4 * c.get("hidden_size", width)) != 4 * c.get("hidden_size", width) or \
                c.get("layer_norm_eps", 1e-5) != 1e-5:
            raise CLIPError(f"{folder}: the {tower} tower's MLP is not 4 x its width or its LayerNorm eps is not "
                            f"1e-5; this CLIP has both")
    known = {"transformer_heads": text.get("num_attention_heads", 8),
             "vision_heads": vision.get("num_attention_heads", 12)}
    crop, size = pre.get("crop_size", vision.get("image_size", 224)), pre.get("size", vision.get("image_size", 224))
    crop = crop.get("height", crop) if isinstance(crop, dict) else crop
    size = size.get("shortest_edge", size) if isinstance(size, dict) else size
    if pre and (size != crop or pre.get("resample", 3) != 3 or pre.get("do_center_crop", True) is False):
        raise CLIPError(f"{folder}/preprocessor_config.json resizes other than CLIP's test transform (bicubic to "
                        f"the crop size, centre crop): size {size}, crop {crop}, resample {pre.get('resample')}")
    known.update(image_mean=tuple(pre.get("image_mean", clip_model.CLIP_MEAN)),
                 image_std=tuple(pre.get("image_std", clip_model.CLIP_STD)))
    return acts.pop(), known, crop


# -----------------------------------------------------------------------------
# What a name means, then the model


@dataclass(frozen=True)
class Backbone:
    """A --clip value resolved without reading its weights: where they are, in which layout, and
    what the tensors do not reveal."""
    name: str  # as given
    path: Path | None  # the weights file (or a Hugging Face folder); None: an OpenAI release to fetch
    layout: str  # "openai" (OpenAI's and open_clip's keys) or "hf"
    act: str
    known: dict = field(default_factory=dict)  # CLIPConfig fields the name or config gives
    resolution: int | None = None  # the image size the name promises (checked against the weights)
    release: str | None = None  # an OpenAI release: downloaded into the cache on first load

    def identity(self):
        """As a run's config records it: the name, the weights' sha256 and the activation."""
        if self.release:  # its file's sha256 is checked whenever it is loaded
            return self.release
        weights = hf_weights(self.path) if self.layout == "hf" else self.path
        return f"{self.name} sha256:{sha256_of(weights)[:16]} {self.act}"


def describe(name, act=None, cache_dir=None):
    """What a --clip value means (see the module's table of forms), checked in one line before any
    weights are read. `act` ("quick_gelu" or "gelu"): the activation of a file whose name does not
    give it; where the name does, a different `act` is refused."""
    if act is not None and act not in clip_model.ACTIVATIONS:
        raise CLIPError(f"unknown activation {act!r}: use one of {', '.join(clip_model.ACTIVATIONS)}")

    def agreed(own, what):
        if act is not None and act != own:
            raise CLIPError(f"{name} is {what} {own}, not {act}: drop the activation you gave")
        return own
    if name in CHECKPOINTS:
        return Backbone(name, None, "openai", agreed("quick_gelu", "OpenAI's release, trained with"), release=name)
    if name.startswith("open_clip:"):
        model, _, file = name[len("open_clip:"):].partition("=")
        arch, _, tag = model.partition("/")
        if not tag and not file:
            raise CLIPError(f"{name}: give a tag (open_clip:{arch}/TAG) or a file (open_clip:{arch}=FILE)")
        own, known, resolution = open_clip_settings(arch, tag)
        what = f"open_clip's {arch}/{tag}, trained with" if tag else f"open_clip's {arch} architecture, built with"
        if file and not Path(file).is_file():
            raise CLIPError(f"{name}: no file {file}")
        path = Path(file) if file else open_clip_file(f"{arch.removesuffix('-quickgelu')}/{tag}", cache_dir)
        return Backbone(name, path, "openai", agreed(own, what), known, resolution)
    if name.startswith("hf:") or Path(name).is_dir():
        folder = hf_folder(name)
        if not (folder / "config.json").is_file():
            raise CLIPError(f"{folder} is a folder without config.json: give a Hugging Face CLIPModel folder, or a "
                            f"checkpoint file")
        hf_weights(folder)
        own, known, resolution = hf_settings(folder)
        return Backbone(name, folder, "hf", agreed(own, "a Hugging Face CLIPModel whose config.json says"),
                        known, resolution)
    if Path(name).is_file():
        release = RELEASE_OF_SHA.get(sha256_of(name))
        if release:
            return Backbone(name, Path(name), "openai", agreed("quick_gelu", f"OpenAI's {release}, trained with"))
        if act is None:
            raise CLIPError(f"{name} does not say whether its CLIP runs QuickGELU (OpenAI, MetaCLIP, DFN weights) "
                            f"or GELU (open_clip's LAION / DataComp weights), and the features differ: give "
                            f"--clip-act quick_gelu or gelu, or name it as open_clip:ARCH/TAG={name}")
        return Backbone(name, Path(name), "openai", act)
    raise CLIPError(f"unknown model {name!r}: give one of {', '.join(CHECKPOINTS)}, open_clip:ARCH/TAG, a Hugging Face "
                    f"CLIPModel folder or hf:ORG/NAME, or a checkpoint file")


def state_dict_of(b, cache_dir=None, url=None):
    """A Backbone's tensors under OpenAI's keys (an OpenAI release is fetched into the cache)."""
    if b.layout == "hf":
        return openai_layout_of_hf(read_state_dict(hf_weights(b.path)))
    sd = read_state_dict(b.path or checkpoint_path(b.release, cache_dir, url))
    if sd and not any(k.startswith(("visual.", "transformer.")) for k in sd):
        k = next(iter(sd))
        raise CLIPError(f"{b.path}: key {k} {tuple(getattr(sd[k], 'shape', ()))} fits no CLIP layout read here "
                        f"(OpenAI / open_clip keys; a Hugging Face CLIPModel is read from its folder)")
    return sd


def load(name, device="cpu", act=None, cache_dir=None, url=None):
    """(model, preprocess) for a --clip value or a Backbone: the CLIP in eval mode with fp32
    parameters, and the test transform its weights were trained with."""
    b = name if isinstance(name, Backbone) else describe(name, act, cache_dir)
    model = clip_model.build_model(state_dict_of(b, cache_dir, url), device, act=b.act, **b.known)
    if b.resolution is not None and model.visual.resolution != b.resolution:
        raise CLIPError(f"{b.name}: the weights are for {model.visual.resolution}px images, the name promises "
                        f"{b.resolution}px: a file of another model?")
    return model, clip_model.preprocess_of(model.visual)
