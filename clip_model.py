"""
Our own CLIP (Radford et al., 2021), written to be read in one sitting.

- Image towers: ModifiedResNet (RN50, RN101, RN50x4/x16/x64) and ViT (B/32, B/16, L/14,
  L/14@336px); causal text tower. Every size is inferred from a state dict, so any OpenAI
  checkpoint loads unchanged and strictly.
- The two hooks CoFT needs:
  * `encode_text(tokens, embeddings=...)` takes token *embeddings* (learnable contexts placed
    before each class name, CoOp style) and runs only up to the longest EOT in the batch;
  * `encode_image(images, vpt=...)` takes visual prompt tokens (VPT shallow or deep).
- Byte-level BPE tokenizer on the vendored `assets/bpe_simple_vocab_16e6.txt.gz`.
- `load(name_or_path)`: TorchScript archives and plain state dicts, SHA256 check, resumable
  download into a cache, one clear line when there is no network.

Parameters are always fp32 (the checkpoints store fp16 matrices; fine-tuning fp16 master
weights diverges); use autocast for speed. Attention goes through
F.scaled_dot_product_attention. `python clip_model.py --bench` times the towers.
"""
import gzip
import hashlib
import html
import math
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections import OrderedDict
from dataclasses import dataclass, asdict
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parent / "assets"


class CLIPError(Exception):
    """A user-facing error: its message is one line saying what was wrong and what to do."""


# -----------------------------------------------------------------------------
# Building blocks

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the OpenAI weights were trained with (plain GELU
    silently costs accuracy)."""
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (under fp16 autocast the statistics would lose precision)."""
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).type_as(x)


class MultiheadAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names (so the checkpoint keys
    `attn.in_proj_weight`, `attn.out_proj.weight`, ... load as they are), batch-first, and the
    product itself through F.scaled_dot_product_attention (flash / memory-efficient kernels)."""
    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} not divisible by {heads} heads"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):
        B, L, W = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(B, L, self.heads, W // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, H, L, W/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, L, W)  # [B, L, W]
        return self.out_proj(y)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
    def __init__(self, width, heads):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.grad_checkpointing = False  # trade compute for memory (ViT-L/14 fine-tuning)

    def run_block(self, i, x, causal):
        block = self.resblocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled():  # also for a frozen tower that passes gradients to prompts
            return torch.utils.checkpoint.checkpoint(block, x, causal, use_reentrant=False)
        return block(x, causal)

    def forward(self, x, causal=False):
        for i in range(self.layers):
            x = self.run_block(i, x, causal)
        return x


# -----------------------------------------------------------------------------
# Image towers

class VisionTransformer(nn.Module):
    """ViT image tower with visual prompt tuning (VPT, Jia et al. 2022).

    Token order inside the transformer: [CLS, P prompt tokens, patches]. Prompts are inserted
    after ln_pre (they are free parameters, so there is nothing to normalise) and carry no
    positional embedding. VPT-shallow inserts one set before block 0; VPT-deep replaces the
    previous block's prompt outputs with a fresh set before every block 0..D-1. The image
    feature is still read at CLS, so with P = 0 the tower is exactly the plain ViT.
    """
    def __init__(self, resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.resolution, self.patch_size = resolution, patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x, vpt=None):
        """x: [B, 3, R, R]; vpt: None or [D, P, width] prompt tokens (D = 1: shallow, D > 1: deep,
        D <= layers). Returns the projected CLS feature [B, output_dim]."""
        x = self.conv1(x)  # [B, width, R/p, R/p]
        x = x.flatten(2).transpose(1, 2)  # [B, N, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, width]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+N, width]
        x = self.ln_pre(x)
        P = 0 if vpt is None else vpt.shape[1]
        for i in range(self.transformer.layers):
            if P and i < vpt.shape[0]:
                prompts = vpt[i].to(x.dtype).expand(x.shape[0], -1, -1)  # [B, P, width]
                rest = x[:, 1:] if i == 0 else x[:, 1 + P:]  # drop the previous block's prompts
                x = torch.cat([x[:, :1], prompts, rest], dim=1)  # [B, 1+P+N, width]
            x = self.transformer.run_block(i, x, False)
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    """ResNet bottleneck with CLIP's anti-aliased stride: an avgpool after the 3x3 conv does the
    downsampling (all convs have stride 1), and the shortcut avgpools before its 1x1 conv."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            # the key names "-1", "0", "1" are the checkpoint's
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4)),
            ]))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's ResNet head: one attention query (the mean of the final grid, plus its positional
    embedding) attends over the grid; the output is that query's result, projected."""
    def __init__(self, spatial, embed_dim, heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1+HW, C]
        x = x + self.positional_embedding.to(x.dtype)
        B, L, C = x.shape
        H = self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, H, C // H).transpose(1, 2)  # [B, H, 1, C/H]
        k = self.k_proj(x).view(B, L, H, C // H).transpose(1, 2)  # [B, H, L, C/H]
        v = self.v_proj(x).view(B, L, H, C // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C)  # [B, C]
        return self.c_proj(y)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem + avgpool, anti-aliased bottleneck stages, attention pooling."""
    def __init__(self, layers, output_dim, heads, resolution, width):
        super().__init__()
        self.resolution = resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            blocks = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            blocks += [Bottleneck(planes * 4, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes * 4
        self.attnpool = AttentionPool2d(resolution // 32, width * 32, heads, output_dim)

    def forward(self, x, vpt=None):
        if vpt is not None and vpt.shape[1] > 0:
            raise CLIPError("visual prompt tokens need a ViT backbone; ResNets take no VPT")
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 32*width, R/32, R/32]
        return self.attnpool(x)


# -----------------------------------------------------------------------------
# CLIP

@dataclass
class CLIPConfig:
    embed_dim: int
    image_resolution: int
    vision_layers: object  # int (ViT) or tuple of 4 ints (ResNet)
    vision_width: int
    vision_patch_size: object  # int (ViT) or None (ResNet)
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12

    @property
    def is_vit(self):
        return self.vision_patch_size is not None


# Sizes of the public models, for random-weight benchmarks (checkpoints carry their own).
CONFIGS = {
    "RN50": CLIPConfig(1024, 224, (3, 4, 6, 3), 64, None),
    "RN101": CLIPConfig(512, 224, (3, 4, 23, 3), 64, None),
    "ViT-B/32": CLIPConfig(512, 224, 12, 768, 32),
    "ViT-B/16": CLIPConfig(512, 224, 12, 768, 16),
    "ViT-L/14": CLIPConfig(768, 224, 24, 1024, 14, transformer_width=768, transformer_heads=12),
    # The offline demo's stand-in, pretrained by us on rendered digits (see `standin`).
    "demo": CLIPConfig(128, 32, 4, 128, 8, context_length=24, transformer_width=128, transformer_heads=2,
                       transformer_layers=3),
    # Tiny models with the real key layout for tests (32x32 images).
    "tiny-vit": CLIPConfig(64, 32, 2, 64, 8, context_length=16, vocab_size=49408,
                           transformer_width=64, transformer_heads=1, transformer_layers=2),
    "tiny-rn": CLIPConfig(64, 32, (1, 1, 1, 1), 8, None, context_length=16, vocab_size=49408,
                          transformer_width=64, transformer_heads=1, transformer_layers=2),
}


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.is_vit:
            self.visual = VisionTransformer(cfg.image_resolution, cfg.vision_patch_size, cfg.vision_width,
                                            cfg.vision_layers, cfg.vision_width // 64 or 1, cfg.embed_dim)
        else:
            self.visual = ModifiedResNet(cfg.vision_layers, cfg.embed_dim, cfg.vision_width * 32 // 64,
                                         cfg.image_resolution, cfg.vision_width)
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers, cfg.transformer_heads)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_weights()

    def init_weights(self):
        """CLIP's initialisation (matters only when training from scratch, e.g. the demo's
        stand-in): small embeddings, depth-scaled residual projections."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, getattr(self.visual, "transformer", None)):
            if tower is None:
                continue
            proj_std = tower.width ** -0.5 * (2 * tower.layers) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=tower.width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * tower.width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=pool.c_proj.in_features ** -0.5)
            for name, p in self.visual.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(p)  # each residual branch starts as identity

    @property
    def context_length(self):
        return self.positional_embedding.shape[0]

    def encode_image(self, images, vpt=None):
        """images: [B, 3, R, R] normalised; vpt: optional [D, P, width] visual prompts (ViT)."""
        return self.visual(images.to(self.visual.conv1.weight.dtype), vpt)

    def encode_text(self, tokens, embeddings=None, full_length=False):
        """tokens: [N, L] ids (EOT = the largest id, found by argmax). embeddings: optional
        [N, L, width] input embeddings to use instead of looking the ids up (learnable prompt
        contexts); the ids then only locate the EOT. Because attention is causal, positions after
        the last EOT cannot reach any EOT feature, so we run only the first max(EOT)+1 positions:
        exactly the full-length result, for less work (`full_length=True` runs all L, for
        benchmarks). Returns [N, embed_dim]."""
        eot = tokens.argmax(dim=-1)  # [N]
        L = tokens.shape[1] if full_length else int(eot.max()) + 1
        x = self.token_embedding(tokens[:, :L]) if embeddings is None else embeddings[:, :L]
        x = x + self.positional_embedding[:L].to(x.dtype)  # [N, L, width]
        x = self.ln_final(self.transformer(x, causal=True))
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # [N, width]
        return x @ self.text_projection

    def forward(self, images, tokens):
        """Image-text logits [B, N], as CLIP was trained: scaled cosine similarities."""
        v = F.normalize(self.encode_image(images), dim=-1)
        t = F.normalize(self.encode_text(tokens), dim=-1)
        return self.logit_scale.exp() * v @ t.t()


# -----------------------------------------------------------------------------
# From a state dict

JIT_LEFTOVERS = ("input_resolution", "context_length", "vocab_size")


def config_from_state_dict(sd):
    """Infer every size from the tensors' shapes (see ../shared/spec/clip-and-data.md)."""
    def n_blocks(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    try:
        if "visual.proj" in sd:
            conv = sd["visual.conv1.weight"]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = dict(vision_width=conv.shape[0], vision_patch_size=conv.shape[-1],
                          vision_layers=n_blocks("visual.transformer.resblocks."),
                          image_resolution=conv.shape[-1] * grid)
        else:
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = dict(vision_width=sd["visual.layer1.0.conv1.weight"].shape[0], vision_patch_size=None,
                          vision_layers=tuple(n_blocks(f"visual.layer{i}.") for i in range(1, 5)),
                          image_resolution=32 * grid)
        width = sd["ln_final.weight"].shape[0]
        return CLIPConfig(embed_dim=sd["text_projection"].shape[1], context_length=sd["positional_embedding"].shape[0],
                          vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=width,
                          transformer_heads=max(width // 64, 1), transformer_layers=n_blocks("transformer.resblocks."),
                          **vision)
    except (KeyError, IndexError, AttributeError) as e:
        raise CLIPError(f"not a CLIP state dict ({type(e).__name__} {e}); pass an OpenAI CLIP checkpoint "
                        f"or a state dict saved from clip_model.CLIP") from None


def build_model(sd, device="cpu"):
    """A CLIP built from a state dict alone and loaded strictly, with fp32 parameters."""
    sd = {k: v for k, v in sd.items() if k not in JIT_LEFTOVERS}
    cfg = config_from_state_dict(sd)
    model = CLIP(cfg)
    own = model.state_dict()
    wrong = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:  # a damaged or edited checkpoint: the shapes contradict the ones inferred from it
        k = wrong[0]
        raise CLIPError(f"state dict tensor {k} has shape {tuple(sd[k].shape)}, but the model inferred from the others "
                        f"needs {tuple(own[k].shape)} ({len(wrong)} such tensor(s)): the checkpoint is damaged or "
                        f"not an OpenAI-layout CLIP")
    missing, unexpected = model.load_state_dict(sd, strict=False)  # fp16 values are cast into fp32 params
    if missing or unexpected:
        raise CLIPError(f"state dict does not match the inferred {cfg}: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval()


def tiny_clip(name="tiny-vit", seed=0, **overrides):
    """A freshly initialised tiny CLIP (real key layout) for tests and the offline demo."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(**{**asdict(CONFIGS[name]), **overrides})
    return CLIP(cfg)


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE (Sennrich et al. 2016 with GPT-2's byte alphabet)

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


@lru_cache()
def byte_alphabet():
    """Map each of the 256 bytes to a printable unicode character, so BPE works on strings:
    printable Latin-1 bytes map to themselves, the rest to code points from 256 upward."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in keep]
    # insertion order matters: the vocabulary lists the printable bytes first, then the rest
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return table


class Tokenizer:
    """CLIP's tokenizer: clean text (ftfy, HTML unescape, collapse whitespace, lower case), split
    it into words with a unicode-aware pattern, then apply the BPE merges within each word; the
    last symbol of a word carries the end-of-word mark `</w>`."""
    def __init__(self, bpe_path=ASSETS / "bpe_simple_vocab_16e6.txt.gz"):
        import regex
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # first 48,894 merges
        symbols = list(byte_alphabet().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.rank = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = byte_alphabet()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
        self.pattern = regex.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE)
        self.cache = {SOT: [SOT], EOT: [EOT]}

    @staticmethod
    def clean(text):
        import ftfy
        text = html.unescape(html.unescape(ftfy.fix_text(text)))  # twice: doubly-escaped web text
        return " ".join(text.split()).lower()

    def bpe(self, word):
        """Merge the best-ranked adjacent pair until none of the remaining pairs is a merge."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best, i = min((self.rank.get(p, math.inf), i) for i, p in enumerate(zip(parts, parts[1:])))
            if best == math.inf:
                break
            a, b = parts[i], parts[i + 1]  # the first occurrence of the best-ranked pair
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of (a, b), left to right
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text):
        ids = []
        for word in self.pattern.findall(self.clean(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self.bpe(word))
        return ids

    def decode(self, ids):
        ids = list(ids)
        ids = ids[:ids.index(self.eot)] if self.eot in ids else ids  # drop EOT and the zero padding
        text = "".join(self.decoder[i] for i in ids if i != self.sot)
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def __call__(self, texts, context_length=77, truncate=False):
        """texts: str or list of str -> LongTensor [N, context_length]: SOT, BPE ids, EOT, zeros."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > context_length:
                if not truncate:
                    raise CLIPError(f"text is {len(ids)} tokens, longer than the context of {context_length}: "
                                    f"shorten it or pass truncate=True ({text[:40]!r}...)")
                ids = ids[:context_length - 1] + [self.eot]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


@lru_cache()
def tokenizer():
    return Tokenizer()


def tokenize(texts, context_length=77, truncate=False):
    return tokenizer()(texts, context_length, truncate)


# -----------------------------------------------------------------------------
# Checkpoints: names, download, loading

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


def default_cache_dir():
    return Path(os.environ.get("CLIP_CACHE", Path.home() / ".cache" / "clip"))


def sha256_of(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    """Local path of a known checkpoint: the cached file (hash verified), else downloaded."""
    file, sha = CHECKPOINTS[name]
    path = Path(cache_dir or default_cache_dir()) / file
    if path.exists():
        if sha256_of(path) != sha:
            raise CLIPError(f"{path} does not have the sha256 of {name} ({sha}): delete it and run again")
        return path
    return download(url or URL.format(sha=sha, file=file), path, sha)


def read_state_dict(path):
    """A TorchScript archive (OpenAI's release format) or a plain state dict file."""
    path = Path(path)
    if not path.is_file():
        raise CLIPError(f"no checkpoint at {path}: give one of {', '.join(CHECKPOINTS)} or a file path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    except (RuntimeError, ValueError):
        pass  # not TorchScript
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIPError(f"{path} is neither a TorchScript archive nor a state dict ({type(e).__name__}); "
                        f"is the file complete?") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CLIPError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def load(name_or_path, device="cpu", cache_dir=None, url=None):
    """(model, preprocess) from a model name (RN50 ... ViT-L/14@336px, or "demo" for the offline
    stand-in) or a checkpoint path. The model is in eval mode with fp32 parameters; preprocess is
    CLIP's test transform."""
    if name_or_path == "demo":
        path = standin(cache_dir=cache_dir)
    elif name_or_path in CHECKPOINTS:
        path = checkpoint_path(name_or_path, cache_dir, url)
    elif Path(name_or_path).exists():
        path = Path(name_or_path)
    else:
        raise CLIPError(f"unknown model {name_or_path!r}: give one of {', '.join(CHECKPOINTS)} or a checkpoint path")
    model = build_model(read_state_dict(path), device)
    return model, transform(model.visual.resolution)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def transform(resolution):
    """CLIP's test transform: bicubic resize of the short side, center crop, RGB, normalise."""
    from torchvision import transforms as T
    return T.Compose([
        T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(resolution),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


# -----------------------------------------------------------------------------
# The offline stand-in: a tiny CLIP pretrained by us on rendered, captioned digits

STANDIN = dict(config="demo", steps=400, batch=256, lr=1e-3, weight_decay=0.1, warmup=40, seed=0, version=1)


def clip_loss(v, t, logit_scale, labels):
    """CLIP's symmetric contrastive loss where every caption of the same digit counts as a match:
    soft targets spread evenly over the batch's same-label pairs (the diagonal included)."""
    logits = logit_scale * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()  # [B, B]
    match = (labels[:, None] == labels[None, :]).float()
    target = match / match.sum(1, keepdim=True)  # symmetric label structure: rows and columns alike
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def pretrain(model, steps, batch, lr, weight_decay, warmup, seed, log_every=50, **_):
    """Contrastive pretraining on the rendered digits of data.py (AdamW, warm-up + cosine).
    Returns the loss history."""
    import data
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    model.train()
    history, t0 = [], time.time()
    for step, (images, labels, captions) in enumerate(data.rendered_batches(batch, steps, seed, model.visual.resolution)):
        tokens = tokenize(captions, model.context_length, truncate=True)
        loss = clip_loss(model.encode_image((images - mean) / std), model.encode_text(tokens),
                         model.logit_scale.exp(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        history.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            el = time.time() - t0
            print(f"  pretrain step {step + 1}/{steps} loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{(step + 1) * batch / el:.0f} img/s eta {el / (step + 1) * (steps - step - 1):.0f}s", flush=True)
    return history


def standin_path(cache_dir=None, settings=None):
    """Where the stand-in pretrained with `settings` is cached: the file name carries a hash of
    the settings and the architecture, so changing either retrains (bump STANDIN["version"] when
    the rendered data changes)."""
    settings = {**STANDIN, **(settings or {})}
    key = hashlib.sha256(repr((sorted(settings.items()), asdict(CONFIGS[settings["config"]]))).encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / f"standin-{key}.pt"


def standin(cache_dir=None, rebuild=False, settings=None):
    """Path of the stand-in's checkpoint (a plain state dict), pretraining it first if it is not
    in the cache (standin_path)."""
    path = standin_path(cache_dir, settings)
    settings = {**STANDIN, **(settings or {})}
    if path.exists() and not rebuild:
        return path
    print(f"pretraining the offline stand-in CLIP on rendered digits ({settings['steps']} steps of "
          f"{settings['batch']}; cached at {path})", flush=True)
    model = tiny_clip(settings["config"], seed=settings["seed"])
    t0 = time.time()
    pretrain(model, **settings)
    print(f"  pretraining took {time.time() - t0:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(model.state_dict(), path)
    return path


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a kill mid-write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Benchmark: python clip_model.py --bench

def time_per_call(fn, steps, device):
    """(seconds per call of fn after one warm-up call, peak memory in MiB): the GPU allocator's
    peak over the timed calls on CUDA, the process's peak resident memory on CPU."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()  # warm-up (and compilation, with torch.compile)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    if cuda:
        mem = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        import resource
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return (time.perf_counter() - t0) / steps, mem


def bench(names=("ViT-B/16", "RN50"), batch=32, prompts=256, steps=3, device=None):
    """Time encode_image and encode_text forward+backward on random weights of real size."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    amp = dict(device_type="cuda", dtype=torch.bfloat16) if device == "cuda" else dict(device_type="cpu", enabled=False)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'bf16 autocast' if device == 'cuda' else 'fp32'}")
    timeit = lambda fn: time_per_call(fn, steps, torch.device(device))[0]  # noqa: E731

    texts = [f"a photo of a {w}." for w in ("cat", "dog", "airplane", "red car")] * (prompts // 4)
    for name in names:
        model = CLIP(CONFIGS[name]).to(device).train()
        tok = tokenize(texts, model.context_length)
        R = model.visual.resolution
        images = torch.randn(batch, 3, R, R, device=device)

        def image_step():
            with torch.autocast(**amp):
                loss = model.encode_image(images).float().pow(2).mean()
            loss.backward()

        def text_step(t):
            with torch.autocast(**amp):
                loss = model.encode_text(t).float().pow(2).mean()
            loss.backward()

        ti = timeit(image_step)
        tt = timeit(lambda: text_step(tok.to(device)))
        # the same prompts with EOT moved to the last position: the cost of the full 77 tokens
        full = tok.clone()
        full[full == tokenizer().eot] = 0
        full[:, -1] = tokenizer().eot
        tf = timeit(lambda: text_step(full.to(device)))
        print(f"{name:9s} image fwd+bwd: {batch / ti:8.1f} images/s (batch {batch}) | text fwd+bwd: "
              f"{prompts / tt:8.1f} prompts/s up to EOT, {prompts / tf:8.1f} prompts/s at 77 tokens")
        model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="CLIP: benchmark the towers, or build the offline stand-in")
    p.add_argument("--bench", action="store_true", help="time the towers (random weights of real size)")
    p.add_argument("--models", default="ViT-B/16,RN50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--standin", action="store_true", help="pretrain (or find in the cache) the offline stand-in")
    p.add_argument("--rebuild", action="store_true", help="with --standin: pretrain again even if cached")
    args = p.parse_args()
    if args.bench:
        bench(args.models.split(","), args.batch, args.prompts, args.steps, args.device)
    elif args.standin:
        print(f"stand-in checkpoint: {standin(rebuild=args.rebuild)}")
    else:
        p.print_help()
