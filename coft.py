"""
CoFT: Collaborative Fine-Tuning of CLIP without human labels.

Wang, Meng, Cai, Song, Xia, "Fine-tuning Pre-trained Vision-Language Models in a
Human-Annotation-Free Manner", arXiv 2602.04337 (2026). Where the paper is silent, our choices
are flags, listed in the README ("Differences from the paper") and in full in docs/choices.md.

    0. zero-shot pseudo-labels on the unlabelled train split (Eq. 1); top-K per class = S*
    1. Phase I (Sec. 3.1): two PEFT models (positive/negative prompts, Eq. 2-3, + VPT),
       differing only by seed, trained on S* with L1 + lambda * L2 (Eq. 4-6)
    2. Phase II (Sec. 3.2): model a labels everything, model b validates (s+ > s-); per branch
       the visual encoder + a linear head is fully fine-tuned on its clean set (Eq. 7);
       test = the ensemble of the two branches
    CoFT+ (Sec. 3.3): R rounds of Phase I, each relabelling with the previous round's models;
       momentum contrast on all unlabelled images in Phase II (Eq. 8-10); LLM-written prompts.

The file reads in that order, in three parts (docs/your-code.md):
  - the method, on any CLIP with OpenAI's module layout, needing torch alone: where prompts and
    VPT enter the towers, the modules and losses, the pseudo-label steps and the filter, Phase II;
  - the whole algorithm in one call, `adapt`, with a plain training loop `fit`, built from the
    steps the CLI shares:
        result = adapt(clip, tokenize, images, classnames, prompts, transforms, Settings())
  - the CLI's run of the same steps (one function per stage, the baselines beside them), which
    adds run folders, resume, torchrun, metrics, logs and your own images, and the CLI:
        python coft.py --dataset digits --clip demo --out runs/digits
        python coft.py --dataset dtd --data-root DATA --clip ViT-B/16 --out runs/dtd
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads exits quietly (130); from main on, runs.run_cli speaks
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import copy
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# CLIP as the method reads it: any model with OpenAI's module layout (this project's clip_model,
# OpenAI's clip package, open_clip's CLIP): token_embedding, positional_embedding, transformer
# (.resblocks), ln_final, text_projection; visual with conv1, class_embedding, positional_embedding,
# ln_pre, transformer, ln_post, proj (a ViT) and output_dim. Where the prompts enter the text tower
# and the visual prompts the image tower is the method's, written here over that layout.


def unit(x):
    """Rows scaled to unit norm, in fp32 (features leave a bf16 tower in bf16)."""
    return F.normalize(x.float(), dim=-1)


def similarity(v, t):
    """v @ t.T in fp32, also under autocast: logits of ~100 x a cosine lose an argmax or a top-K
    near a tie in bf16, and the product is tiny next to the towers."""
    with torch.autocast(v.device.type, enabled=False):
        return v.float() @ t.float().t()


def is_vit(visual):
    return hasattr(visual, "class_embedding")


def run_block(transformer, block, x, attn_mask=None):
    """One residual block of a tower on x [B, L, W]: OpenAI's blocks take [L, B, W] and hold their
    text mask themselves, open_clip's and clip_model's say batch_first and take it as attn_mask;
    recomputed in backward where the tower asks for it (grad_checkpointing)."""
    batch_first = getattr(transformer, "batch_first", False)

    def forward(x):
        x = x if batch_first else x.transpose(0, 1)
        x = block(x) if attn_mask is None else block(x, attn_mask=attn_mask)
        return x if batch_first else x.transpose(0, 1)
    if getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False)
    return forward(x)


def encode_text_embeddings(clip, x, eot):
    """The text tower on input embeddings x [N, L, width] over the whole context (OpenAI's blocks
    hold a mask of that length), read at positions eot [N] -> [N, D]."""
    x = x + clip.positional_embedding.to(x.dtype)
    mask = getattr(clip, "attn_mask", None)  # open_clip keeps the causal mask beside its blocks
    for block in clip.transformer.resblocks:
        x = run_block(clip.transformer, block, x, mask)
    x = clip.ln_final(x)[torch.arange(len(x), device=x.device), eot]  # [N, width]
    proj = clip.text_projection
    return proj(x) if isinstance(proj, nn.Module) else x @ proj


def encode_image_with_prompts(visual, x, vpt):
    """A ViT's image feature [B, D] of images x [B, 3, R, R] with visual prompt tokens vpt
    [depth, P, width] (VPT, Jia et al. 2022): the token order is [CLS, P prompts, patches];
    prompts enter after ln_pre (free parameters: nothing to normalise) with no positional
    embedding; VPT-shallow (depth 1) inserts one set before the first block, VPT-deep replaces
    the previous block's prompt outputs with a fresh set before each of the first `depth`
    blocks. The feature is still read at CLS, so with P = 0 this is the plain ViT."""
    x = visual.conv1(x.to(visual.conv1.weight.dtype))  # [B, width, R/p, R/p]
    x = x.flatten(2).transpose(1, 2)  # [B, N, width]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, width]
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # [B, 1+N, width]
    x = visual.ln_pre(x)
    P = vpt.shape[1]
    for i, block in enumerate(visual.transformer.resblocks):
        if P and i < len(vpt):
            prompts = vpt[i].to(x.dtype).expand(x.shape[0], -1, -1)  # [B, P, width]
            rest = x[:, 1:] if i == 0 else x[:, 1 + P:]  # drop the previous block's prompts
            x = torch.cat([x[:, :1], prompts, rest], dim=1)  # [B, 1+P+N, width]
        x = run_block(visual.transformer, block, x)
    return visual.ln_post(x[:, 0]) @ visual.proj


# -----------------------------------------------------------------------------
# Phase I modules: dual prompts, VPT, adapter


class PromptLearner(nn.Module):
    """CoOp-style learnable contexts, class token at the end (paper Eq. 2-3):
        positive  [V+_1 .. V+_M] [CLASS_k] .      negative  [V-_1 .. V-_M] [CLASS_k] .
    Both context sets are shared by all classes. `tokenize`: texts -> ids [N, L] at the model's
    context length L (SOT, ids, EOT, zeros: OpenAI's clip.tokenize, open_clip's tokenizer, or
    clip_model.tokenize); a prompt that fills the context may have been cut, and is refused.
    On a model with encode_text_shared (clip_model's) the text tower runs each context's
    [SOT, V_1 .. V_M] once and only the C class suffixes per context (exact: attention is causal);
    elsewhere the 2C prompts whole (`prompt_embeddings`)."""

    def __init__(self, clip, tokenize, classnames, M=16, ctx_init=None, std=0.02):
        super().__init__()
        width = clip.token_embedding.weight.shape[1]
        if ctx_init:  # e.g. "a photo of a": both contexts start from these words' embeddings
            init_ids = tokenize([ctx_init])[0]  # [L]: SOT, the words, EOT (the largest id), zeros
            M = int(init_ids.argmax()) - 1
            with torch.no_grad():
                init = clip.token_embedding.weight[init_ids[1:1 + M]].clone()  # [M, width]
            ctx_pos, ctx_neg = init.clone(), init.clone()
        else:
            ctx_pos, ctx_neg = std * torch.randn(M, width), std * torch.randn(M, width)
        self.M = M
        self.ctx_pos, self.ctx_neg = nn.Parameter(ctx_pos), nn.Parameter(ctx_neg)
        # "X X ... X classname." : the M placeholder embeddings are replaced by the contexts
        texts = [" ".join(["X"] * M) + " " + name.replace("_", " ") + "." for name in classnames]
        tokens = tokenize(texts)  # [C, L]
        full = (tokens[:, -1] != 0).nonzero()
        if len(full):
            raise ValueError(f"the prompt {texts[int(full[0])]!r} ({M} context tokens + class name) does not fit the "
                             f"text tower's context of {tokens.shape[1]} tokens (or fills it, and may have been cut)")
        with torch.no_grad():
            emb = clip.token_embedding(tokens.to(clip.token_embedding.weight.device))  # [C, L, width]
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # SOT
        self.register_buffer("suffix", emb[:, 1 + M:].clone(), persistent=False)  # class name, ".", EOT, pad

    def prompt_embeddings(self):
        """-> (tokens [2C, L], input embeddings [2C, L, width]): C positive prompts, then C negative."""
        C = self.tokens.shape[0]
        ctx = torch.stack([self.ctx_pos, self.ctx_neg])  # [2, M, width]
        ctx = ctx[:, None].expand(2, C, -1, -1).flatten(0, 1)  # [2C, M, width]
        emb = torch.cat([self.prefix.repeat(2, 1, 1), ctx.to(self.prefix.dtype), self.suffix.repeat(2, 1, 1)], dim=1)
        return self.tokens.repeat(2, 1), emb

    def forward(self, clip):
        """-> (t_pos, t_neg): normalised text embeddings [C, D] of the two prompt sets."""
        if not hasattr(clip, "encode_text_shared"):
            tokens, emb = self.prompt_embeddings()
            t = encode_text_embeddings(clip, emb, tokens.argmax(-1)).unflatten(0, (2, -1))  # [2, C, D]
            return unit(t[0]), unit(t[1])
        ctx = torch.stack([self.ctx_pos, self.ctx_neg]).to(self.prefix.dtype)  # [2, M, width]
        prefix = torch.cat([self.prefix[:1].expand(2, -1, -1), ctx], dim=1)  # [2, 1+M, width]: SOT, context
        t = unit(clip.encode_text_shared(prefix, self.tokens[:, 1 + self.M:], self.suffix))  # [2, C, D]
        return t[0], t[1]


class VPT(nn.Module):
    """Visual prompt tuning (Jia et al. 2022): P learnable tokens per block (deep) or before the
    first block only (shallow) of a ViT tower (encode_image_with_prompts). Initialised uniformly
    with VPT's xavier bound over the patch embedding's fan-in."""

    def __init__(self, visual, P=20, deep=True):
        super().__init__()
        width, patch = visual.conv1.out_channels, visual.conv1.kernel_size[0]
        bound = math.sqrt(6.0 / (3 * patch * patch + width))
        depth = len(visual.transformer.resblocks) if deep else 1
        self.prompts = nn.Parameter(torch.empty(depth, P, width).uniform_(-bound, bound))  # [depth, P, width]


class Adapter(nn.Module):
    """For ResNet backbones, where VPT does not apply [choice]: a residual bottleneck on the image
    embedding, v + up(relu(down(v))), with `up` zero-initialised so it starts as the identity."""

    def __init__(self, dim, reduction=4):
        super().__init__()
        self.down = nn.Linear(dim, dim // reduction)
        self.up = nn.Linear(dim // reduction, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, v):
        return v + self.up(F.relu(self.down(v)))


class DualPromptModel(nn.Module):
    """One of CoFT's two Phase-I models: a frozen CLIP shared with its peer (not part of this
    module's state: it is never trained and never saved here) plus its own prompts and VPT (a
    ViT) or adapter (a ResNet)."""

    def __init__(self, clip, tokenize, classnames, M=16, ctx_init=None, vpt_tokens=20, vpt_deep=True):
        super().__init__()
        object.__setattr__(self, "clip", clip)  # a plain attribute: excluded from parameters()/state_dict()
        self.prompts = PromptLearner(clip, tokenize, classnames, M, ctx_init)
        vit = is_vit(clip.visual)
        self.vpt = VPT(clip.visual, vpt_tokens, vpt_deep) if vit and vpt_tokens > 0 else None
        self.adapter = None if vit else Adapter(clip.visual.output_dim)

    def image_features(self, x):
        if self.vpt is not None:
            v = encode_image_with_prompts(self.clip.visual, x, self.vpt.prompts)
        else:  # nothing trainable inside the tower (ResNet + adapter): no graph through it
            with torch.no_grad():
                v = self.clip.encode_image(x)
        if self.adapter is not None:
            v = self.adapter(v)
        return unit(v)  # [B, D]

    def forward(self, x):
        """-> (v, t_pos, t_neg), all normalised fp32; s+ = similarity(v, t_pos), s- = similarity(v, t_neg)."""
        t_pos, t_neg = self.prompts(self.clip)
        return self.image_features(x), t_pos, t_neg


# -----------------------------------------------------------------------------
# Phase I losses (paper Sec. 3.1.3)


def p_clean(s_pos, s_neg, tau):
    """Eq. 5: p_clean_k(x) = exp(s+_k/tau) / (exp(s+_k/tau) + exp(s-_k/tau)) = sigmoid((s+_k - s-_k)/tau)."""
    return torch.sigmoid((s_pos - s_neg) / tau)


def complement_labels(y, C, u):
    """y' uniform over the C-1 classes other than y, redrawn at every step: (y + u) mod C, with
    u [B] uniform on {1, ..., C-1} (e.g. torch.randint(1, C, y.shape))."""
    return (y + u.to(y.device)) % C


def loss_l1(s_pos, y, tau):
    """Eq. 4: L1 = CE(softmax_k(s+_k / tau), y), batch mean."""
    return F.cross_entropy(s_pos / tau, y)


def loss_l2(s_pos, s_neg, y, y_comp, tau):
    """Eq. 6: L2 = -[log p_clean_y(x) + log(1 - p_clean_y'(x))], batch mean. The paper prints the
    second term with the opposite sign; this is the form its text (and DeFT) intend: the true
    class's positive prompt should beat its negative prompt, and a complement class's should not.
    log p = logsigmoid(d/tau), log(1 - p) = logsigmoid(-d/tau): stable for any margin d."""
    d = (s_pos - s_neg) / tau  # [B, C]
    d_y = d.gather(1, y[:, None]).squeeze(1)
    d_c = d.gather(1, y_comp[:, None]).squeeze(1)
    return -(F.logsigmoid(d_y) + F.logsigmoid(-d_c)).mean()


def phase1_losses(model, x, y, y_comp, tau, detach_neg=False):
    """(L1, L2) on a batch of S* with complement labels y_comp (paper Sec. 3.1.3, Eq. 4-6);
    L_Phase1 = L1 + lambda * L2. By default L2's gradient reaches everything it depends on: the
    negative context, the positive context and the visual prompts (the paper calls the negative
    prompt a regulariser of the visual modules).
    detach_neg = DeFT exactly: p_clean is computed from a *detached* s+ and from an s- of
    *detached* image features, so L2 trains only the negative context, and the positive context
    and the visual prompts learn from L1 alone. The loss values are the same either way."""
    v, t_pos, t_neg = model(x)
    s_pos = similarity(v, t_pos)  # [B, C]
    if detach_neg:
        s_pos_l2, s_neg = s_pos.detach(), similarity(v.detach(), t_neg)
    else:
        s_pos_l2, s_neg = s_pos, similarity(v, t_neg)
    return loss_l1(s_pos, y, tau), loss_l2(s_pos_l2, s_neg, y, y_comp, tau)


def phase1_terms(model, x, y, u, tau, lam, detach_neg=False):
    """A Phase-I step's loss L_Phase1 = L1 + lambda * L2 (Eq. 4-6) on a batch (x, y) of S*, the
    complement labels drawn from u [B] (uniform on {1, ..., C-1}) -> {term: (batch mean, batch size)}:
    the loss is the sum of the means."""
    l1, l2 = phase1_losses(model, x, y, complement_labels(y, model.prompts.tokens.shape[0], u), tau, detach_neg)
    return {"L1": (l1, len(y)), "lam*L2": (lam * l2, len(y))}


# -----------------------------------------------------------------------------
# Pseudo-labels: the seed set S* (Sec. 3.1.1), the collaborative filter (Sec. 3.2.1), labelled shots.
# Each step reads a few numbers per image (a label, a confidence, one score at a given label),
# never a whole row of scores: they come from the image features [N, D] and the class embeddings
# [C, D] block by block of rows, so memory holds [rows, C] at a time, not N x C (ImageNet's pool:
# 1.28 M x 1000 classes, 5 GB per score matrix in fp32).

BLOCK = 2 ** 24  # scores held at once: a block of BLOCK // C rows (64 MB in fp32)


def row_blocks(n, C):
    """Consecutive slices of n rows, BLOCK // C rows each (at least one)."""
    step = max(1, BLOCK // C)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def confidence_and_label(logits):
    """Eq. 1 per image: the softmax confidence max_k p(k|x) and its label [B] from logits [B, C]."""
    return logits.float().softmax(1).max(1)


def zero_shot_weights(clip, tokenize, prompts):
    """Zero-shot weights W [C, D] from per-class prompt lists: the mean of each class's normalised
    prompt embeddings, renormalised (Radford et al. 2021's prompt ensembling; one prompt = its own
    normalised embedding)."""
    W = []
    with torch.no_grad():
        for texts in prompts:
            tokens = tokenize(texts).to(clip.token_embedding.weight.device)
            W.append(F.normalize(F.normalize(clip.encode_text(tokens).float(), dim=-1).mean(0), dim=0))
    return torch.stack(W)


def zero_shot_logits(clip, W, x, tau):
    """The zero-shot logits cos(v(x), W_k) / tau [B, C] of images x (Eq. 1's scores), fp32."""
    return similarity(unit(clip.encode_image(x)), W) / tau


def zero_shot_labels(clip, W, x, tau):
    """Eq. 1 on a batch of images x: the zero-shot logits (zero_shot_logits) reduced per image to
    [B, 3]: the softmax confidence, its label and the logits' argmax (no row of scores leaves)."""
    logits = zero_shot_logits(clip, W, x, tau)
    conf, y = confidence_and_label(logits)
    return torch.stack([conf, y.float(), logits.argmax(1).float()], 1)


def labels_of(v, t, tau):
    """A model's own labels of the images v [N, D] (unit features) with class embeddings t [C, D],
    s = similarity(v, t): per image [N], argmax_k s, and the softmax confidence max_k softmax(s/tau)
    with its label (Eq. 1), block by block."""
    y, conf, y_conf = [], [], []
    for rows in row_blocks(len(v), len(t)):
        s = similarity(v[rows], t)  # [B, C]
        c, k = (s / tau).softmax(1).max(1)
        y.append(s.argmax(1))
        conf.append(c)
        y_conf.append(k)
    return torch.cat(y), torch.cat(conf), torch.cat(y_conf)


def scores_at(v, t, labels, tau=None):
    """The score s_{labels(x)}(x) of s = similarity(v, t) for each image [N], block by block: the
    one number per image a step reads of another model's scores. With tau, also the probability
    softmax(s / tau) there (Eq. 1), from the same blocks: (scores [N], probabilities [N])."""
    at, prob = [], []
    for rows in row_blocks(len(v), len(t)):
        s = similarity(v[rows], t)  # [B, C]
        k = labels[rows, None]
        at.append(s.gather(1, k).squeeze(1))
        if tau is not None:
            prob.append((s / tau).softmax(1).gather(1, k).squeeze(1))
    return torch.cat(at) if tau is None else (torch.cat(at), torch.cat(prob))


def topk_per_class(conf, y, K):
    """Seed set S* (Sec. 3.1.1): per class k the (at most) K images whose pseudo-label y is k, ranked
    by their confidence conf = p(k|x) (Eq. 1); ties go to the lower index. conf, y: [N]. Returns
    (indices [<= C*K], pseudo-labels), class by class. Two stable sorts, no per-class pass."""
    order = torch.sort(-conf, stable=True).indices  # most confident first, equal confidences in index order
    order = order[torch.sort(y[order], stable=True).indices]  # grouped by class, each group in that order
    grouped = y[order]
    rank = torch.arange(len(y)) - torch.searchsorted(grouped, grouped)  # position within its class
    idx = order[rank < K]
    return idx, y[idx]


def collaborative_filter(s_pos_b, s_neg_b):
    """Model b validates model a's labels (Sec. 3.2.1): keep x iff s+_{y_a(x)}(x) > s-_{y_a(x)}(x),
    model b's positive and negative prompts' scores at model a's label (scores_at). No threshold:
    b's negative prompt is the per-sample threshold. Returns a bool mask [N]."""
    return s_pos_b > s_neg_b


class Phase1Scores(NamedTuple):
    """A Phase-I model on a dataset: what its scores s+ = similarity(v, t_pos), s- = similarity(v,
    t_neg) are made of (the images' unit features v [N, D]; the positive and negative prompts' text
    embeddings t_pos, t_neg [C, D], t_pos also Phase II's head) and its own labels: y = argmax s+,
    conf = max softmax(s+ / tau) and y_conf its label (labels_of). No N x C matrix."""
    v: torch.Tensor
    t_pos: torch.Tensor
    t_neg: torch.Tensor
    y: torch.Tensor
    conf: torch.Tensor
    y_conf: torch.Tensor


def phase1_scores(v, t_pos, t_neg, tau):
    """Phase1Scores of a model from its image features v [N, D] and prompt embeddings [C, D]."""
    return Phase1Scores(v, t_pos, t_neg, *labels_of(v, t_pos, tau))


class Validated(NamedTuple):
    """Model a's labels as model b validated them (Sec. 3.2.1), per image [N]."""
    y_a: torch.Tensor  # model a's label, argmax s+ (its pseudo-label)
    peer_margin: torch.Tensor  # model b's s+ - s- at y_a: the filter keeps y_a iff it is > 0
    peer_prob: torch.Tensor  # model b's softmax probability of y_a, its positive prompts alone (a diagnosis)
    labels: torch.Tensor  # y_a, or the given label of a labelled image
    keep: torch.Tensor  # bool: in the clean set (kept by b, or labelled)
    margin: torch.Tensor  # model b's s+ - s- at `labels`

    def clean_set(self):
        """(indices, labels) of the clean set."""
        idx = self.keep.nonzero().squeeze(1)
        return idx, self.labels[idx]


def validate(A, B, tau, labelled, y_labelled):
    """One direction of the collaborative filter (Sec. 3.2.1): model a (Phase1Scores A) labels
    every image, model b (B) keeps a label iff its s+ beats its s- there (collaborative_filter).
    Labelled images (indices [L]) are kept with their given labels y_labelled [L]. -> Validated."""
    (s_pos_b, p_b), s_neg_b = scores_at(B.v, B.t_pos, A.y, tau), scores_at(B.v, B.t_neg, A.y)
    keep = collaborative_filter(s_pos_b, s_neg_b)
    labels, margin = A.y.clone(), s_pos_b - s_neg_b
    keep[labelled], labels[labelled] = True, y_labelled
    if len(labelled):  # the peer's margin at the given labels
        margin = scores_at(B.v, B.t_pos, labels) - scores_at(B.v, B.t_neg, labels)
    return Validated(A.y, s_pos_b - s_neg_b, p_b, labels, keep, margin)


def filter_both_ways(scores, tau, labelled, y_labelled):
    """The filter both ways (Sec. 3.2.1): model 1's labels validated by model 2 (branch 1's clean
    set) and model 2's by model 1 (branch 2's). scores: the two models' Phase1Scores."""
    return [validate(scores[a], scores[b], tau, labelled, y_labelled) for a, b in ((0, 1), (1, 0))]


# -----------------------------------------------------------------------------
# Phase II: full fine-tuning of the visual encoder + linear head (Sec. 3.2.2)


class Phase2Classifier(nn.Module):
    """A branch of Phase II (Sec. 3.2.2), trained with cross-entropy on its clean set (Eq. 7): a
    fully trainable copy of CLIP's image tower plus a linear head on its normalised embedding.
    With text_weights t [C, D] (Phase I's positive prompts, or zero-shot weights) the head is
    logit_scale * t, so step 0 is the prompt classifier logit_scale * cos(v, t_k). Phase I's
    visual prompts `vpt` [depth, P, width] or ResNet `adapter`, where given (--fft-init phase1),
    are copied and trained too."""

    def __init__(self, visual, num_classes, text_weights=None, logit_scale=100.0, vpt=None, adapter=None):
        super().__init__()
        self.visual = copy.deepcopy(visual).requires_grad_(True)  # a copy: the frozen Phase-I backbone stays frozen
        self.vpt = None if vpt is None else nn.Parameter(vpt.detach().clone())
        self.adapter = None if adapter is None else copy.deepcopy(adapter).requires_grad_(True)
        self.head = nn.Linear(visual.output_dim, num_classes)
        if text_weights is not None:
            with torch.no_grad():
                self.head.weight.copy_(logit_scale * text_weights)
                self.head.bias.zero_()

    def features(self, x):
        v = self.visual(x) if self.vpt is None else encode_image_with_prompts(self.visual, x, self.vpt)
        if self.adapter is not None:
            v = self.adapter(v)
        return unit(v)  # [B, D] fp32

    def forward(self, x):
        f = self.features(x)
        with torch.autocast(f.device.type, enabled=False):  # fp32 logits, see similarity()
            return self.head(f)


def phase2_terms(model, x, y):
    """A Phase-II step's loss L_FFT (Eq. 7): cross-entropy of a branch on a batch (x, y) of its
    clean set -> {term: (batch mean, batch size)}."""
    return {"L_FFT": (F.cross_entropy(model(x), y), len(y))}


# -----------------------------------------------------------------------------
# CoFT+: momentum contrast in Phase II (Sec. 3.3.2)


class MomentumContrast(nn.Module):
    """Phase II of CoFT+ (paper Sec. 3.3.2, Eq. 8-9): a momentum (EMA) copy of the fine-tuned
    model gives the keys, theta_m <- mu * theta_m + (1 - mu) * theta (Eq. 8); keys of past batches
    wait in a queue; the loss is InfoNCE with temperature tau' over [positive key, queued keys]
    (Eq. 9). No projection head: queries and keys are the normalised visual embeddings.

    The queue holds only real keys (no random initial entries), wraps around overwriting the
    oldest, and takes any batch size. Each key is stored with the index of its image: a query
    never meets an older key of *its own image* among its negatives (with a queue as large as a
    small dataset, most queries would: an older view of the same image is a positive, not a
    negative). Queue, indices and the EMA model are buffers, so checkpoints carry them."""

    def __init__(self, model, size, mu=0.999, tau=0.07, gather=None):
        super().__init__()
        self.model = model  # the online Phase2Classifier (trained)
        # under data parallelism, (keys, indices) of this process -> those of the whole batch, in
        # order (MoCo's concat_all_gather; coft.py passes ddp.gather_batch); one process: the identity
        self.gather = gather or (lambda *parts: parts)
        self.key_model = copy.deepcopy(model).requires_grad_(False)  # the momentum copy (never trained)
        self.mu, self.tau = mu, tau
        dim = model.head.in_features
        self.register_buffer("queue", torch.zeros(size, dim))  # [Q, D] normalised keys
        self.register_buffer("queue_idx", torch.full((size,), -1, dtype=torch.long))  # [Q] image of each key
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # slots holding a real key

    @torch.no_grad()
    def momentum_update(self):
        for p_m, p in zip(self.key_model.parameters(), self.model.parameters()):
            p_m.mul_(self.mu).add_(p.detach(), alpha=1 - self.mu)

    @torch.no_grad()
    def enqueue(self, keys, idx):
        """keys [n, D] of the images idx [n]; a batch larger than the queue keeps its newest keys."""
        Q = len(self.queue)
        keys, idx = keys[-Q:].float(), idx[-Q:]
        n, p = len(keys), int(self.ptr)
        first = min(n, Q - p)
        self.queue[p:p + first], self.queue_idx[p:p + first] = keys[:first], idx[:first]
        self.queue[:n - first], self.queue_idx[:n - first] = keys[first:], idx[first:]  # wrap: overwrite the oldest
        self.ptr.fill_((p + n) % Q)
        self.count.fill_(min(int(self.count) + n, Q))

    def info_nce(self, q, k, idx):
        """Eq. 9 per query, batch mean: -log( exp(q.k/tau') / (exp(q.k/tau') + sum_j exp(q.k_j/tau')) )
        over the queued keys k_j of *other* images than the query's own (idx); fp32 logits, the
        positive in column 0."""
        n = int(self.count)
        l_pos = (q.float() * k.float()).sum(1, keepdim=True)  # [B, 1]
        # a copy: enqueue() overwrites the queue in place before backward needs these keys
        l_neg = similarity(q, self.queue[:n].clone())  # [B, n]
        own = self.queue_idx[:n][None, :] == idx[:, None]  # [B, n] stale keys of the query's image
        l_neg = l_neg.masked_fill(own, float("-inf"))
        logits = torch.cat([l_pos, l_neg], dim=1) / self.tau
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

    def forward(self, x_q, x_k, idx):
        """L_Cont for two views of the images idx. Order: momentum update, keys, the loss against
        the queue as it was before this batch, and only then this batch's keys enter the queue."""
        q = self.model.features(x_q)  # [B, D]
        with torch.no_grad():
            self.momentum_update()
            k = self.key_model.features(x_k).detach()  # keys never carry gradients
        loss = self.info_nce(q, k, idx)
        self.enqueue(*self.gather(k, idx))  # every process enqueues the whole batch's keys: one queue everywhere
        return loss


class TwoViews:
    """Two independent draws of transforms t1, t2 of an image: a query and a key view (Eq. 9)."""

    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)


class CleanAndUnlabelled:
    """Phase II batches for CoFT+ (paper Eq. 10: L_FFT on the clean set, L_Cont on *all*
    unlabelled images). An epoch is one pass over all unlabelled images, in batches of two views
    (x_q, x_k) with their indices; each comes with a clean-set batch (x, y, i) from a loader that
    cycles, reshuffled every cycle. So every unlabelled image enters L_Cont once per epoch, and
    L_FFT gets at least one full pass of the clean loader (CoFT's epoch): the clean set is a
    subset of the unlabelled one.

    make_clean(cycle) -> the clean loader of that cycle; unlabelled: a loader of ((x_q, x_k), _, idx)."""

    def __init__(self, make_clean, unlabelled):
        self.make_clean, self.unlabelled = make_clean, unlabelled

    def __len__(self):
        return len(self.unlabelled)

    def __iter__(self):
        cycle = 0
        clean = iter(self.make_clean(cycle))
        for (xq, xk), _, j in self.unlabelled:
            try:
                x, y, i = next(clean)
            except StopIteration:
                cycle += 1
                clean = iter(self.make_clean(cycle))
                x, y, i = next(clean)
            yield x, y, i, xq, xk, j


def phase2_contrast_terms(mc, x, y, x_q, x_k, j, gamma):
    """CoFT+'s Phase-II step (Eq. 10): L_FFT (Eq. 7) on a clean batch (x, y) + gamma * L_Cont
    (Eq. 9) on two views (x_q, x_k) of the unlabelled images j, mc a MomentumContrast."""
    return {**phase2_terms(mc.model, x, y), "gamma*L_Cont": (gamma * mc(x_q, x_k, j), len(j))}


class Ensemble(nn.Module):
    """The test-time ensemble (Sec. 3.2.2) as one module: images -> the log of the mean of the
    branches' softmax outputs, so its softmax is that mean and its argmax the ensemble's label."""

    def __init__(self, branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.stack([b(x).softmax(-1) for b in self.branches]).mean(0).log()


def add_labelled(idx, y, labelled, y_labelled):
    """A pseudo-labelled set (idx, y) joined with the labelled images `labelled` [L], which carry
    their given labels y_labelled [L] (replacing a pseudo-label where a labelled image was already
    in the set)."""
    keep = ~torch.isin(idx, labelled)
    return torch.cat([idx[keep], labelled]), torch.cat([y[keep], y_labelled])


def seed_set(conf, y, K, labelled, y_labelled):
    """S* (Sec. 3.1.1): per class the K images most confidently labelled so (topk_per_class of the
    confidences conf [N] of labels y [N]), joined by the labelled images with their given labels."""
    return add_labelled(*topk_per_class(conf, y, K), labelled, y_labelled)


def label_precision(pseudo, true):
    """% of pseudo-labels that are right; None for an empty set or without true labels (JSON has
    no NaN)."""
    return 100.0 * (pseudo == true).float().mean().item() if len(pseudo) and true is not None else None


def auroc(score, positive):
    """How well `score` ranks the `positive` items (bool [N]) above the others: the probability
    that a random positive outscores a random negative, ties counting one half (the area under
    the ROC curve = Mann-Whitney U / (n+ n-), from average ranks). 50 = no better than chance.
    In % like the precisions; None when either group is empty."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    _, inverse, counts = torch.unique(score.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # [U] 1-based rank of each distinct value's last item
    rank = (ends - (counts - 1) / 2)[inverse]  # [N] average rank of each item among equal scores
    u = rank[positive].sum().item() - n_pos * (n_pos + 1) / 2
    return 100.0 * u / (n_pos * n_neg)


# =============================================================================
# Everything above is the method and needs torch alone: copy it into your own code (test_coft.py
# runs it, copied alone into an empty folder, on open_clip's CLIP). Below: the whole algorithm in
# one call (`adapt`, with a plain training loop and train.py's seeded loaders), then the CLI's run
# of the same steps, which adds run folders, resume, torchrun, metrics, logs and your own images.

import argparse
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass

import clip_model
import data
import ddp
import llm
import page
import runs
import standin
import train
from clip_model import class_prompts
from runs import cell, number_type, shown
from train import RunError, seed_of


# -----------------------------------------------------------------------------
# The whole algorithm in one call


@dataclass(frozen=True)
class Settings:
    """CoFT's hyperparameters; the defaults are the paper's (ViT-B/16). CoFT+: rounds=3,
    contrast=True and LLM-written prompts."""
    # the seed set and Phase I (Sec. 3.1; CoFT+'s rounds: Sec. 3.3.1)
    K: int = 16  # seed-set images per class (Sec. 3.1.1)
    rounds: int = 1  # R
    M: int = 16  # context tokens per prompt
    ctx_init: str | None = None  # words to initialise both contexts from (None: random)
    vpt_tokens: int = 20  # visual prompt tokens per block (0: none; a ResNet takes an adapter instead)
    vpt_deep: bool = True
    lam: float = 1.0  # lambda, the weight of L2 (Eq. 6)
    detach_neg: bool = False  # DeFT's variant: L2 trains the negative context only
    p1_epochs: int = 20
    p1_lr: float = 0.03
    # Phase II (Sec. 3.2.2; CoFT+'s momentum contrast: Sec. 3.3.2, Eq. 8-10)
    branches: int = 2
    fft_epochs: int = 10
    fft_lr: float = 5e-4
    fft_aug: str = "strong"  # the clean set's augmentation: "strong" or "weak"
    fft_init: str = "pretrained"  # or "phase1": Phase I's VPT / adapter carried into the tower, trained too
    head_init: str = "text"  # Phase I's positive prompts (another backbone: its zero-shot weights), or "random"
    contrast: bool = False  # + gamma * L_Cont (Eq. 10)
    gamma: float = 1.0
    mu: float = 0.999  # the key encoder's EMA momentum
    tau_c: float = 0.07  # InfoNCE temperature tau'
    queue: int = 4096
    # both phases: SGD with momentum on batches of `batch`, a linear warm-up of warmup_epochs then a
    # cosine decay per step, gradient norms clipped at clip_grad (0: off)
    batch: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    clip_grad: float = 0.0
    seed: int = 0  # every random stream is drawn from (seed, what it is for): train.seed_of
    precision: str = "fp32"  # or bf16 / fp16 autocast (train.amp_settings)
    eval_batch: int = 256

    def sgd(self):
        return train.SGDRecipe(self.batch, self.momentum, self.weight_decay, self.warmup_epochs, self.clip_grad)


class Images(torch.utils.data.Dataset):
    """The batches every step reads: (transform(images[idx[j]]), y[j], j) for j < len(idx); idx
    None: all images, y None: no labels (-1). `images` is any sequence of what `transform` takes
    (PIL images, or a dataset decoding files on demand)."""

    def __init__(self, images, transform, idx=None, y=None):
        self.images, self.transform = images, transform
        self.idx = list(range(len(images))) if idx is None else idx.tolist()
        self.y = [-1] * len(self.idx) if y is None else y.tolist()

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        return self.transform(self.images[self.idx[j]]), self.y[j], j


def shuffled(dataset, s, key, workers=0, pin_memory=False, drop_last=False):
    """dataset's batches in an order, and with augmentations, drawn from (s.seed, *key) alone
    (train.loader: whatever the workers or processes)."""
    return train.loader(dataset, s.batch, seed_of(s.seed, *key), True, workers, pin_memory, drop_last)


def phase1_model(clip, tokenize, classnames, s, r, m):
    """Model m (1 or 2) of Phase-I round r (Sec. 3.1): fresh prompts and VPT (or adapter) drawn
    from (seed, r, m), so the two models differ only by seed and every round restarts."""
    torch.manual_seed(seed_of(s.seed, "init", r, m))
    return DualPromptModel(clip, tokenize, classnames, s.M, s.ctx_init, s.vpt_tokens, s.vpt_deep)


def phase1_loss(s, tau, C):
    """Phase I's loss on a batch (x, y, index) of S* (phase1_terms), as a training loop calls it."""
    def loss(model, batch, draws):
        return phase1_terms(model, batch[0], batch[1], draws(1, C), tau, s.lam, s.detach_neg)
    return loss


@torch.no_grad()
def scores_of(model, v, tau, amp):
    """A Phase-I model's Phase1Scores from its image features v [N, D] of a dataset."""
    with torch.autocast(**amp):
        t_pos, t_neg = model.prompts(model.clip)
    return phase1_scores(v, t_pos.float().cpu(), t_neg.float().cpu(), tau)


def new_branch(visual, classes, head, logit_scale, peft, s, tag):
    """A Phase-II branch (Sec. 3.2.2) before training: a copy of the image tower `visual` and a
    linear head, from `head` [C, D] (s.head_init "text") or drawn from (seed, tag); with
    s.fft_init "phase1" the Phase-I model `peft`'s VPT or adapter comes along."""
    torch.manual_seed(seed_of(s.seed, "init", tag))
    carried = {} if s.fft_init != "phase1" or peft is None else \
        dict(vpt=None if peft.vpt is None else peft.vpt.prompts, adapter=peft.adapter)
    return Phase2Classifier(visual, classes, head if s.head_init == "text" else None, logit_scale, **carried)


def branch_training(model, clean, views, s, tag, workers=0, pin_memory=False, gather=None):
    """How a branch trains: -> (the module a training loop trains, its loss, batches(epoch)).
    clean: the branch's clean set (x, y, index) under its augmentation, in shuffled batches (the last
    dropped when smaller, unless the only one); Eq. 7 on each. With s.contrast (CoFT+, Eq. 10): an
    epoch is one pass over `views`, every unlabelled image as two views, each batch joined by one of
    the clean loader's (CleanAndUnlabelled), and a MomentumContrast around the branch (gather: how
    keys of the other processes join its queue under torchrun). Streams are keyed by `tag`."""
    def clean_batches(epoch, cycle=0):
        return shuffled(clean, s, (tag, epoch, "clean", cycle), workers, pin_memory, len(clean) > s.batch)

    if not s.contrast:
        def loss(model, b, _):  # Eq. 7 on a batch (x, y, index) of the clean set
            return phase2_terms(model, b[0], b[1])
        return model, loss, clean_batches
    mc = MomentumContrast(model, min(s.queue, len(views)), s.mu, s.tau_c, gather)

    def batches(epoch):
        return CleanAndUnlabelled(lambda cycle: clean_batches(epoch, cycle),
                                  shuffled(views, s, (tag, epoch, "unlabelled"), workers, pin_memory))

    def loss(mc, b, _):
        x, y, _, x_q, x_k, j = b
        return phase2_contrast_terms(mc, x, y, x_q, x_k, j, s.gamma)
    return mc, loss, batches


def fit(model, loss, batches, epochs, lr, s, seed, device="cpu"):
    """The plain training loop: SGD with momentum over model's trainable parameters, a linear
    warm-up of s.warmup_epochs then a cosine decay per step, autocast at s.precision (fp16 with a
    loss scaler), gradient norms clipped at s.clip_grad. loss(model, batch, draws) -> {term:
    (batch mean, batch size)}, the step's loss their sum; draws(low, high): one integer per sample
    from the epoch's stream. Every epoch's randomness comes from (seed, epoch), as in train.fit
    (which adds resume, torchrun and logging), so both train the same weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
    per_epoch = len(batches(0))
    total, warmup = epochs * per_epoch, s.warmup_epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: train.cosine_with_warmup(step, total, warmup))
    amp, scaler = train.amp_settings(device, s.precision)
    model.train()
    for epoch in range(epochs):
        torch.manual_seed(seed_of(seed, epoch))
        stream = torch.Generator().manual_seed(seed_of(seed, epoch, "step"))
        for batch in batches(epoch):
            batch = [b.to(device) if torch.is_tensor(b) else b for b in batch]
            n = len(batch[0])
            with torch.autocast(**amp):
                terms = loss(model, batch, lambda low, high: torch.randint(low, high, (n,), generator=stream))
            step_loss = train.add(mean for mean, _ in terms.values())
            opt.zero_grad(set_to_none=True)
            (scaler.scale(step_loss) if scaler else step_loss).backward()
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, s.clip_grad or float("inf"))
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
    return model.eval()


class Adapted(NamedTuple):
    """What `adapt` returns."""
    classifier: nn.Module  # the ensemble of the branches (images -> log of their mean softmax)
    phase1: list  # the last round's two Phase-I models
    seed_sets: list  # every round's two seed sets, [(indices, labels)] x 2 each
    validated: list  # both directions of the filter (Validated)


def adapt(clip, tokenize, images, classnames, prompts, transforms, s=Settings(), labelled=None, device="cpu"):
    """CoFT (Sec. 3; CoFT+ with s.rounds > 1 and s.contrast, Sec. 3.3) on unlabelled images, in one
    call: zero-shot labels and S*, Phase I's two models (CoFT+: R rounds), the filter both ways,
    Phase II's branches and their ensemble. The CLI's end_to_end runs these same steps.
    clip: a CLIP with OpenAI's module layout, frozen; tokenize: texts -> ids [N, L] at its context
    length; images: a sequence of images (what the transforms take); classnames [C]; prompts: per
    class its zero-shot prompts ([str]); transforms: {"test", "weak", "strong"}, each image -> a
    normalised tensor at the tower's resolution; labelled: optional (indices [L], labels [L]) that
    join S* and both clean sets (Sec. 4.4)."""
    amp, _ = train.amp_settings(device, s.precision)
    tau, C = 1.0 / clip.logit_scale.exp().item(), len(classnames)
    labelled, y_labelled = labelled if labelled is not None else (torch.zeros(0, dtype=torch.long),) * 2

    def evaluate(fn, dataset):  # fn over every image, in order, in evaluation batches -> [N, ...]
        return train.predict(fn, train.loader(dataset, s.eval_batch, seed_of(s.seed)), device, amp)[0]

    unlabelled = Images(images, transforms["test"])
    # zero-shot pseudo-labels (Eq. 1) and the seed set S* (Sec. 3.1.1)
    W = zero_shot_weights(clip, tokenize, prompts)
    conf, y_conf, _ = evaluate(lambda x: zero_shot_labels(clip, W, x, tau), unlabelled).T.contiguous()
    sets, seed_sets = [seed_set(conf, y_conf.long(), s.K, labelled, y_labelled)] * 2, []
    # Phase I (Sec. 3.1): two models differing only by seed; CoFT+ (Sec. 3.3.1): each round relabels
    for r in range(1, s.rounds + 1):
        seed_sets.append(list(sets))
        models, scores = [], []
        for m in (1, 2):
            model = phase1_model(clip, tokenize, classnames, s, r, m).to(device)
            tag = f"phase1_round{r}_model{m}"
            seed_images = Images(images, transforms["weak"], *sets[m - 1])
            fit(model, phase1_loss(s, tau, C), lambda epoch: shuffled(seed_images, s, (tag, epoch)), s.p1_epochs,
                s.p1_lr, s, seed_of(s.seed, tag), device)
            models.append(model)
            scores.append(scores_of(model, evaluate(model.image_features, unlabelled), tau, amp))
            if r < s.rounds:  # the model's own top-K is its next seed set
                sets[m - 1] = seed_set(scores[-1].conf, scores[-1].y_conf, s.K, labelled, y_labelled)
    # the collaborative filter both ways (Sec. 3.2.1), then Phase II per branch (Sec. 3.2.2)
    validated = filter_both_ways(scores, tau, labelled, y_labelled)
    branches = []
    for a in range(s.branches):
        tag = f"branch{a + 1}"
        branch = new_branch(clip.visual, C, scores[a].t_pos.to(device), clip.logit_scale.exp().item(), models[a], s,
                            tag).to(device)
        clean = Images(images, transforms[s.fft_aug], *validated[a].clean_set())
        views = Images(images, TwoViews(transforms[s.fft_aug], transforms["strong"]))
        if len(clean):  # the peer may reject every label: then the branch stays as it starts
            trained, loss, batches = branch_training(branch, clean, views, s, tag)
            fit(trained.to(device), loss, batches, s.fft_epochs, s.fft_lr, s, seed_of(s.seed, tag), device)
        branches.append(branch.eval())
    return Adapted(Ensemble(branches), models, seed_sets, validated)


# -----------------------------------------------------------------------------
# What a run is: its settings, what its stages share, and the part of its config each stage
# depends on (runs.py, "run folders")

# each stage's record: the settings its result depends on
SEED_SET_KEYS = ("dataset", "data", "clip", "seed", "precision", "K", "labelled_shots", "zero_shot_prompts")
SGD_KEYS = ("batch", "weight_decay", "momentum", "warmup_epochs", "clip_grad")
PHASE1_KEYS = SEED_SET_KEYS + SGD_KEYS + ("M", "ctx_init", "vpt_tokens", "vpt", "lam", "detach_neg", "p1_epochs",
                                          "p1_lr")
PHASE2_KEYS = SGD_KEYS + ("method", "rounds", "fft_epochs", "fft_lr", "fft_aug", "fft_init", "fft_backbone",
                          "head_init", "contrast", "gamma", "mu", "tau_c", "queue", "threshold", "sync_bn")


def stage_record(config, tag):
    """The settings stage `tag` depends on: Phase-I models those of S* and of Phase I; a branch
    also Phase II's (and with them the number of rounds before it); the baselines S*'s and
    Phase II's; a labels file (--labels) changes the seed set and so every stage."""
    keys = PHASE1_KEYS if tag.startswith("phase1") else \
        PHASE1_KEYS + PHASE2_KEYS if tag.startswith("branch") else SEED_SET_KEYS + PHASE2_KEYS
    return {"stage": tag, **{k: config[k] for k in dict.fromkeys(keys + ("labels",)) if k in config}}


def settings_of(args):
    """The CLI's (resolved) flags -> Settings."""
    return Settings(**{f: getattr(args, f) for f in Settings.__dataclass_fields__ if f != "vpt_deep"},
                    vpt_deep=args.vpt == "deep")


@dataclass
class Run(runs.Run):
    """What the stages of one run share, made once by `prepare`: its folder, config and how it
    computes (runs.Run: also the seeded loaders, the evaluation pass and a stage), the task's
    images, the train split's true labels where it has them (for the precision diagnostics only:
    no stage reads them), the labelled images (--labelled-shots or --labels) with their labels,
    and the results so far."""
    must_load: str  # stages to load from --out, never train: "none", "phase1" (--phase 2) or "all" (--eval-only)
    sgd: train.SGDRecipe  # both phases' (each with its own lr and epochs)
    task: data.Task
    clip: clip_model.CLIP  # frozen
    tau: float  # CLIP's own temperature, used everywhere
    unlabelled: data.ImageDataset  # the train split's images under the test transform
    evaluated: data.ImageDataset  # the eval split (test, dev for tuning, or --check) under the test transform
    y_true: torch.Tensor | None  # [N] the train split's labels; None for your own images
    y_eval: torch.Tensor | None  # [N_eval]; None without a labelled eval split (--images without --check)
    labelled: torch.Tensor  # [L] indices of the labelled images (empty without)
    y_labelled: torch.Tensor  # [L] their labels
    predictions: dict  # eval-split predictions (argmax) of every model, for per-image analysis
    prompts: dict  # the zero-shot prompts per class
    ft_clip: clip_model.CLIP | None  # --fft-backbone's model (Phase II on another backbone), or None
    sync_bn: bool  # how Phase II computes, flags of the CLI alone (--sync-bn, --compile, --grad-checkpointing)
    compile: bool
    grad_checkpointing: bool

    def record(self, tag):
        return stage_record(self.config, tag)

    def required(self, tag):
        if self.must_load == "all":
            return f"--eval-only needs a finished run in --out {self.out} (run without --eval-only first)"
        if self.must_load == "phase1" and tag.startswith("phase1"):
            return f"--phase 2 needs Phase I in --out {self.out} (run --phase 1 first)"
        return None

    def truth(self, idx=None):
        """The true train labels (of the images idx) for a diagnostic figure; None without them."""
        return None if self.y_true is None else self.y_true if idx is None else self.y_true[idx]

    def score(self, name, fn):
        """A model's accuracy on the eval split (fn: images -> scores), its argmax kept as
        predictions[name]; None without a labelled eval split (then nothing is evaluated)."""
        if self.y_eval is None:
            return None
        scores = self.outputs(fn, self.evaluated)
        self.predictions[name] = scores.argmax(1)
        return train.accuracy(scores, self.y_eval)


# -----------------------------------------------------------------------------
# The stages, in the paper's order


def zero_shot_and_seed_set(run, prompts, K):
    """Stage 0 (Sec. 3.1.1): zero-shot pseudo-labels of the unlabelled images by Eq. 1, and the
    seed set S*: per class the K most confident, joined by any labelled shots. Returns the
    zero-shot weights W [C, D], S* as (indices, labels) and the unlabelled images' zero-shot
    confidence and label [N] (each image's logits reduced in its batch: no N x C matrix)."""
    cost = train.StageCost(run.device)
    W = zero_shot_weights(run.clip, tokenize_for(run.clip), prompts)
    zs = run.outputs(lambda x: zero_shot_labels(run.clip, W, x, run.tau), run.unlabelled)  # [N, 3]
    conf, y_conf, y_logit = zs.T.contiguous()  # contiguous: a mean over a strided column sums in another order
    y_conf, y_logit = y_conf.long(), y_logit.long()
    if run.y_eval is not None:
        run.predictions["y"] = run.y_eval
    run.metrics["zero_shot_acc"] = run.score("zero_shot", lambda x: zero_shot_logits(run.clip, W, x, run.tau))
    run.metrics["zero_shot_train_label_precision"] = label_precision(y_logit, run.truth())
    run.metrics["zero_shot_mean_confidence"] = 100.0 * conf.mean().item()
    idx, y = seed_set(conf, y_conf, K, run.labelled, run.y_labelled)
    run.metrics["seed_set"] = {"size": len(idx), "kept_fraction": 100.0 * len(idx) / len(conf),
                               "precision": label_precision(y, run.truth(idx))}
    cost.record(run.metrics, "zero_shot")
    print(f"zero-shot {run.metrics['eval_split']} acc {shown(run.metrics['zero_shot_acc'])}, mean confidence "
          f"{cell(run.metrics['zero_shot_mean_confidence'])} %; seed set S*: {len(idx)} images, precision "
          f"{cell(run.metrics['seed_set']['precision'])}", flush=True)
    return W, (idx, y), (conf, y_conf)


def phase1(run, s, s_star):
    """Phase I (Sec. 3.1): two dual-prompt models differing only by seed, trained on their seed
    set with L1 + lambda * L2 (Eq. 4-6). CoFT+ (Sec. 3.3.1) runs R rounds: after round r each
    model relabels every image with its positive prompts and takes its own top-K as its next
    seed set, and round r+1 restarts from pre-trained CLIP with fresh prompts and VPT.
    Returns the last round's models and, per model, what its scores on all unlabelled images are
    made of and what it reads of them (Phase1Scores), plus every round's seed sets."""
    cost = train.StageCost(run.device)
    weak = data.make_transform("weak", run.clip.visual, run.task)
    sets, seed_sets = [s_star, s_star], []
    run.metrics["rounds"] = []
    loss = phase1_loss(s, run.tau, len(run.task.classnames))
    for r in range(1, s.rounds + 1):
        models, scores, log = [], [], {}
        seed_sets.append(list(sets))
        for m in (1, 2):
            idx, y = sets[m - 1]
            log[f"model{m}_seed_set"] = {"size": len(idx), "precision": label_precision(y, run.truth(idx))}
            model = phase1_model(run.clip, tokenize_for(run.clip), run.task.classnames, s, r, m).to(run.device)
            tag = f"phase1_round{r}_model{m}"
            seed_images = data.ImageDataset([run.task.train[i] for i in idx.tolist()], weak, labels=y.tolist(),
                                             exif_orientation=run.task.exif_orientation)

            def batches(epoch, ds=seed_images, tag=tag):
                return run.loader(ds, s.batch, (tag, epoch), shuffle=True)
            run.stage(tag, model, loss, batches, epochs=s.p1_epochs, lr=s.p1_lr, recipe=run.sgd,
                      what=f"phase I round {r} model {m}")
            # each model's scores on all unlabelled images, computed once and used for relabelling
            # (next round) or for both directions of the collaborative filter (last round)
            on_train = scores_of(model, run.outputs(model.image_features, run.unlabelled), run.tau, run.amp)
            log[f"model{m}_acc"] = None
            if run.y_eval is not None:
                predicted = scores_of(model, run.outputs(model.image_features, run.evaluated), run.tau, run.amp).y
                log[f"model{m}_acc"] = train.accuracy(predicted, run.y_eval)
                run.predictions[f"round{r}_model{m}"] = predicted
            # label-free: how sure the model is of its own labels on the unlabelled images
            log[f"model{m}_mean_confidence"] = 100.0 * on_train.conf.mean().item()
            models.append(model)
            scores.append(on_train)
            if r < s.rounds:  # this model's own top-K by its positive-prompt softmax
                sets[m - 1] = seed_set(on_train.conf, on_train.y_conf, s.K, run.labelled, run.y_labelled)
        run.metrics["rounds"].append(log)
        print(f"phase I round {r}: " + "; ".join(
            f"model {m}: seed set {log[f'model{m}_seed_set']['size']} (precision "
            f"{cell(log[f'model{m}_seed_set']['precision'])}), acc {shown(log[f'model{m}_acc'])}, mean confidence "
            f"{cell(log[f'model{m}_mean_confidence'])} %" for m in (1, 2)), flush=True)
    run.metrics["phase1_model1_acc"], run.metrics["phase1_model2_acc"] = log["model1_acc"], log["model2_acc"]
    cost.record(run.metrics, "phase1")
    return models, scores, seed_sets


def generate_and_validate(run, scores):
    """Sec. 3.2.1, both directions (filter_both_ways), with the labelled images kept under their
    given labels, and what it says of the labels when the true ones are known (filter_diagnosis).
    Returns the two directions (Validated)."""
    cost = train.StageCost(run.device)
    validated = filter_both_ways(scores, run.tau, run.labelled, run.y_labelled)
    run.metrics["phase1_agreement"] = 100.0 * (scores[0].y == scores[1].y).float().mean().item()
    for a, (d, own) in enumerate(zip(validated, scores)):
        idx, labels = d.clean_set()
        # model a's own confidence in its label y = argmax s+ is its top softmax probability, own.conf
        diagnosis = filter_diagnosis(d.y_a, d.keep, d.peer_margin, d.peer_prob, own.conf, run.truth())
        c = run.metrics[f"clean_set_{a + 1}"] = {
            "size": len(idx), "kept_fraction": 100.0 * len(idx) / len(d.keep),
            "precision": label_precision(labels, run.truth(idx)),
            "all_labels_precision": label_precision(d.y_a, run.truth()), **diagnosis}
        print(f"clean set {a + 1} (labels of model {a + 1}, validated by model {2 - a}): {len(idx)}/{len(d.keep)} "
              f"kept, precision {cell(c['precision'])} (all labels {cell(c['all_labels_precision'])})", flush=True)
    print(f"the two Phase-I models agree on {run.metrics['phase1_agreement']:.1f} % of the labels", flush=True)
    cost.record(run.metrics, "filter")
    return validated


def filter_diagnosis(y_a, keep, peer_margin, peer_confidence, own_confidence, y_true):
    """Does the peer's negative prompt tell right pseudo-labels from wrong ones (Sec. 3.2.1's
    claim), and better than confidence alone? For model a's labels y_a [N] and the filter's
    mask `keep` [N]: the precision of the removed labels (beside the kept ones' precision), and
    the AUROC of three scores [N] for ranking right above wrong labels: the filter's own margin
    s+_b - s-_b at y_a (model b, dual prompts), model b's plain softmax confidence in y_a (its
    positive prompts alone: the same peer without the negative prompt) and model a's own
    confidence in its label (Eq. 1 softmax at tau). Diagnosis only (it reads the true train
    labels y_true: all None without them)."""
    if y_true is None:
        return dict.fromkeys(("removed_precision", "auroc_peer_margin", "auroc_peer_confidence",
                              "auroc_own_confidence"))
    right = y_a == y_true
    return {"removed_precision": label_precision(y_a[~keep], y_true[~keep]),
            "auroc_peer_margin": auroc(peer_margin, right),
            "auroc_peer_confidence": auroc(peer_confidence, right),
            "auroc_own_confidence": auroc(own_confidence, right)}


def fine_tune(run, s, tag, clip, head, idx, y, peft=None):
    """Phase II for one branch (Sec. 3.2.2): a copy of clip's image tower and a linear head
    (new_branch: from `head` [C, D], or at random; `peft`'s VPT or adapter with --fft-init phase1)
    fine-tuned on the train images idx with labels y, its clean set, under s.fft_aug at clip's
    resolution (branch_training: Eq. 7; CoFT+: Eq. 10 with every unlabelled image as two views);
    also the top-K, labelled-shots and self-training baselines' trainer. Every stream is keyed by
    `tag`, so no two branches share one. Returns the trained Phase2Classifier in eval mode."""
    model = new_branch(clip.visual, len(run.task.classnames), head, clip.logit_scale.exp().item(), peft, s,
                       tag).to(run.device)
    if run.sync_bn:  # ResNet towers under torchrun: BatchNorm statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    augment = data.make_transform(s.fft_aug, clip.visual, run.task)
    clean = data.ImageDataset([run.task.train[i] for i in idx.tolist()], augment, labels=y.tolist(),
                              exif_orientation=run.task.exif_orientation)
    if len(clean) == 0:  # the validator rejected every label: nothing to fine-tune on
        run.stage(tag, model, None, None, epochs=0, lr=0, recipe=run.sgd)
        return model
    views = data.ImageDataset(run.task.train, TwoViews(augment, data.make_transform("strong", clip.visual, run.task)),
                              exif_orientation=run.task.exif_orientation) if s.contrast else None
    trained, loss, batches = branch_training(model, clean, views, s, tag, run.workers, run.device.type == "cuda",
                                             ddp.gather_batch)
    towers = [trained.model.visual, trained.key_model.visual] if s.contrast else [model.visual]
    run.stage(tag, model, loss, batches, epochs=s.fft_epochs, lr=s.fft_lr, recipe=run.sgd, what=f"phase II {tag}",
              trained=trained.to(run.device), compiled=towers if run.compile else [])
    return model


def phase2(run, s, scores, peft, clean):
    """Phase II (Sec. 3.2.2) per branch a: a fresh copy of the pre-trained image tower (or of
    --fft-backbone's, the paper's distillation setting) fine-tuned on clean set a, its head
    initialised from Phase-I model a's positive prompts (another backbone: its zero-shot
    weights). Returns each branch's softmax on the eval split (None without one)."""
    cost = train.StageCost(run.device)
    if run.ft_clip is None:
        clip, evaluated = run.clip, run.evaluated
        heads = [p.t_pos.to(run.device) for p in scores]  # each Phase-I model's own positive prompts
    else:
        clip = run.ft_clip.to(run.device)
        set_grad_checkpointing(clip, run.grad_checkpointing)
        evaluated = data.ImageDataset(run.evaluated.items, data.make_transform("test", clip.visual, run.task),
                                      exif_orientation=run.evaluated.exif_orientation)
        heads = [zero_shot_weights(clip, tokenize_for(clip), run.prompts)] * 2  # the new backbone's zero-shot weights
    probs = []
    for a in range(s.branches):
        branch = fine_tune(run, s, f"branch{a + 1}", clip, heads[a], *clean[a], peft=peft[a])
        run.metrics[f"branch{a + 1}_acc"] = None
        if run.y_eval is not None:
            logits = run.outputs(branch, evaluated)
            run.metrics[f"branch{a + 1}_acc"] = train.accuracy(logits, run.y_eval)
            run.predictions[f"branch{a + 1}"] = logits.argmax(1)
            probs.append(logits.softmax(1))
    cost.record(run.metrics, "phase2")
    return probs if run.y_eval is not None else None


def ensemble(run, probs):
    """The test-time ensemble (Sec. 3.2.2): the mean of the branches' softmax outputs."""
    run.metrics["ensemble_acc"] = None
    if probs is not None:
        p = torch.stack(probs).mean(0)
        run.metrics["ensemble_acc"] = train.accuracy(p, run.y_eval)
        run.predictions["ensemble"] = p.argmax(1)


# -----------------------------------------------------------------------------
# Baselines, in the same run folder layout and table


def linear_probe(run):
    """Reference ceiling (--method probe): multinomial logistic regression on the frozen,
    normalised image features, fitted with the TRUE train labels (train.logistic_regression)."""
    logits = run.linear_probe(run.clip, run.unlabelled, run.y_true, run.evaluated, len(run.task.classnames))
    run.metrics["probe_acc"] = train.accuracy(logits, run.y_eval)
    print(f"linear probe on frozen features, trained with the TRUE train labels (a ceiling for reference, "
          f"not a label-free method): {run.metrics['probe_acc']:.2f}", flush=True)


def fine_tune_baseline(run, method, s, W, s_star):
    """--method topk: the UPL-like self-training baseline, Phase II's recipe on S* with its
    zero-shot labels (and any labelled shots); --method shots: the same on the labelled shots
    alone. One branch, its head initialised from the zero-shot weights W."""
    cost = train.StageCost(run.device)
    idx, y = s_star if method == "topk" else (run.labelled, run.y_labelled)
    branch = fine_tune(run, s, method, run.clip, W, idx, y)
    run.metrics[f"{method}_acc"] = run.score(method, branch)
    cost.record(run.metrics, "fine_tune")


def self_training(run, s, rounds, threshold, W, labeller):
    """--method selftrain: the self-training reference a reader tries first, iterative
    pseudo-labelling with a confidence threshold (Lee, 2013; in rounds, as noisy-student
    training). Round r: every unlabelled image whose label from the current labeller has
    softmax confidence >= --threshold joins the training set with that label (round 1's
    labeller: zero-shot, Eq. 1, `labeller` = (confidence [N], label [N])), and a fresh copy of
    the pre-trained tower with its head from W is fine-tuned on it by Phase II's recipe; the
    result labels round r + 1.
    `rounds` rounds (--rounds, default 3 for this method); the last round's model is the result.
    Unlike CoFT: no second model, no negative prompt, one global threshold."""
    cost = train.StageCost(run.device)
    run.metrics["selftrain_rounds"] = []
    for r in range(1, rounds + 1):
        conf, y = labeller
        idx = (conf >= threshold).nonzero().squeeze(1)
        idx, labels = add_labelled(idx, y[idx], run.labelled, run.y_labelled)
        model = fine_tune(run, s, f"selftrain_round{r}", run.clip, W, idx, labels)
        log = {"size": len(idx), "kept_fraction": 100.0 * len(idx) / len(conf),
               "precision": label_precision(labels, run.truth(idx)), "acc": run.score("selftrain", model)}
        run.metrics["selftrain_rounds"].append(log)
        print(f"self-training round {r}: {log['size']} images with confidence >= {threshold} (precision "
              f"{cell(log['precision'])}), {run.metrics['eval_split']} acc {shown(log['acc'])}", flush=True)
        if r < rounds:
            def labels(x, model=model):  # [B, 2]: each image's confidence and label, reduced in its batch
                conf, y = confidence_and_label(model(x))
                return torch.stack([conf, y.float()], 1)
            conf, y = run.outputs(labels, run.unlabelled).T.contiguous()  # the next round's labeller
            labeller = conf, y.long()
    run.metrics["selftrain_acc"] = log["acc"]  # the last round's model, whose predictions `score` kept
    cost.record(run.metrics, "fine_tune")


# -----------------------------------------------------------------------------
# A finished run's classifier, rebuilt from its stages (deploy.py)


def branch_from_stage(state, visual, classes):
    """A Phase-II branch (Phase2Classifier) from its stage file's state dict; the Phase-I VPT or
    adapter it carries with --fft-init phase1 is read off the keys."""
    vpt = state.get("vpt")
    adapter = Adapter(state["adapter.down.weight"].shape[1]) if "adapter.down.weight" in state else None
    model = Phase2Classifier(visual, classes, vpt=vpt, adapter=adapter)
    model.load_state_dict(state)
    return model.eval()


def final_stages(metrics, config):
    """The stages whose models make a finished run's classifier, as the run evaluated it: CoFT
    and CoFT+ the ensemble of their branches, top-K and labelled shots their one model,
    self-training its last round. None for runs without a trained classifier (the linear probe
    keeps no weights; --phase 1 stops before Phase II)."""
    method = metrics.get("method")
    if method in ("coft", "coft+"):
        return [f"branch{a + 1}" for a in range(config["branches"])] if "ensemble_acc" in metrics else None
    if method in ("topk", "shots"):
        return [method]
    if method == "selftrain":
        return [f"selftrain_round{len(metrics['selftrain_rounds'])}"]
    return None


# -----------------------------------------------------------------------------
# A run, end to end


def end_to_end(args):
    """Zero-shot -> S* -> Phase I (two models; CoFT+: R rounds) -> collaborative filter ->
    Phase II (CoFT+: + momentum contrast) -> ensemble. Writes metrics.json, config.json,
    pseudo_labels.pt (every seed set and clean set), pseudo_labels.csv (every image's labels, for
    a person to review; review.pt, its index for the review page) and predictions.pt (eval-split
    predictions of every model); stages/ holds each finished stage (docs/runs.md)."""
    run, s = prepare(args)  # the stages see the Settings, never the flags
    W, s_star, zero_shot = zero_shot_and_seed_set(run, run.prompts, s.K)
    if args.method == "probe":
        linear_probe(run)
    elif args.method in ("topk", "shots"):
        fine_tune_baseline(run, args.method, s, W, s_star)
    elif args.method == "selftrain":
        self_training(run, s, args.rounds, args.threshold, W, zero_shot)
    else:
        peft, scores, seed_sets = phase1(run, s, s_star)
        validated = generate_and_validate(run, scores)
        clean = [d.clean_set() for d in validated]
        runs.atomic_save({"labelled": run.labelled, "seed_sets": seed_sets, "generated": [d.y_a for d in validated],
                          "clean": [idx for idx, _ in clean], "clean_labels": [y for _, y in clean]},
                         run.out / "pseudo_labels.pt")
        write_pseudo_labels(run, zero_shot, validated)
        if args.phase != "1":
            ensemble(run, phase2(run, s, scores, peft, clean))
    return runs.finish_run(run.out, run.metrics, run.predictions, run.t0)


# the results of CoFT's own besides runs.RESULT_FILES (pseudo_labels.csv: a person's form, runs.write_for_person);
# review.pt: the review page's index of the pseudo-labels
OUTPUTS = ("pseudo_labels.pt", page.REVIEW)

# flags config.json leaves out: CoFT's that change how a run goes, never its numbers (besides
# runs.UNRECORDED_FLAGS), and the LLM prompt file, whose contents the config records instead
UNRECORDED_FLAGS = ("compile", "grad_checkpointing", "eval_only", "phase", "llm_prompts", "write_llm_prompts",
                    "api_base", "llm", "prompts_per_class")


def run_config(args, images, prompts, labels=None):
    """Every setting that can change a number of this run, with the data (`images`, its record:
    data.record), the zero-shot prompts, the backbones and any labels file recorded by content."""
    config, _ = runs.settings(args, UNRECORDED_FLAGS)
    if labels is not None:
        config["labels"] = labels.digest()
    config.update(data=data.fingerprint(images),
                  clip=standin.backbone_id("--clip", args.clip, args.clip_act),
                  fft_backbone=standin.backbone_id("--fft-backbone", args.fft_backbone, args.clip_act),
                  zero_shot_prompts=hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16])
    return config


def prepare(args):
    """Everything a run checks and loads before its first stage, in the order that keeps a
    mistake cheap: the flags, --out, the data and prompts, the backbones, and only then the run
    folder (config.json; --restart discards the old run there). Returns (Run, Settings)."""
    device = runs.start_processes(args.device)  # torchrun: join the job (plain python: nothing to join)
    check_args(args, device)
    continuing = args.resume or args.eval_only or args.phase == "2"
    runs.check_out(args.out, continuing, args.restart, runs.input_files(args), OUTPUTS)
    if (args.eval_only or args.phase == "2") and not runs.holds_run(args.out):
        raise RunError(f"--out {args.out} holds no run for {'--eval-only' if args.eval_only else '--phase 2'} "
                       f"to use: run {'it' if args.eval_only else '--phase 1'} first")
    args = runs.with_precision(args, device)  # the config records what ran
    t0 = time.time()
    task = ddp.rank0_first(lambda: data.task_of(args))  # rank 0 fills the digest cache the others then read
    eval_items = data.eval_items(task, args.eval_split)
    y_true = data.train_labels(task)
    labels = data.read_labels(args.labels, task) if args.labels else None
    check_labels(args, y_true)
    check_prompt_flags(args, task)
    prompts = zero_shot_prompts(task, args.llm_prompts, args.template_ensemble, args.plus)
    images = data.record(task)
    config = run_config(args, images, prompts, labels)
    if continuing:  # the images must be those the run was made with: said in words, before the backbone loads
        data.check_same_images(runs.saved_images(args.out), images, args.out)
    torch.manual_seed(args.seed)  # building a model draws random numbers (then overwritten): seeded too
    clip, _ = standin.load("--clip", args.clip, args.clip_act, device)
    clip.requires_grad_(False)
    if args.method == "coft":  # Phase I's prompts must fit the context: said now, not after the zero-shot pass
        try:
            PromptLearner(clip, tokenize_for(clip), task.classnames, args.M, args.ctx_init)
        except ValueError as e:
            raise RunError(f"{e}: use a smaller --M (or --ctx-init with fewer words) or a shorter class name") from None
    set_grad_checkpointing(clip, args.grad_checkpointing)
    ft_clip = None  # loaded and checked now, used in Phase II
    if args.fft_backbone and args.method == "coft":  # Phase II on another backbone (distillation)
        ft_clip, _ = standin.load("--fft-backbone", args.fft_backbone, args.clip_act, "cpu")
        check_fft_init(args, clip, ft_clip)
    # every check passed: only now may --restart discard the run in --out
    out = runs.open_run(args.out, config, continuing, args.restart, OUTPUTS, runs.settings(args, UNRECORDED_FLAGS)[1],
                        inputs=runs.input_files(args), images=images)
    test = data.make_transform("test", clip.visual, task)
    if labels is not None:  # the paper's few-labels setting (Sec. 4.4) from the labels a person gave
        labelled, y_labelled = labels.index, labels.y
    elif args.labelled_shots:  # ... or drawn: true-labelled shots per class (all of a smaller class)
        labelled = data.few_shot(task, args.labelled_shots, seed_of(args.seed, "labelled shots"), True)
        y_labelled = y_true[labelled]
    else:
        labelled = y_labelled = torch.zeros(0, dtype=torch.long)
    metrics = {"dataset": args.dataset, "classnames": task.classnames, "clip": args.clip,
               "method": "coft+" if args.plus else args.method,
               "seed": args.seed, "eval_split": args.eval_split, "precision": args.precision,
               "parts": {"rounds": args.rounds, "contrast": args.contrast, "zero_shot_prompts":
                         "llm" if args.llm_prompts else "classes file" if task.prompts else
                         "ensemble" if args.template_ensemble else "template"},
               "processes": ddp.world()[1], "grad_norms": {}, "time_s": {}}
    if args.labelled_shots:
        metrics["labelled_shots"] = {"per_class": args.labelled_shots, "size": len(labelled)}
    if labels is not None:
        metrics["labels"] = {"file": args.labels, "size": len(labels),
                             "per_class": labels.per_class(len(task.classnames))}
    s = settings_of(args)
    run = Run(**runs.fields_of(args, out, config, device, continuing),
              must_load="all" if args.eval_only else "phase1" if args.phase == "2" else "none",
              sgd=s.sgd(), task=task, clip=clip,
              tau=1.0 / clip.logit_scale.exp().item(),
              unlabelled=data.ImageDataset(task.train, test, exif_orientation=task.exif_orientation),
              evaluated=data.ImageDataset(eval_items, test, exif_orientation=task.exif_orientation), y_true=y_true,
              y_eval=torch.tensor([label for _, label in eval_items]) if eval_items else None, labelled=labelled,
              y_labelled=y_labelled, metrics=metrics, predictions={}, t0=t0, prompts=prompts, ft_clip=ft_clip,
              sync_bn=args.sync_bn, compile=args.compile, grad_checkpointing=args.grad_checkpointing)
    print(f"{data.named(task.name)}: {len(task.classnames)} classes, {len(task.train)} unlabelled train images, "
          f"{len(eval_items)} {args.eval_split} images; backbone {args.clip} ({clip.visual.resolution}px) on "
          f"{device}, {args.precision}", flush=True)
    if labels is not None:
        print(labels.summary(), flush=True)
        counts = labels.per_class(len(task.classnames))
        print(f"labels you gave: {runs.counted(len(labels), 'image')} in {args.labels} ({min(counts)}-{max(counts)} "
              f"per class, {sum(n > 0 for n in counts)} of {len(counts)} classes); {LABELS_USE[args.method]}",
              flush=True)
    if y_true is None:
        given = "" if labels is None else " beyond the ones you gave"
        print(f"the train images carry no labels{given}: every figure that needs the true label of every train image "
              f"(the label precisions, the filter's removed-label precision and AUROCs) is absent: null in "
              f"metrics.json, '-' in the table", flush=True)
    if not eval_items:
        print("no labelled check set (--check): no accuracy is reported; what can be known without labels is: the "
              "mean confidences, the Phase-I models' agreement and the filter's kept fractions", flush=True)
    return run, s


# what each method does with the labels a person gave (--labels), as the run says it
LABELS_USE = {"coft": "they join S* and both clean sets with these labels", "topk": "they join S* with these labels",
              "selftrain": "they join every round's training set with these labels",
              "shots": "the model is fine-tuned on them alone"}


def check_args(args, device):
    """Flag combinations that cannot work, refused before anything is loaded or trained (each
    number's range is checked by the parser)."""
    if args.sync_bn and ddp.world()[1] > 1 and device.type != "cuda":
        raise RunError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only): drop it on CPUs")
    if args.method == "shots" and not (args.labelled_shots or args.labels):
        raise RunError("--method shots fine-tunes on the labelled shots only: give --labelled-shots N (N > 0) or "
                       "--labels FILE")
    if args.method == "probe" and (args.labels or args.labelled_shots):
        flag = "--labels" if args.labels else "--labelled-shots"
        raise RunError(f"--method probe fits the true label of every train image, so {flag} is not used: drop it, or "
                       f"use another --method")
    if args.labelled_shots and args.labels:
        raise RunError("--labelled-shots draws labelled images from the dataset's labels and --labels gives them: "
                       "give one of the two")
    if args.restart and (args.eval_only or args.phase == "2"):
        raise RunError(f"--restart discards the run in --out, so there would be nothing for "
                       f"{'--eval-only' if args.eval_only else '--phase 2'} to use: drop one of them")
    for flag, name in (("--clip", args.clip), ("--fft-backbone", args.fft_backbone)):
        standin.check_backbone(flag, name, args.clip_act)


def check_labels(args, y_true):
    """What needs labels the data do not have, refused before any work (a labels file that labels
    no image is refused by data.read_labels)."""
    if y_true is None and args.method == "probe":
        raise RunError("--method probe fits the TRUE label of every train image (a ceiling for reference), and "
                       "these images carry none: use another --method")
    if y_true is None and args.labelled_shots:
        raise RunError("--labelled-shots N draws labelled images from the dataset's labels, and these images carry "
                       "none: label some yourself and give them with --labels FILE")


def check_prompt_flags(args, task):
    """The zero-shot prompts come from one place: --llm-prompts, else a {class: [prompts]} --classes
    file, else the templates (--template, --template-ensemble). A flag that the prompts in use
    would leave unread is refused rather than recorded in config.json and ignored (--plus implies
    the template ensemble only where no prompts are given)."""
    prompts_file = f"--classes {args.classes}" if task.prompts else None
    if args.llm_prompts and prompts_file:
        raise RunError(f"--llm-prompts {args.llm_prompts} and the prompts of {prompts_file} would both make the "
                       f"zero-shot classifier: give one of the two (the classes one per line with --llm-prompts)")
    given = f"--llm-prompts {args.llm_prompts}" if args.llm_prompts else prompts_file
    if given and args.template:  # a prompts file with --template is refused by data.images_task
        raise RunError(f"--template is not used: the prompts of {given} make the zero-shot classifier; drop "
                       f"--template")
    if given and args.template_ensemble and not (args.plus and not args.llm_prompts):
        raise RunError(f"--template-ensemble is not used: the prompts of {given} make the zero-shot classifier; "
                       f"drop --template-ensemble")


def check_fft_init(args, clip, ft_clip):
    """--fft-init phase1 carries the Phase-I VPT (ViT) or adapter (ResNet) into the Phase-II
    encoder; with --fft-backbone that encoder is another model, which they must fit."""
    if args.fft_init != "phase1" or ft_clip is None:
        return
    a, b = clip.cfg, ft_clip.cfg
    if a.is_vit and args.vpt_tokens > 0:
        depth = a.vision_layers if args.vpt == "deep" else 1
        if not (b.is_vit and b.vision_width == a.vision_width and b.vision_layers >= depth):
            raise RunError(
                f"--fft-init phase1 carries {args.clip}'s VPT ({depth} x {args.vpt_tokens} tokens, "
                f"{a.vision_width} wide) into --fft-backbone {args.fft_backbone}, which "
                f"{'is a ResNet' if not b.is_vit else f'has width {b.vision_width} and {b.vision_layers} blocks'}: "
                f"use --fft-init pretrained with --fft-backbone")
    elif not a.is_vit and b.embed_dim != a.embed_dim:
        raise RunError(
            f"--fft-init phase1 carries {args.clip}'s adapter ({a.embed_dim}-d) onto --fft-backbone "
            f"{args.fft_backbone}'s {b.embed_dim}-d embedding: use --fft-init pretrained with --fft-backbone")


PSEUDO_LABELS_COLUMNS = ("path", "class", "branch1_class", "branch1_kept", "branch1_peer_margin", "branch2_class",
                         "branch2_kept", "branch2_peer_margin", "zero_shot_class", "zero_shot_confidence", "labelled")


def write_pseudo_labels(run, zero_shot, validated):
    """pseudo_labels.csv: every unlabelled image's labels, for a person to review (sort by a
    margin to see the doubtful first), as a form to fill in. Columns: path (as a labels file
    names it), class (empty for the person to fill in; the given label where the run had one),
    branch1_class (model 1's label: branch 1 trains on it where branch1_kept is 1), branch1_kept,
    branch1_peer_margin (model 2's s+ - s- at that label: the filter keeps a label iff it is > 0;
    a given label is always kept), branch2_class, branch2_kept, branch2_peer_margin (the other
    direction), zero_shot_class, zero_shot_confidence (its softmax probability, Eq. 1), labelled
    (1: a label given by --labels / --labelled-shots). Text cells are data.csv_text guarded. Filled
    in, the file is a labels file: give it (in place) to a new run as --labels. Written by
    runs.write_for_person: a pseudo_labels.csv that is this command's input or that a person changed
    stays as it is, and the new one goes to the next free name."""
    names, root = run.task.classnames, run.task.root
    given = dict(zip(run.labelled.tolist(), run.y_labelled.tolist()))
    conf, zs = (t.tolist() for t in zero_shot)
    (y1, keep1, m1), (y2, keep2, m2) = ((d.labels.tolist(), d.keep.int().tolist(), d.margin.tolist())
                                        for d in validated)
    text = data.csv_text
    keys = [data.item_key(source, i, root) for i, (source, _) in enumerate(run.task.train)]
    rows = ([text(key), text(names[given[i]]) if i in given else "", text(names[y1[i]]), keep1[i], f"{m1[i]:.6g}",
             text(names[y2[i]]), keep2[i], f"{m2[i]:.6g}", text(names[zs[i]]), f"{conf[i]:.6g}", int(i in given)]
            for i, key in enumerate(keys))
    runs.write_for_person(run.out, "pseudo_labels.csv", PSEUDO_LABELS_COLUMNS, rows, run.inputs,
                          "this run's pseudo_labels.csv")
    if run.task.name == "images":  # the review page's index of the same labels (python page.py review)
        page.write_review(run.out, keys, names, torch.stack([d.labels for d in validated]),
                          torch.stack([d.keep for d in validated]), torch.stack([d.margin for d in validated]),
                          run.task.digests["train"])


def tokenize_for(clip):
    """clip_model's tokenizer at the backbone's context length, cutting what does not fit (the
    prompt learner refuses a prompt that fills the context)."""
    return functools.partial(clip_model.tokenize, context_length=clip.context_length, truncate=True)


def set_grad_checkpointing(clip, on):
    """Recompute transformer blocks in the backward pass (memory for ViT-L/14); ResNet stages are
    not checkpointed."""
    clip.transformer.grad_checkpointing = on
    if clip.cfg.is_vit:
        clip.visual.transformer.grad_checkpointing = on


def zero_shot_prompts(task, llm_prompts=None, template_ensemble=False, plus=False):
    """The zero-shot pass's prompts per class: the dataset's hand-written template (CoFT); with
    CoFT+ the LLM-written prompts of --llm-prompts, or else the ensemble of hand-written
    templates (said so on the console). A {class: [prompts]} file given as --classes is the
    prompts (unless --llm-prompts is given too)."""
    if llm_prompts:
        return llm.read_class_prompts(llm_prompts, task.classnames)
    if task.prompts:
        return task.prompts
    if template_ensemble:
        if plus:
            print(f"CoFT+ without --llm-prompts: the zero-shot pass uses the ensemble of {len(task.templates)} "
                  f"hand-written templates instead of LLM-written prompts", flush=True)
        return class_prompts(task.classnames, task.templates)
    return data.zero_shot_prompts(task)


# -----------------------------------------------------------------------------
# CLI


def parser():
    p = runs.Parser(description="CoFT: label-free collaborative fine-tuning of CLIP",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    data.add_flags(p, "digits (offline demo), a CoOp dataset name, imagefolder, cifar10, cifar100")
    a("--labels", default=None, metavar="FILE",
      help="labelled images (the paper's few-labels setting, Sec. 4.4): a CSV path,class (paths relative to "
           "--images / --data-root); they join S* and both clean sets with these labels. A run's "
           "pseudo_labels.csv, rows checked and corrected, is such a file")
    a("--clip", default="demo", help="demo (the offline stand-in), an OpenAI release (RN50 ... ViT-L/14@336px), "
      "open_clip:ARCH/TAG[=FILE], a Hugging Face CLIPModel folder or hf:ORG/NAME, or a checkpoint file "
      "(with --clip-act)")
    a("--out", default="runs/coft")
    a("--method", default="coft", choices=["coft", "topk", "selftrain", "shots", "probe"],
      help="topk: the UPL-like baseline (Phase II on S*); selftrain: iterative pseudo-labelling of every image "
           "with confidence >= --threshold, --rounds times; shots: fine-tune on the --labelled-shots images "
           "alone; probe: linear probe with TRUE labels (ceiling, reference only)")
    runs.run_flags(p)
    a("--phase", default="all", choices=["all", "1", "2"],
      help="1: zero-shot + Phase I (+ filter) only; 2: Phase II from the Phase-I models saved in --out")
    a("--eval-only", action="store_true", help="evaluate the models saved in --out, train nothing")
    a("--table", nargs="+", metavar="RUN_DIR", help="print a results table of finished runs and exit")
    a("--compile", action="store_true", help="torch.compile the towers' forward passes")
    a("--grad-checkpointing", action="store_true", help="recompute transformer blocks in backward (memory)")
    a("--eval-split", default="test", choices=["test", "dev"],
      help="dev: report on the labelled dev split instead (for choosing hyperparameters; never tune on test)")
    # seed set
    a("--K", type=number_type(int, 1), default=16, help="seed-set images per class")
    a("--labelled-shots", type=number_type(int, 0), default=0, metavar="N",
      help="semi-supervised setting (paper Sec. 4.4): N true-labelled train images per class join S* and both "
           "clean sets with their true labels")
    # Phase I
    a("--M", type=number_type(int, 1), default=None,
      help="context tokens per prompt; default 16 (the paper's, for ViT-B/16), 4 for the demo backbone (chosen on "
           "the dev splits of both demo tasks)")
    a("--ctx-init", default=None, help='initialise both contexts from words, e.g. "a photo of a"')
    a("--vpt-tokens", type=number_type(int, 0), default=None,
      help="visual prompt tokens per block; default 20 (the paper's), 0 for the demo backbone (chosen on dev)")
    a("--vpt", default="deep", choices=["deep", "shallow"])
    a("--lam", type=number_type(float, 0), default=1.0, help="weight of L2")
    a("--detach-neg", action="store_true",
      help="DeFT: L2 trains only the negative context (detached s+ and image features)")
    a("--p1-epochs", type=number_type(int, 1), default=20)
    a("--p1-lr", type=number_type(float, 0, low_open=True), default=0.03)
    a("--batch", type=number_type(int, 1), default=64,
      help="global batch size (the paper's); under torchrun each of N processes takes a contiguous 1/N of every batch")
    a("--weight-decay", type=number_type(float, 0), default=5e-4, help="SGD weight decay, both phases")
    a("--momentum", type=number_type(float, 0, 1, high_open=True), default=0.9, help="SGD momentum, both phases")
    a("--warmup-epochs", type=number_type(int, 0), default=1,
      help="linear warm-up before the cosine decay, both phases")
    a("--clip-grad", type=number_type(float, 0), default=None,
      help="gradient-norm clipping threshold, both phases (0: off); default off (the published recipes), 1.0 for "
           "the demo backbone (chosen on its dev split)")
    # Phase II
    a("--branches", type=int, default=2, choices=[1, 2])
    a("--fft-epochs", type=number_type(int, 1), default=10)
    a("--fft-lr", type=number_type(float, 0, low_open=True), default=None,
      help="default 5e-4 (published); 2e-2 for the demo backbone (CoFT's choice on both demo tasks' dev splits)")
    a("--fft-aug", default="strong", choices=["strong", "weak"])
    a("--fft-init", default="pretrained", choices=["pretrained", "phase1"],
      help="phase1: also carry (and train) the Phase-I VPT / adapter in the fine-tuned encoder")
    a("--fft-backbone", default=None,
      help="Phase II on another backbone (distillation), e.g. ViT-B/16; any --clip form")
    # CoFT+
    a("--plus", action="store_true", help="CoFT+: --rounds 3 --contrast, and LLM prompts (or the template ensemble)")
    a("--rounds", type=number_type(int, 1), default=None,
      help="Phase-I rounds R (default 1; 3 with --plus); --method selftrain: its rounds (default 3)")
    a("--contrast", action="store_true", help="momentum contrastive loss on all unlabelled images in Phase II")
    a("--gamma", type=number_type(float, 0), default=1.0, help="weight of L_Cont")
    a("--mu", type=number_type(float, 0, 1), default=0.999, help="EMA momentum of the key encoder")
    a("--tau-c", type=number_type(float, 0, low_open=True), default=0.07, help="InfoNCE temperature tau'")
    a("--queue", type=number_type(int, 1), default=4096,
      help="key queue size (capped to the number of unlabelled images)")
    a("--llm-prompts", default=None, help="JSON {class: [prompts]} for the zero-shot pass (CoFT+)")
    a("--template-ensemble", action="store_true", help="zero-shot pass with all hand-written templates")
    a("--write-llm-prompts", default=None, metavar="FILE",
      help="ask an OpenAI-compatible endpoint for class prompts, write FILE (a new file) and exit (key: "
           "$OPENAI_API_KEY)")
    a("--api-base", default="https://api.openai.com/v1")
    a("--llm", default="gpt-4o-mini", help="model name for --write-llm-prompts")
    a("--prompts-per-class", type=number_type(int, 1), default=10)
    a("--head-init", default="text", choices=["text", "random"])
    a("--sync-bn", action="store_true",
      help="Phase II under torchrun with a ResNet backbone: BatchNorm statistics over the global batch "
           "(SyncBatchNorm, GPUs only) instead of each process's slice; no effect on ViTs or in a plain run")
    # self-training reference
    a("--threshold", type=number_type(float, 0, 1), default=None,
      help="--method selftrain: softmax confidence an image's pseudo-label needs to be trained on; default 0.95 "
           "(FixMatch's), 0.7 for the demo backbone (chosen on both demo tasks' dev splits)")
    return p


def resolve_defaults(args):
    """The defaults that depend on other flags, filled in after parsing: CoFT+ = all three parts
    (each part alone is its own flag); the published recipes for real backbones (the paper's
    Phase-I capacity, 16 context tokens and 20 deep VPT tokens, sized for ViT-B/16; DeFT /
    ActiveCLIP: no clipping, Phase-II lr 5e-4) and the values chosen on the demo's dev splits for
    the offline stand-in, whose 16 patches and 24-token context a ViT-B/16 capacity overfits
    (docs/demo.md); loader workers by device. Returns a resolved copy of the flags."""
    args = argparse.Namespace(**vars(args))
    args.dataset = data.dataset_name(args)
    if args.plus:
        args.contrast = True
        args.rounds = args.rounds or 3
        args.template_ensemble = args.template_ensemble or not args.llm_prompts
    args.rounds = args.rounds or (3 if args.method == "selftrain" else 1)
    if args.workers is None:
        args.workers = train.default_workers(args.device)
    demo = args.clip == standin.NAME
    if args.M is None:  # Phase-I capacity: the paper's for real backbones, the dev split's for the stand-in
        args.M = 4 if demo else 16
    if args.vpt_tokens is None:
        args.vpt_tokens = 0 if demo else 20
    if args.threshold is None:
        args.threshold = 0.7 if demo else 0.95
    if args.clip_grad is None:
        args.clip_grad = 1.0 if demo else 0.0
    if args.fft_lr is None:
        args.fft_lr = 2e-2 if demo else 5e-4
    return args


def run_summary(m):
    """The numbers of one run that a results table shows (None where they do not apply). The
    trained-on set: CoFT's clean sets (pairs: one per branch), self-training's last round, top-K's S*.
    With the filter's diagnosis (CoFT): removed labels' precision, AUROC of the peer's margin and
    of its plain confidence for telling right pseudo-labels from wrong (filter_diagnosis)."""
    clean = [m[f"clean_set_{a}"] for a in (1, 2) if f"clean_set_{a}" in m] or m.get("selftrain_rounds", [])[-1:]
    if not clean and m["method"] == "topk":
        clean = [m["seed_set"]]

    def pair(key):
        return [c[key] for c in clean if c.get(key) is not None]
    return {"zero-shot": m["zero_shot_acc"], "S* prec": m["seed_set"]["precision"],
            "kept %": pair("kept_fraction"), "clean prec": pair("precision"), "removed prec": pair("removed_precision"),
            "AUROC margin": pair("auroc_peer_margin"), "AUROC conf": pair("auroc_peer_confidence"),
            "agree %": m.get("phase1_agreement"),
            "phase I": [m[k] for k in ("phase1_model1_acc", "phase1_model2_acc") if k in m],
            "branches": [m[k] for k in ("branch1_acc", "branch2_acc") if k in m],
            "final acc": next((m[k] for k in ("ensemble_acc", "topk_acc", "selftrain_acc", "shots_acc", "probe_acc")
                               if k in m), None),
            "time s": m["time_s"]["total"]}


def main(argv=None):
    args = parser().parse_args(argv)

    def body():
        if args.table:
            methods = ("coft", "coft+", "topk", "selftrain", "shots", "probe")  # a run's "method" in metrics.json
            return runs.table(runs.finished_runs(args.table, methods), run_summary)
        if args.write_llm_prompts:
            args.dataset = data.dataset_name(args)
            task = data.task_of(args)
            runs.check_not_input(args.write_llm_prompts, "--write-llm-prompts", runs.input_files(args))
            path = llm.write_class_prompts(args.write_llm_prompts, task.classnames, args.api_base, args.llm,
                                           os.environ.get("OPENAI_API_KEY"), args.prompts_per_class)
            print(f"wrote prompts for {len(task.classnames)} classes to {path}")
            return None
        return end_to_end(resolve_defaults(args))
    where = "" if args.table or args.write_llm_prompts else \
        runs.saved_in(args.out, "finished stages and the last epoch checkpoint")
    return runs.run_cli(body, where, errors=data.USER_ERRORS)


if __name__ == "__main__":
    main()
