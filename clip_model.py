"""
Our own CLIP (Radford et al., 2021), written to be read in one sitting. It imports nothing from
the project: data.py and the methods build on it, never the other way round.

- Image towers: ModifiedResNet (RN50, RN101, RN50x4/x16/x64) and ViT (B/32, B/16, L/14,
  L/14@336px); causal text tower. Every size is inferred from a state dict, so any OpenAI
  checkpoint loads unchanged and strictly.
- OpenAI's module layout (`token_embedding`, `transformer.resblocks`, `ln_final`,
  `text_projection`, `visual.conv1`, ...), with open_clip's conventions where OpenAI's code has
  none (`batch_first` towers, the text tower's causal `attn_mask` beside its blocks, the towers'
  `output_dim`): the methods' modules read a CLIP through that layout, so they run on OpenAI's
  `clip` package and on open_clip's CLIP too. What CoFT's prompts and VPT do with it is coft.py's.
- Two fast paths prompt methods use (CraFT's black box wraps them; CoFT takes the second where a
  model has it):
  * `encode_text(tokens, embeddings=...)` takes token *embeddings* (learnable contexts placed
    before each class name, CoOp style) and runs only up to the longest EOT in the batch;
  * `encode_text_shared(prefix, suffix_tokens)` encodes every (context, class) pair computing each
    context's prefix once (exact, by causality).
- Byte-level BPE tokenizer on the vendored `assets/bpe_simple_vocab_16e6.txt.gz`.
- `build_model(state_dict, act=...)`: a CLIP from OpenAI-layout tensors, given what they do not
  reveal (the MLP activation, ...). Finding and reading checkpoints (OpenAI's releases, open_clip's
  and Hugging Face's weights) is checkpoints.py's job; the offline stand-in, `--clip demo`, is
  standin.py's.
- `preprocess(resolution)`: CLIP's test transform; the zero-shot head: `class_prompts`,
  `text_classifier`, `zero_shot_logits`, with every similarity in fp32 (`similarity`).

Parameters are always fp32 (the checkpoints store fp16 matrices; fine-tuning fp16 master
weights diverges); use autocast for speed. Attention goes through
F.scaled_dot_product_attention. `python bench.py --towers` times the towers.
"""
import copy
import gzip
import html
import math
from collections import OrderedDict
from dataclasses import dataclass, asdict, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

ASSETS = Path(__file__).resolve().parent / "assets"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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

    def forward(self, x, causal=False, attn_mask=None):
        """x [B, L, W]; causal, or an additive attn_mask [L, L] (open_clip's form of the causal mask)."""
        B, L, W = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(B, L, self.heads, W // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, H, L, W/H]
        mask = None if attn_mask is None else attn_mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, L, W)  # [B, L, W]
        return self.out_proj(y)

    def forward_shared(self, xp, xs):
        """Causal attention over P prompts of C suffixes sharing P prefixes (CLIP.encode_text_shared).
        xp: [P, Lp, W] prefix positions, xs: [P, C, Ls, W] suffix positions -> (yp, ys), same shapes.
        The prefix attends causally to itself; suffix position j attends to all Lp prefix keys of its
        context and to its own class's suffix positions 0..j."""
        (P, Lp, W), (C, Ls), H = xp.shape, xs.shape[1:3], self.heads
        qp, kp, vp = (t.view(P, Lp, H, W // H).transpose(1, 2)  # [P, H, Lp, W/H]
                      for t in F.linear(xp, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        qs, ks, vs = (t.reshape(P * C, Ls, H, W // H).transpose(1, 2)  # [P*C, H, Ls, W/H]
                      for t in F.linear(xs, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        yp = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)  # [P, H, Lp, W/H]
        # each class's keys/values: its context's prefix (broadcast over the C classes), then its own suffix
        k, v = (torch.cat([p[:, None].expand(P, C, H, Lp, W // H).reshape(P * C, H, Lp, W // H), s], dim=2)
                for p, s in ((kp, ks), (vp, vs)))  # [P*C, H, Lp+Ls, W/H]
        mask = torch.ones(Ls, Lp + Ls, dtype=torch.bool, device=xs.device).tril(Lp)  # [Ls, Lp+Ls]: prefix, then causal
        ys = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask)  # [P*C, H, Ls, W/H]
        yp = yp.transpose(1, 2).reshape(P, Lp, W)  # [P, Lp, W]
        ys = ys.transpose(1, 2).reshape(P, C, Ls, W)  # [P, C, Ls, W]
        return self.out_proj(yp), self.out_proj(ys)


ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}  # the weights do not say which: see CLIPConfig.act


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
    def __init__(self, width, heads, act="quick_gelu"):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", ACTIVATIONS[act]()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x, causal=False, attn_mask=None):
        x = x + self.attn(self.ln_1(x), causal=causal, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))

    def forward_shared(self, xp, xs):
        """The block on a shared prefix xp [P, Lp, W] and its suffixes xs [P, C, Ls, W] (causal)."""
        yp, ys = self.attn.forward_shared(self.ln_1(xp), self.ln_1(xs))
        xp, xs = xp + yp, xs + ys
        return xp + self.mlp(self.ln_2(xp)), xs + self.mlp(self.ln_2(xs))


class Transformer(nn.Module):
    batch_first = True  # [B, L, W], as open_clip's; OpenAI's towers run [L, B, W]

    def __init__(self, width, layers, heads, act="quick_gelu"):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, act) for _ in range(layers)])
        self.grad_checkpointing = False  # trade compute for memory (ViT-L/14 fine-tuning)

    def maybe_checkpoint(self, fn, *args):
        # also for a frozen tower that passes gradients on to the prompts
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x, causal=False, attn_mask=None):
        for block in self.resblocks:
            x = self.maybe_checkpoint(block, x, causal, attn_mask)
        return x

    def forward_shared(self, xp, xs):
        """Causal: a shared prefix xp [P, Lp, W] and its suffixes xs [P, C, Ls, W] -> both, transformed."""
        for block in self.resblocks:
            xp, xs = self.maybe_checkpoint(block.forward_shared, xp, xs)
        return xp, xs


# -----------------------------------------------------------------------------
# Image towers

class VisionTransformer(nn.Module):
    """ViT image tower: patches and a class token, the image feature read at the class token
    (CoFT's visual prompt tokens enter this layout block by block: coft.encode_image_with_prompts)."""
    def __init__(self, resolution, patch_size, width, layers, heads, output_dim, act="quick_gelu"):
        super().__init__()
        self.resolution, self.patch_size, self.output_dim = resolution, patch_size, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        """x: [B, 3, R, R] -> the projected CLS feature [B, output_dim]."""
        x = self.conv1(x)  # [B, width, R/p, R/p]
        x = x.flatten(2).transpose(1, 2)  # [B, N, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, width]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+N, width]
        x = self.transformer(self.ln_pre(x))
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
        self.resolution, self.output_dim = resolution, output_dim
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

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 32*width, R/32, R/32]
        return self.attnpool(x)


# -----------------------------------------------------------------------------
# CLIP

@dataclass
class CLIPConfig:
    """A CLIP's sizes (all inferred from a state dict: config_from_state_dict) and what its
    tensors do not reveal, which comes from the checkpoint's name or config (checkpoints.py):
    the MLP activation, a ViT's heads where its head width is not 64, the image normalisation and
    resizing the model was trained with."""
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
    act: str = "quick_gelu"  # OpenAI's and MetaCLIP's/DFN's; open_clip's LAION / DataComp weights: "gelu"
    vision_heads: int | None = None  # None: width // 64 (every OpenAI model; open_clip's ViT-H-14: 16)
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    resize_mode: str = "shortest"  # the test transform: "shortest" side then centre crop, or "squash"

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
    # open_clip's ViT-H-14 (LAION-2B): GELU, 16 heads of 80
    "ViT-H/14": CLIPConfig(1024, 224, 32, 1280, 14, transformer_width=1024, transformer_heads=16, transformer_layers=24,
                           act="gelu", vision_heads=16),
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
        if cfg.act not in ACTIVATIONS:
            raise CLIPError(f"unknown activation {cfg.act!r}: use one of {', '.join(ACTIVATIONS)}")
        if cfg.is_vit:
            self.visual = VisionTransformer(cfg.image_resolution, cfg.vision_patch_size, cfg.vision_width,
                                            cfg.vision_layers, cfg.vision_heads or cfg.vision_width // 64 or 1,
                                            cfg.embed_dim, cfg.act)
        else:
            self.visual = ModifiedResNet(cfg.vision_layers, cfg.embed_dim, cfg.vision_width * 32 // 64,
                                         cfg.image_resolution, cfg.vision_width)
        # the test transform the image tower expects (data.make_transform reads it from the tower)
        self.visual.image_mean, self.visual.image_std = tuple(cfg.image_mean), tuple(cfg.image_std)
        self.visual.resize_mode = cfg.resize_mode
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers, cfg.transformer_heads, cfg.act)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # the causal mask in open_clip's form, for code that runs the text tower's blocks itself over
        # the whole context (coft.encode_text_embeddings); encode_text runs causal attention directly
        L = cfg.context_length
        self.register_buffer("attn_mask", torch.full((L, L), float("-inf")).triu(1), persistent=False)
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

    def encode_image(self, images):
        """images: [B, 3, R, R] normalised -> [B, embed_dim]."""
        return self.visual(images.to(self.visual.conv1.weight.dtype))

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

    def encode_text_shared(self, prefix, suffix_tokens, suffix_embeddings=None):
        """encode_text of the P*C prompts [prefix_p, suffix_c] (every context with every class),
        computing each shared prefix once. prefix: [P, Lp, width] input embeddings of positions
        0..Lp-1 (SOT + learnable context); suffix_tokens: [C, Ls'] the ids at positions Lp.. (class
        name, ".", EOT, padding; EOT = the largest id); suffix_embeddings: optional [C, Ls', width]
        to use instead of looking the ids up. Returns [P, C, embed_dim].

        Exact: attention is causal, so at every layer a prefix position's hidden state depends only
        on the prefix, the same for all C classes. We run the P prefixes once and only the
        suffixes per class, each suffix position attending to its context's prefix keys/values (as
        a KV cache shared by the classes) and causally to its own suffix; as in encode_text, the
        suffixes stop at the longest EOT. Per layer that is P*Lp + P*C*Ls positions instead of
        P*C*(Lp+Ls): with CoOp's 16 context tokens and short class names, 3-4x fewer."""
        (P, Lp, W), C = prefix.shape, suffix_tokens.shape[0]
        eot = suffix_tokens.argmax(dim=-1)  # [C], positions within the suffix
        Ls = int(eot.max()) + 1
        if Lp + Ls > self.context_length:
            raise CLIPError(f"a prompt is {Lp + Ls} tokens ({Lp} prefix + {Ls} suffix up to its EOT), longer than "
                            f"the context of {self.context_length}")
        xs = self.token_embedding(suffix_tokens[:, :Ls]) if suffix_embeddings is None else suffix_embeddings[:, :Ls]
        xs = xs + self.positional_embedding[Lp:Lp + Ls].to(xs.dtype)  # [C, Ls, W]
        xp = prefix + self.positional_embedding[:Lp].to(prefix.dtype)  # [P, Lp, W]
        _, xs = self.transformer.forward_shared(xp, xs.to(xp.dtype).expand(P, C, Ls, W))  # [P, C, Ls, W]
        x = self.ln_final(xs[:, torch.arange(C, device=xs.device), eot])  # [P, C, W]
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
    """Infer every size from the tensors' shapes (the OpenAI state-dict layout)."""
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


def build_model(sd, device="cpu", *, act, **known):
    """A CLIP from a state dict in the OpenAI layout, loaded strictly, with fp32 parameters: every
    size from the tensors' shapes, and what they do not reveal from the caller: `act`
    ("quick_gelu" or "gelu", never assumed) and `known` CLIPConfig fields (vision_heads,
    image_mean, ...). checkpoints.load finds these for every checkpoint form it reads."""
    sd = {k: v for k, v in sd.items() if k not in JIT_LEFTOVERS}
    cfg = replace(config_from_state_dict(sd), act=act, **known)
    model = CLIP(cfg)
    own = model.state_dict()
    wrong = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:  # a damaged or edited checkpoint: the shapes contradict the ones inferred from it
        k = wrong[0]
        raise CLIPError(f"state dict tensor {k} has shape {tuple(sd[k].shape)}, but the model inferred from the others "
                        f"needs {tuple(own[k].shape)} ({len(wrong)} such tensor{'' if len(wrong) == 1 else 's'}): "
                        f"the checkpoint is damaged or not an OpenAI-layout CLIP")
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
# Preprocessing



def rgb(image):
    """A PIL image in RGB as a viewer shows it; tensors pass unchanged. Transparent pixels (RGBA,
    LA, PA, or a palette, grey or RGB image's transparency key) are laid over white, where
    Pillow's convert("RGB") would show whatever colour they hide; grey, palette, CMYK and the
    other 8-bit modes go through Pillow's conversion. A 16-bit or float image is refused: it needs
    scaling to 8 bits (read files with imagefiles.load_image, which does it)."""
    if not hasattr(image, "convert") or (image.mode == "RGB" and "transparency" not in image.info):
        return image
    if image.mode.startswith("I") or image.mode == "F":
        raise CLIPError(f"a PIL image in mode {image.mode} ({'float' if image.mode == 'F' else 'over 8 bits'}) is "
                        f"not scaled to 8 bits here: read image files with imagefiles.load_image(path), which "
                        f"scales them")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        from PIL import Image  # torchvision's dependency; only this step needs it
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")  # Pillow has no La -> RGBA
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(resolution, mean=CLIP_MEAN, std=CLIP_STD, resize_mode="shortest"):
    """CLIP's test transform: RGB, bicubic resize (antialiased) of the short side then a center
    crop ("shortest"), or of both sides ("squash", as some open_clip weights were evaluated),
    scale to [0, 1], normalise with the model's mean and std (OpenAI's by default). Takes PIL
    images and uint8 tensors [3, H, W] alike (torchvision.transforms.v2); the training
    augmentations are data.make_transform's."""
    bicubic = v2.InterpolationMode.BICUBIC
    resize = [v2.Resize(resolution, interpolation=bicubic, antialias=True), v2.CenterCrop(resolution)] \
        if resize_mode == "shortest" else [v2.Resize((resolution, resolution), interpolation=bicubic, antialias=True)]
    return v2.Compose([rgb, v2.ToImage(), *resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def preprocess_of(visual):
    """The test transform an image tower expects (its resolution, mean/std and resize mode)."""
    return preprocess(visual.resolution, visual.image_mean, visual.image_std, visual.resize_mode)


# -----------------------------------------------------------------------------
# The zero-shot head: similarities in fp32, class prompts -> text classifier


def unit(x):
    """Rows scaled to unit norm, in fp32 (features leave a bf16 tower in bf16)."""
    return F.normalize(x.float(), dim=-1)


def similarity(v, t):
    """v @ t.T in fp32, also under autocast. CLIP's logits are cosines times 1/tau ~= 100: in bf16
    a logit near 30 is off by up to 0.06-0.125 (its spacing), enough to flip an argmax or a top-K
    near a tie. The matrix product is tiny next to the towers, so it always runs in fp32."""
    with torch.autocast(v.device.type, enabled=False):
        return v.float() @ t.float().t()


def class_prompts(classnames, templates):
    """Per class, its name in every template: [[str]] (C lists); "_" in a name reads as a space."""
    return [[t.format(name.replace("_", " ")) for t in templates] for name in classnames]


@torch.no_grad()
def text_classifier(clip, prompts, device):
    """Zero-shot weights [C, D] from per-class prompt lists: the mean of each class's
    normalised prompt embeddings, renormalised (Radford et al. 2021, Sec. 3.1.4's prompt
    ensembling; one prompt = its plain normalised embedding)."""
    W = []
    for texts in prompts:
        tokens = tokenize(texts, clip.context_length, truncate=True).to(device)
        W.append(F.normalize(F.normalize(clip.encode_text(tokens).float(), dim=-1).mean(0), dim=0))
    return torch.stack(W)


def zero_shot_logits(clip, W, x, tau):
    """Zero-shot logits cos(v(x), t_k) / tau for images x [B, 3, R, R] and W [C, D] from
    text_classifier; fp32 even under autocast (see similarity)."""
    return similarity(unit(clip.encode_image(x)), W) / tau


# -----------------------------------------------------------------------------
# Fine-tuning the image tower as a classifier


class ImageClassifier(nn.Module):
    """A CLIP image tower fine-tuned as a classifier (VeCAF's fine-tuning; CoFT's Phase II adds its
    visual prompts: coft.Phase2Classifier): a fully trainable copy of the tower plus a linear head
    on its normalised projected embedding. With text_weights t [C, D] (rows: class text
    embeddings) the head is logit_scale * t, so step 0 reproduces the prompt classifier
    logit_scale * cos(v, t_k)."""

    def __init__(self, visual, num_classes, text_weights=None, logit_scale=100.0):
        super().__init__()
        self.visual = copy.deepcopy(visual).requires_grad_(True)  # a copy: a frozen backbone stays frozen
        self.head = nn.Linear(visual.output_dim, num_classes)
        if text_weights is not None:
            with torch.no_grad():
                self.head.weight.copy_(logit_scale * text_weights)
                self.head.bias.zero_()

    def features(self, x):
        return unit(self.visual(x))  # [B, D] fp32

    def forward(self, x):
        f = self.features(x)
        with torch.autocast(f.device.type, enabled=False):  # fp32 logits, see similarity()
            return self.head(f)
