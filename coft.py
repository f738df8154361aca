"""
CoFT: Collaborative Fine-Tuning of CLIP without human labels.

Wang, Meng, Cai, Song, Xia, "Fine-tuning Pre-trained Vision-Language Models in a
Human-Annotation-Free Manner", arXiv 2602.04337 (2026). Equations and the choices where the
paper is silent: ../shared/spec/coft.md (summarised in the README).

    0. zero-shot pseudo-labels on the unlabelled train split; top-K per class = seed set S*
    1. Phase I: two PEFT models (positive/negative prompts + VPT), differing only by seed,
       trained on S* with L1 + lambda * L2
    2. Phase II: model a labels everything, model b validates (s+ > s-), and a fully fine-tuned
       visual encoder + linear head is trained per branch on its clean set; test = ensemble

Every building block (PromptLearner, VPT, the losses, collaborative_filter, fit) works on its
own; the CLI at the bottom strings them together:

    python coft.py --dataset digits --clip demo --out runs/digits
    python coft.py --dataset dtd --data-root DATA --clip ViT-B/16 --out runs/dtd
"""
import argparse
import copy
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_model
import data
import train
from clip_model import atomic_save, time_per_call
from train import RunError, amp_settings, fit, number, seed_of, write_json

# -----------------------------------------------------------------------------
# Similarities in fp32


def unit(x):
    """Rows scaled to unit norm, in fp32 (features leave a bf16 tower in bf16)."""
    return F.normalize(x.float(), dim=-1)


def similarity(v, t):
    """v @ t.T in fp32, also under autocast. Every logit in CoFT is a cosine times 1/tau ~= 100
    (zero-shot, s+ / s-, the head, InfoNCE's 1/tau' ~= 14): in bf16 a logit near 30 is off by up to
    0.06-0.125 (its spacing), enough to flip an argmax or a top-K near a tie. The matrix product
    is tiny next to the towers, so it always runs in fp32."""
    with torch.autocast(v.device.type, enabled=False):
        return v.float() @ t.float().t()


# -----------------------------------------------------------------------------
# Phase I modules: dual prompts, VPT, adapter


class PromptLearner(nn.Module):
    """CoOp-style learnable contexts, class token at the end (spec, Phase I):
        positive  [V+_1 .. V+_M] [CLASS_k] .      negative  [V-_1 .. V-_M] [CLASS_k] .
    Both context sets are shared by all classes. The 2C prompts go through the text tower in one
    batched call, which runs only up to the longest EOT (clip_model.CLIP.encode_text)."""

    def __init__(self, clip, classnames, M=16, ctx_init=None, std=0.02):
        super().__init__()
        width = clip.cfg.transformer_width
        tok = clip_model.tokenizer()
        if ctx_init:  # e.g. "a photo of a": both contexts start from these words' embeddings
            init_ids = tok.encode(ctx_init)
            M = len(init_ids)
            with torch.no_grad():
                init = clip.token_embedding.weight[init_ids].clone()  # [M, width]
            ctx_pos, ctx_neg = init.clone(), init.clone()
        else:
            ctx_pos, ctx_neg = std * torch.randn(M, width), std * torch.randn(M, width)
        self.M = M
        self.ctx_pos, self.ctx_neg = nn.Parameter(ctx_pos), nn.Parameter(ctx_neg)
        # "X X ... X classname." : the M placeholder embeddings are replaced by the contexts
        texts = [" ".join(["X"] * M) + " " + name.replace("_", " ") + "." for name in classnames]
        try:
            tokens = clip_model.tokenize(texts, clip.context_length)  # [C, L]
        except clip_model.CLIPError:  # say which prompt and which flags make it shorter
            n_tokens = {t: len(tok.encode(t)) + 2 for t in texts}  # + SOT and EOT
            longest = max(texts, key=n_tokens.get)
            raise RunError(f"the prompt {longest!r} ({M} context tokens + class name) is {n_tokens[longest]} tokens, "
                           f"longer than the backbone's context of {clip.context_length}: use a smaller --M "
                           f"(or --ctx-init with fewer words) or a shorter class name") from None
        with torch.no_grad():
            emb = clip.token_embedding(tokens)  # [C, L, width]
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
        tokens, emb = self.prompt_embeddings()
        t = unit(clip.encode_text(tokens, embeddings=emb))  # [2C, D]
        C = self.tokens.shape[0]
        return t[:C], t[C:]


class VPT(nn.Module):
    """Visual prompt tuning (Jia et al. 2022): P learnable tokens per block (deep) or before the
    first block only (shallow), inserted by clip_model.VisionTransformer after the class token.
    Initialised uniformly with VPT's xavier bound over the patch embedding's fan-in."""

    def __init__(self, clip, P=20, deep=True):
        super().__init__()
        v = clip.visual
        width, patch = v.conv1.out_channels, v.patch_size
        bound = math.sqrt(6.0 / (3 * patch * patch + width))
        depth = v.transformer.layers if deep else 1
        self.prompts = nn.Parameter(torch.empty(depth, P, width).uniform_(-bound, bound))  # [D, P, width]


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
    module's state: it is never trained and never saved here) plus its own prompts and VPT."""

    def __init__(self, clip, classnames, M=16, ctx_init=None, vpt_tokens=20, vpt_deep=True):
        super().__init__()
        object.__setattr__(self, "clip", clip)  # a plain attribute: excluded from parameters()/state_dict()
        self.prompts = PromptLearner(clip, classnames, M, ctx_init)
        is_vit = clip.cfg.is_vit
        self.vpt = VPT(clip, vpt_tokens, vpt_deep) if is_vit and vpt_tokens > 0 else None
        self.adapter = None if is_vit else Adapter(clip.cfg.embed_dim)

    def image_features(self, x):
        if self.vpt is not None:
            v = self.clip.encode_image(x, vpt=self.vpt.prompts)
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
# Losses (spec, Phase I)


def p_clean(s_pos, s_neg, tau):
    """p_clean_k(x) = exp(s+_k/tau) / (exp(s+_k/tau) + exp(s-_k/tau)) = sigmoid((s+_k - s-_k)/tau)."""
    return torch.sigmoid((s_pos - s_neg) / tau)


def complement_labels(y, C, generator=None):
    """y' drawn uniformly from the C-1 classes other than y (redrawn at every step)."""
    shift = torch.randint(1, C, y.shape, generator=generator, device="cpu").to(y.device)
    return (y + shift) % C


def loss_l1(s_pos, y, tau):
    """L1 = CE(softmax_k(s+_k / tau), y)."""
    return F.cross_entropy(s_pos / tau, y)


def loss_l2(s_pos, s_neg, y, y_comp, tau):
    """L2 = -[log p_clean_y(x) + log(1 - p_clean_y'(x))], batch mean. The paper prints the second
    term with the opposite sign; this is the form its text (and DeFT) intend: the true class's
    positive prompt should beat its negative prompt, and a complement class's should not.
    log p = logsigmoid(d/tau), log(1 - p) = logsigmoid(-d/tau): stable for any margin d."""
    d = (s_pos - s_neg) / tau  # [B, C]
    d_y = d.gather(1, y[:, None]).squeeze(1)
    d_c = d.gather(1, y_comp[:, None]).squeeze(1)
    return -(F.logsigmoid(d_y) + F.logsigmoid(-d_c)).mean()


def phase1_loss(model, x, y, tau, lam=1.0, detach_neg=False, generator=None):
    """Loss = L1 + lambda * L2 on a batch of S* (paper Eq. 4-6). By default L2's gradient reaches
    everything it depends on: the negative context, the positive context and the visual prompts
    (the paper calls the negative prompt a regulariser of the visual modules).
    detach_neg = DeFT exactly: p_clean is computed from a *detached* s+ and from an s- of
    *detached* image features, so L2 trains only the negative context, and the positive context
    and the visual prompts learn from L1 alone. The loss values are the same either way."""
    v, t_pos, t_neg = model(x)
    s_pos = similarity(v, t_pos)  # [B, C]
    if detach_neg:
        s_pos_l2, s_neg = s_pos.detach(), similarity(v.detach(), t_neg)
    else:
        s_pos_l2, s_neg = s_pos, similarity(v, t_neg)
    l1 = loss_l1(s_pos, y, tau)
    l2 = loss_l2(s_pos_l2, s_neg, y, complement_labels(y, s_pos.shape[1], generator), tau)
    return l1 + lam * l2, {"L1": l1.detach(), "L2": l2.detach()}


# -----------------------------------------------------------------------------
# Pseudo-labels: zero-shot classifier, seed set, collaborative filter


def class_prompts(classnames, templates):
    """Per class, its name in every template: [[str]] (C lists)."""
    return [[t.format(name.replace("_", " ")) for t in templates] for name in classnames]


@torch.no_grad()
def text_classifier(clip, prompts, device):
    """Zero-shot weights [C, D] from per-class prompt lists: the mean of each class's
    normalised prompt embeddings, renormalised (one prompt = its plain embedding)."""
    W = []
    for texts in prompts:
        tokens = clip_model.tokenize(texts, clip.context_length, truncate=True).to(device)
        W.append(F.normalize(F.normalize(clip.encode_text(tokens).float(), dim=-1).mean(0), dim=0))
    return torch.stack(W)


def zero_shot_logits(clip, W, x, tau):
    """Eq. 1's logits cos(v(x), t(c_k)) / tau for images x [B, 3, R, R], W [C, D] from
    text_classifier; fp32 even under autocast (see similarity)."""
    return similarity(unit(clip.encode_image(x)), W) / tau


def topk_per_class(probs, K):
    """Seed set S*: per class k the (at most) K images whose pseudo-label is k, ranked by p(k|x);
    ties go to the lower index. Returns (indices [<=C*K], pseudo-labels)."""
    conf, y = probs.max(1)
    keep = []
    for k in range(probs.shape[1]):
        idx = (y == k).nonzero().squeeze(1)
        order = torch.sort(-conf[idx], stable=True).indices  # stable: equal confidences keep index order
        keep.append(idx[order[:K]])
    idx = torch.cat(keep)
    return idx, y[idx]


def collaborative_filter(y_a, s_pos_b, s_neg_b):
    """Model b validates model a's labels: keep x iff s+_{y_a(x)}(x) > s-_{y_a(x)}(x) under model b.
    No threshold: b's negative prompt is the per-sample threshold. Returns a bool mask [N]."""
    i = torch.arange(len(y_a), device=y_a.device)
    return s_pos_b[i, y_a] > s_neg_b[i, y_a]


# -----------------------------------------------------------------------------
# Phase II: full fine-tuning of the visual encoder + linear head


class FineTuned(nn.Module):
    """Phase II's classifier: a fully trainable copy of a CLIP image tower plus a linear head on
    its normalised projected embedding. With W = logit_scale * t (rows: class text embeddings)
    the head makes step 0 reproduce the prompt classifier logit_scale * cos(v, t_k).
    `vpt` / `adapter` (from a Phase-I model, --fft-init phase1) are copied and trained too."""

    def __init__(self, visual, num_classes, text_weights=None, logit_scale=100.0, vpt=None, adapter=None):
        super().__init__()
        self.visual = copy.deepcopy(visual).requires_grad_(True)  # a copy: the frozen Phase-I backbone stays frozen
        self.vpt = None if vpt is None else nn.Parameter(vpt.detach().clone())
        self.adapter = None if adapter is None else copy.deepcopy(adapter).requires_grad_(True)
        D = self.visual.proj.shape[1] if hasattr(self.visual, "proj") else self.visual.attnpool.c_proj.out_features
        self.head = nn.Linear(D, num_classes)
        if text_weights is not None:
            with torch.no_grad():
                self.head.weight.copy_(logit_scale * text_weights)
                self.head.bias.zero_()

    def features(self, x):
        v = self.visual(x, self.vpt)
        if self.adapter is not None:
            v = self.adapter(v)
        return unit(v)  # [B, D] fp32

    def forward(self, x):
        f = self.features(x)
        with torch.autocast(f.device.type, enabled=False):  # fp32 logits, see similarity()
            return self.head(f)


# -----------------------------------------------------------------------------
# CoFT+: momentum contrast in Phase II, LLM-written class prompts (spec, "CoFT+")


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

    def __init__(self, model, size, mu=0.999, tau=0.07):
        super().__init__()
        self.model = model  # the online FineTuned (trained)
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
        self.enqueue(k, idx)
        return loss


class WithUnlabelled:
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


def read_llm_prompts(path, classnames):
    """A JSON file {class name: [prompt, ...]} -> per-class prompt lists in class order."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise data.DataError(f"cannot read the prompt file {path} ({e}); write it with --write-llm-prompts") from None
    return [validated_prompts(table, classnames, str(path))[c] for c in classnames]


def validated_prompts(table, classnames, source):
    """Every class present with a non-empty list of non-empty strings, else one clear line."""
    if not isinstance(table, dict):
        raise data.DataError(f"{source}: expected a JSON object {{class name: [prompts]}}, got {type(table).__name__}")
    missing = [c for c in classnames if c not in table]
    if missing:
        raise data.DataError(f"{source}: no prompts for {len(missing)} class(es), e.g. {missing[:3]}")
    bad = [c for c in classnames if not isinstance(table[c], list) or not table[c]
           or not all(isinstance(p, str) and p.strip() for p in table[c])]
    if bad:
        raise data.DataError(f"{source}: class(es) {bad[:3]} need a non-empty list of non-empty strings")
    return {c: [p.strip() for p in table[c]] for c in classnames}


def ask_llm(classnames, api_base, model, api_key=None, n=10, chunk=25, retries=3, timeout=120):
    """Ask an OpenAI-compatible chat endpoint (POST {api_base}/chat/completions, standard-library
    HTTP only) for n short visual descriptions per class, `chunk` classes per request. Returns
    {class name: [prompts]}, validated; retries transient failures, then fails in one line."""
    import urllib.error
    import urllib.request
    url = api_base.rstrip("/") + "/chat/completions"
    table = {}
    for start in range(0, len(classnames), chunk):
        names = classnames[start:start + chunk]
        ask = (f"For each of these image classes, write {n} short, varied sentences describing what a photo of it "
               f"looks like, each naming the class. Answer with only a JSON object mapping each class name, "
               f"exactly as given, to a list of {n} strings. Classes: {json.dumps(names)}")
        body = json.dumps({"model": model, "temperature": 0.7,
                           "messages": [{"role": "user", "content": ask}]}).encode()
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        for attempt in range(retries):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as r:
                    reply = json.loads(r.read().decode())
                break
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429 or attempt + 1 == retries:  # a client error will not improve
                    raise data.DataError(f"{url} answered HTTP {e.code} ({e.reason}); check --api-base, --model "
                                         f"and the API key") from None
            except (urllib.error.URLError, OSError, ValueError) as e:
                if attempt + 1 == retries:
                    raise data.DataError(f"cannot get a reply from {url} ({getattr(e, 'reason', e)}) after "
                                         f"{retries} tries; is the endpoint up and --api-base right?") from None
            time.sleep(2 ** attempt)
        try:
            content = reply["choices"][0]["message"]["content"].strip()
            if content.startswith("```"):  # tolerate a fenced code block around the JSON
                content = content.strip("`").removeprefix("json").strip()
            part = json.loads(content)
        except (KeyError, IndexError, TypeError, ValueError):
            raise data.DataError(f"{url} sent a malformed reply (expected a chat completion whose message is a "
                                 f"JSON object of prompt lists): {str(reply)[:120]}") from None
        table.update(validated_prompts(part, names, f"the reply from {url}"))
    return table


def write_llm_prompts(path, classnames, api_base, model, api_key=None, n=10):
    """Generate, validate, then write atomically: a bad reply never leaves a partial file."""
    return write_json(ask_llm(classnames, api_base, model, api_key, n), path)


# -----------------------------------------------------------------------------
# Inference helpers


@torch.no_grad()
def run_over(fn, loader, device, amp):
    """Apply fn to every batch of a (x, y, index) loader and concatenate: (outputs, labels)."""
    outs, ys = [], []
    for x, y, _ in loader:
        with torch.autocast(**amp):
            outs.append(fn(x.to(device, non_blocking=True)).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def accuracy(probs_or_logits, y):
    return 100.0 * (probs_or_logits.argmax(1) == y).float().mean().item()


def fmt(x):
    return "-" if x is None else f"{x:.2f}"


def precision(pseudo, true):
    return 100.0 * (pseudo == true).float().mean().item() if len(pseudo) else None  # None: empty set (JSON has no NaN)


# -----------------------------------------------------------------------------
# The method, end to end


def loader(dataset, batch, shuffle, args, key=(), drop_last=False):
    """train.loader with the stream seed seed_of(--seed, *key): each stage, branch, epoch and
    cycle passes its own key, so a resumed run replays exactly the batches of an uninterrupted one,
    no two stages share a stream, and the numbers do not depend on --workers."""
    return train.loader(dataset, batch, seed_of(args.seed, *key), shuffle, args.workers,
                        args.device.startswith("cuda"), drop_last)


def labelled_shots(y_true, n, seed):
    """The paper's semi-supervised setting (Sec. 4.4): n true-labelled train images per class
    (all of a class's images where it has fewer), drawn at random with `seed`. Returns indices."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for k in range(int(y_true.max()) + 1):
        idx = (y_true == k).nonzero().squeeze(1)
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picked)


def with_labelled(idx, y, labelled, y_true):
    """A pseudo-labelled set (idx, y) joined with the labelled shots, which carry their true
    labels (replacing a pseudo-label where a labelled image was already in the set)."""
    keep = ~torch.isin(idx, labelled)
    return torch.cat([idx[keep], labelled]), torch.cat([y[keep], y_true[labelled]])


def check_args(args):
    """Flag combinations that cannot work, refused before anything is loaded or trained (each
    number's range is checked by the parser)."""
    if args.method == "shots" and not args.labelled_shots:
        raise RunError("--method shots fine-tunes on the labelled shots only: give --labelled-shots N (N > 0)")
    if args.restart and (args.eval_only or args.phase == "2"):
        raise RunError(f"--restart discards the run in --out, so there would be nothing for "
                       f"{'--eval-only' if args.eval_only else '--phase 2'} to use: drop one of them")
    for flag, name in (("--clip", args.clip), ("--fft-backbone", args.fft_backbone)):
        if name and name != "demo" and name not in clip_model.CHECKPOINTS and not Path(name).is_file():
            raise RunError(f"{flag} {name!r} is neither a released model ({', '.join(clip_model.CHECKPOINTS)}), "
                           f"demo, nor a checkpoint file")


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


# -----------------------------------------------------------------------------
# What a run is: its config, and the part of it each stage depends on (train.py, "run folders")

# flags that change how a run goes, never its numbers (results do not depend on --workers or the
# eval batch), and paths whose contents the config records instead (data, LLM prompt file)
HOW = ("device", "workers", "log_every", "eval_batch", "compile", "grad_checkpointing", "resume", "restart",
       "eval_only", "phase", "out", "table", "data_root", "llm_prompts", "write_llm_prompts", "api_base", "llm",
       "prompts_per_class")
# the run's result files, which --restart deletes (grad_norms.json: written by earlier versions only)
OUTPUTS = ("metrics.json", "predictions.pt", "pseudo_labels.pt", "grad_norms.json")

# each stage's record: the settings its result depends on
SEED_SET_KEYS = ("dataset", "data", "clip", "seed", "K", "labelled_shots", "zero_shot_prompts")
SGD_KEYS = ("batch", "weight_decay", "momentum", "warmup_epochs", "clip_grad")
PHASE1_KEYS = SEED_SET_KEYS + SGD_KEYS + ("M", "ctx_init", "vpt_tokens", "vpt", "lam", "detach_neg", "p1_epochs",
                                          "p1_lr")
PHASE2_KEYS = SGD_KEYS + ("method", "rounds", "fft_epochs", "fft_lr", "fft_aug", "fft_init", "fft_backbone",
                          "head_init", "contrast", "gamma", "mu", "tau_c", "queue")


def backbone_id(name):
    """A backbone as a run's config records it: a released model's name (its file's sha256 is
    checked whenever it is loaded), the stand-in's cache file (named by its settings' hash), or a
    checkpoint file's own sha256 (so moving the file does not matter, changing it does)."""
    if name is None or name in clip_model.CHECKPOINTS:
        return name
    if name == "demo":
        return f"demo ({clip_model.standin_path().name})"
    return "sha256:" + clip_model.sha256_of(name)[:16]


def run_config(args, task, prompts):
    """Every setting that can change a number of this run, with the data, the zero-shot prompts
    and the backbones recorded by content."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in HOW and not k.startswith("bench")}
    config.update(data=data.fingerprint(task, args.data_root), clip=backbone_id(args.clip),
                  fft_backbone=backbone_id(args.fft_backbone),
                  zero_shot_prompts=hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16])
    return config


def stage_record(config, tag):
    """The settings stage `tag` depends on: Phase-I models those of S* and of Phase I; a branch
    also Phase II's (and with them the number of rounds before it); the baselines S*'s and Phase II's."""
    keys = PHASE1_KEYS if tag.startswith("phase1") else \
        PHASE1_KEYS + PHASE2_KEYS if tag.startswith("branch") else SEED_SET_KEYS + PHASE2_KEYS
    return {"stage": tag, **{k: config[k] for k in dict.fromkeys(keys)}}


def continues_a_run(args):
    """--resume, --eval-only and --phase 2 continue the run in --out (train.open_run)."""
    return args.resume or args.eval_only or args.phase == "2"


def saved_stage(out, tag, record, args):
    """A finished stage from --out (train.load_stage), or None where it has to be trained; with
    --eval-only or --phase 2 a missing earlier stage is an error."""
    saved = train.load_stage(out, tag, record)
    if saved is None and (args.eval_only or (args.phase == "2" and tag.startswith("phase1"))):
        raise RunError(f"{train.stage_path(out, tag)} not found: "
                       f"{'--eval-only needs a finished run' if args.eval_only else '--phase 2 needs Phase I'} "
                       f"in --out {out} (run without --eval-only / with --phase 1 first)")
    return saved


def finish_stage(out, tag, record, model, norms, clip_grad):
    """Save a trained stage with its record and gradient-norm summary, then drop its epoch
    checkpoint (the stage file supersedes it). Returns the summary."""
    summary = train.grad_norm_summary(norms, clip_grad)
    train.save_stage(out, tag, record, model.state_dict(), grad_norms=summary)
    train.ckpt_path(out, tag).unlink(missing_ok=True)
    return summary


def run(args):
    """Zero-shot -> S* -> Phase I (two models; CoFT+: R rounds) -> collaborative filter ->
    Phase II (CoFT+: + momentum contrast) -> ensemble. Writes metrics.json, config.json,
    pseudo_labels.pt (every seed set and clean set) and predictions.pt (eval-split predictions of
    every model); stages/ holds each finished stage."""
    check_args(args)
    continuing = continues_a_run(args)
    train.check_out(args.out, continuing, args.restart)
    if (args.eval_only or args.phase == "2") and not train.holds_run(args.out):
        raise RunError(f"--out {args.out} holds no run for {'--eval-only' if args.eval_only else '--phase 2'} "
                       f"to use: run {'it' if args.eval_only else '--phase 1'} first")
    device = torch.device(args.device)
    amp, _ = amp_settings(device)
    torch.manual_seed(args.seed)
    T0 = time.time()
    zs_source = "llm" if args.llm_prompts else "ensemble" if args.template_ensemble else "template"
    metrics = {"dataset": args.dataset, "clip": args.clip, "method": "coft+" if args.plus else args.method,
               "seed": args.seed, "eval_split": args.eval_split,
               "parts": {"rounds": args.rounds, "contrast": args.contrast, "zero_shot_prompts": zs_source},
               "grad_norms": {}}
    times = metrics.setdefault("time_s", {})

    task = data.load_task(args.dataset, args.data_root)
    if args.eval_split == "dev" and not task.dev:
        raise data.DataError(f"{args.dataset} has no labelled dev split; use --eval-split test")
    prompts = zero_shot_prompts(task, args)
    config = run_config(args, task, prompts)
    out = train.open_run(args.out, config, continuing, args.restart, OUTPUTS,
                         how={k: v for k, v in vars(args).items() if k in HOW})
    clip, _ = clip_model.load(args.clip, device)
    clip.requires_grad_(False)
    set_grad_checkpointing(clip, args.grad_checkpointing)
    ft_clip = None  # Phase II on another backbone (distillation): loaded and checked now, used in Phase II
    if args.fft_backbone and args.method == "coft":
        ft_clip, _ = clip_model.load(args.fft_backbone, "cpu")
        check_fft_init(args, clip, ft_clip)
    R = clip.visual.resolution
    C = len(task.classnames)
    test_tf = data.make_transform("test", R, task)
    train_eval = data.ImageDataset(task.train, test_tf)  # unlabelled images, test transform
    eval_items = task.dev if args.eval_split == "dev" else task.test
    test_set = data.ImageDataset(eval_items, test_tf)
    # the train split's labels: for the precision diagnostics, and the --labelled-shots images only
    y_true = torch.tensor([label for _, label in task.train])
    labelled = labelled_shots(y_true, args.labelled_shots, seed_of(args.seed, "labelled shots")) \
        if args.labelled_shots else torch.zeros(0, dtype=torch.long)
    if args.labelled_shots:
        metrics["labelled_shots"] = {"per_class": args.labelled_shots, "size": len(labelled)}
    ev = lambda ds: loader(ds, args.eval_batch, False, args)  # noqa: E731
    preds = {}  # eval-split predictions (argmax) of every model, saved for per-image analysis
    print(f"{args.dataset}: {C} classes, {len(task.train)} unlabelled train images, {len(eval_items)} "
          f"{args.eval_split} images; backbone {args.clip} ({R}px) on {device}", flush=True)

    # 0. zero-shot pseudo-labels (Eq. 1) and the seed set S*, joined by any labelled shots
    t = time.time()
    tau = 1.0 / clip.logit_scale.exp().item()  # CLIP's own temperature everywhere
    W = text_classifier(clip, prompts, device)
    zs = lambda x: zero_shot_logits(clip, W, x, tau)  # noqa: E731
    zs_train, _ = run_over(zs, ev(train_eval), device, amp)
    zs_test, y_test = run_over(zs, ev(test_set), device, amp)
    preds["y"], preds["zero_shot"] = y_test, zs_test.argmax(1)
    metrics["zero_shot_acc"] = accuracy(zs_test, y_test)
    metrics["zero_shot_train_label_precision"] = precision(zs_train.argmax(1), y_true)
    seed_idx, seed_y = with_labelled(*topk_per_class(zs_train.softmax(1), args.K), labelled, y_true)
    metrics["seed_set"] = {"size": len(seed_idx), "precision": precision(seed_y, y_true[seed_idx])}
    times["zero_shot"] = time.time() - t
    print(f"zero-shot {args.eval_split} acc {metrics['zero_shot_acc']:.2f}; seed set S*: {len(seed_idx)} images, "
          f"precision {fmt(metrics['seed_set']['precision'])}", flush=True)

    if args.method == "probe":
        metrics["probe_acc"] = linear_probe(clip, train_eval, y_true, test_set, y_test, ev, device, amp)
        print(f"linear probe on frozen features, trained with the TRUE train labels (a ceiling for reference, "
              f"not a label-free method): {metrics['probe_acc']:.2f}", flush=True)
        return finish(metrics, out, T0, preds)

    train_tf = data.make_transform(args.fft_aug, R, task)
    if args.method in ("topk", "shots"):
        # topk: UPL-like self-training baseline, fine-tuned on S* with its zero-shot labels (and any
        # labelled shots); shots: fine-tuned on the labelled shots alone. One branch, same recipe.
        t = time.time()
        idx, y = (seed_idx, seed_y) if args.method == "topk" else (labelled, y_true[labelled])
        branch = train_branch(clip, W if args.head_init == "text" else None, idx, y, task, train_tf,
                              train_eval, device, args, out, args.method, metrics, stage_record(config, args.method))
        logits, _ = run_over(branch, ev(test_set), device, amp)
        metrics[f"{args.method}_acc"] = accuracy(logits, y_test)
        preds[args.method] = logits.argmax(1)
        times["fine_tune"] = time.time() - t
        return finish(metrics, out, T0, preds)

    # 1. Phase I: two PEFT models differing only by seed (Sec. 3.1). Round 1 trains on S*; CoFT+
    # round r (Sec. 3.3.1) relabels everything with each model's round r-1 model, takes that
    # model's own top-K, and restarts from pre-trained CLIP with fresh prompts and VPT.
    t = time.time()
    weak_tf = data.make_transform("weak", R, task)
    sets = [(seed_idx, seed_y), (seed_idx, seed_y)]
    metrics["rounds"], seed_sets = [], []
    for r in range(1, args.rounds + 1):
        peft, scores, log = [], [], {}
        seed_sets.append(list(sets))
        for m in (1, 2):
            idx, y = sets[m - 1]
            log[f"model{m}_seed_set"] = {"size": len(idx), "precision": precision(y, y_true[idx])}
            torch.manual_seed(seed_of(args.seed, "init", r, m))  # fresh prompts / VPT every round
            model = DualPromptModel(clip, task.classnames, args.M, args.ctx_init, args.vpt_tokens,
                                    args.vpt == "deep").to(device)
            ds = data.ImageDataset([task.train[i] for i in idx.tolist()], weak_tf, labels=y.tolist())
            tag = f"phase1_round{r}_model{m}"
            record = stage_record(config, tag)
            saved = saved_stage(out, tag, record, args)
            if saved is not None:
                model.load_state_dict(saved["model"])
                metrics["grad_norms"][tag] = saved["grad_norms"]
            else:
                step = lambda mdl, b, g: phase1_loss(mdl, b[0], b[1], tau, args.lam, args.detach_neg, g)  # noqa: E731
                norms = fit(model, step, lambda e, ds=ds, tag=tag: loader(ds, args.batch, True, args, (tag, e)),
                            args.p1_epochs, args.p1_lr, device, seed_of(args.seed, tag), train.ckpt_path(out, tag),
                            continuing, f"phase I round {r} model {m}", record=record,
                            log_every=args.log_every, **sgd_settings(args))
                metrics["grad_norms"][tag] = finish_stage(out, tag, record, model, norms, args.clip_grad)
            model.eval()
            # each model's scores on all unlabelled images, computed once and used for relabelling
            # (next round) or for both directions of the collaborative filter (last round)
            s_pos, s_neg, t_pos = peft_scores(model, clip, ev(train_eval), device, amp)
            test_scores = peft_scores(model, clip, ev(test_set), device, amp)[0]
            log[f"model{m}_acc"] = accuracy(test_scores, y_test)
            preds[f"round{r}_model{m}"] = test_scores.argmax(1)
            peft.append(model)
            scores.append((s_pos, s_neg, t_pos))
            if r < args.rounds:  # this model's own top-K by its positive-prompt softmax
                sets[m - 1] = with_labelled(*topk_per_class((s_pos / tau).softmax(1), args.K), labelled, y_true)
        metrics["rounds"].append(log)
        print(f"phase I round {r}: " + "; ".join(
            f"model {m}: seed set {log[f'model{m}_seed_set']['size']} (precision "
            f"{fmt(log[f'model{m}_seed_set']['precision'])}), acc {log[f'model{m}_acc']:.2f}" for m in (1, 2)),
            flush=True)
    metrics["phase1_model1_acc"], metrics["phase1_model2_acc"] = log["model1_acc"], log["model2_acc"]
    times["phase1"] = time.time() - t

    # 2a. Generation (model a labels) and validation (model b keeps s+ > s-), both directions
    # (Sec. 3.2.1); labelled shots are kept, with their true labels, in both clean sets.
    t = time.time()
    y_gen = [sc[0].argmax(1) for sc in scores]
    metrics["phase1_agreement"] = 100.0 * (y_gen[0] == y_gen[1]).float().mean().item()
    clean, clean_y = [], []
    for a, b in ((0, 1), (1, 0)):
        mask = collaborative_filter(y_gen[a], scores[b][0], scores[b][1])
        labels = y_gen[a].clone()
        mask[labelled], labels[labelled] = True, y_true[labelled]
        idx = mask.nonzero().squeeze(1)
        clean.append(idx)
        clean_y.append(labels[idx])
        c = metrics[f"clean_set_{a + 1}"] = {
            "size": len(idx), "kept_fraction": 100.0 * len(idx) / len(mask),
            "precision": precision(labels[idx], y_true[idx]), "all_labels_precision": precision(y_gen[a], y_true)}
        print(f"clean set {a + 1} (labels of model {a + 1}, validated by model {b + 1}): {len(idx)}/{len(mask)} kept, "
              f"precision {fmt(c['precision'])} (all labels {fmt(c['all_labels_precision'])})", flush=True)
    times["filter"] = time.time() - t
    atomic_save({"labelled": labelled, "seed_sets": seed_sets, "generated": y_gen, "clean": clean,
                 "clean_labels": clean_y}, out / "pseudo_labels.pt")
    if args.phase == "1":
        return finish(metrics, out, T0, preds)

    # 2b. Full fine-tuning per branch (Sec. 3.2.2), then the test-time ensemble. The encoder is a
    # fresh copy of the pre-trained tower (or of --fft-backbone's, the paper's distillation setting).
    t = time.time()
    if ft_clip is not None:
        ft_clip = ft_clip.to(device)
        set_grad_checkpointing(ft_clip, args.grad_checkpointing)
        R2 = ft_clip.visual.resolution
        ft_train_tf = data.make_transform(args.fft_aug, R2, task)
        ft_test = data.ImageDataset(eval_items, data.make_transform("test", R2, task))
        ft_unlabelled = data.ImageDataset(task.train, data.make_transform("test", R2, task))
        heads = [text_classifier(ft_clip, prompts, device)] * 2  # the new backbone's zero-shot weights
    else:
        ft_clip, ft_train_tf, ft_test, ft_unlabelled = clip, train_tf, test_set, train_eval
        heads = [sc[2].to(device) for sc in scores]  # each Phase-I model's own positive prompts
    probs = []
    for a in range(args.branches):
        init = dict(vpt=None if peft[a].vpt is None else peft[a].vpt.prompts, adapter=peft[a].adapter) \
            if args.fft_init == "phase1" else {}
        branch = train_branch(ft_clip, heads[a] if args.head_init == "text" else None, clean[a], clean_y[a],
                              task, ft_train_tf, ft_unlabelled, device, args, out, f"branch{a + 1}", metrics,
                              stage_record(config, f"branch{a + 1}"), **init)
        logits, _ = run_over(branch, ev(ft_test), device, amp)
        metrics[f"branch{a + 1}_acc"] = accuracy(logits, y_test)
        preds[f"branch{a + 1}"] = logits.argmax(1)
        probs.append(logits.softmax(1))
    ensemble = torch.stack(probs).mean(0)  # the mean of the branches' softmax outputs
    metrics["ensemble_acc"] = accuracy(ensemble, y_test)
    preds["ensemble"] = ensemble.argmax(1)
    times["phase2"] = time.time() - t
    return finish(metrics, out, T0, preds)


def sgd_settings(args):
    return dict(weight_decay=args.weight_decay, momentum=args.momentum, warmup_epochs=args.warmup_epochs,
                clip_grad=args.clip_grad)


def set_grad_checkpointing(clip, on):
    """Recompute transformer blocks in the backward pass (memory for ViT-L/14); ResNet stages are
    not checkpointed."""
    clip.transformer.grad_checkpointing = on
    if clip.cfg.is_vit:
        clip.visual.transformer.grad_checkpointing = on


def zero_shot_prompts(task, args):
    """The zero-shot pass's prompts per class: the dataset's hand-written template (CoFT); with
    CoFT+ the LLM-written prompts of --llm-prompts, or else the ensemble of hand-written
    templates (said so on the console)."""
    if args.llm_prompts:
        return read_llm_prompts(args.llm_prompts, task.classnames)
    if args.template_ensemble:
        if args.plus:
            print(f"CoFT+ without --llm-prompts: the zero-shot pass uses the ensemble of {len(task.templates)} "
                  f"hand-written templates instead of LLM-written prompts", flush=True)
        return class_prompts(task.classnames, task.templates)
    return class_prompts(task.classnames, task.templates[:1])


@torch.no_grad()
def peft_scores(model, clip, loader_, device, amp):
    """A Phase-I model over a loader: (s+ [N, C], s- [N, C], t+ [C, D]), image features computed once."""
    v, _ = run_over(model.image_features, loader_, device, amp)  # [N, D]
    with torch.autocast(**amp):
        t_pos, t_neg = model.prompts(clip)
    t_pos, t_neg = t_pos.float().cpu(), t_neg.float().cpu()
    return similarity(v, t_pos), similarity(v, t_neg), t_pos


def linear_probe(clip, train_set, y_train, test_set, y_test, ev, device, amp, steps=500, weight_decay=1e-4):
    """Reference ceiling: multinomial logistic regression on the frozen, normalised image
    features, fitted with the true train labels (full batch, Adam). Returns test accuracy."""
    encode = lambda x: unit(clip.encode_image(x))  # noqa: E731
    f_train, _ = run_over(encode, ev(train_set), device, amp)
    f_test, _ = run_over(encode, ev(test_set), device, amp)
    head = nn.Linear(f_train.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(f_train * 10), y_train).backward()  # x10: unit-norm features need a larger scale
        opt.step()
    with torch.no_grad():
        return accuracy(head(f_test * 10), y_test)


def train_branch(clip, text_weights, idx, labels, task, train_tf, unlabelled, device, args, out, tag, metrics,
                 record, vpt=None, adapter=None):
    """Phase II for one branch (paper Eq. 7): fine-tune a copy of clip's image tower and a linear
    head with cross-entropy on (x, y_a(x)) for x in the clean set (also the top-K and labelled-shots
    baselines' trainer). CoFT+ (--contrast, Eq. 10): + gamma * InfoNCE on two views of *all*
    unlabelled images, an epoch being one pass over them (WithUnlabelled). Every random stream
    (order, augmentation) is keyed by `tag`, so the two branches never share one."""
    model = FineTuned(clip.visual, len(task.classnames), text_weights, clip.logit_scale.exp().item(),
                      vpt, adapter).to(device)
    saved = saved_stage(out, tag, record, args)
    if saved is not None:
        model.load_state_dict(saved["model"])
        metrics["grad_norms"][tag] = saved["grad_norms"]
        return model.eval()
    if len(idx) == 0:  # the validator rejected every label: nothing to fine-tune on
        print(f"warning: {tag} has an empty training set; it stays at its initialisation", flush=True)
        metrics["grad_norms"][tag] = finish_stage(out, tag, record, model, [], args.clip_grad)
        return model.eval()
    ds = data.ImageDataset([task.train[i] for i in idx.tolist()], train_tf, labels=labels.tolist())
    drop = len(ds) > args.batch  # no tiny last batch (BatchNorm, noisy steps) unless it is the only one
    clean_loader = lambda e, cycle=0: loader(ds, args.batch, True, args, (tag, e, "clean", cycle), drop_last=drop)  # noqa: E731
    if args.contrast:
        views = data.ImageDataset(unlabelled.items, data.TwoViews(train_tf, data.make_transform("strong",
                                  clip.visual.resolution, task)))
        trained = MomentumContrast(model, min(args.queue, len(views)), args.mu, args.tau_c).to(device)
        make_loader = lambda e: WithUnlabelled(  # noqa: E731
            lambda cycle: clean_loader(e, cycle), loader(views, args.batch, True, args, (tag, e, "unlabelled")))

        def step(mdl, b, g):
            l_fft = F.cross_entropy(mdl.model(b[0]), b[1])
            l_cont = mdl(b[3], b[4], b[5])
            return l_fft + args.gamma * l_cont, {"L_FFT": l_fft.detach(), "L_Cont": l_cont.detach()}
    else:
        trained, make_loader = model, clean_loader

        def step(mdl, b, g):
            return F.cross_entropy(mdl(b[0]), b[1]), {}

    if args.compile:  # after every copy is made: a compiled forward is bound to its own module
        for m in ([trained.model.visual, trained.key_model.visual] if args.contrast else [model.visual]):
            m.compile()

    norms = fit(trained, step, make_loader, args.fft_epochs, args.fft_lr, device, seed_of(args.seed, tag),
                train.ckpt_path(out, tag), continues_a_run(args), f"phase II {tag}", record=record,
                log_every=args.log_every, **sgd_settings(args))
    metrics["grad_norms"][tag] = finish_stage(out, tag, record, model, norms, args.clip_grad)
    return model.eval()


def finish(metrics, out, T0, preds):
    """The run's result files, each written atomically (metrics.json last: it marks a finished run)."""
    metrics["time_s"]["total"] = time.time() - T0
    atomic_save(preds, Path(out) / "predictions.pt")
    write_json(metrics, Path(out) / "metrics.json")
    print("metrics: " + json.dumps({k: v for k, v in metrics.items() if k.endswith("acc")}), flush=True)
    return metrics


# -----------------------------------------------------------------------------
# Benchmark: python coft.py --bench


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense


def device_peak_tflops(device):
    """The GPU's dense bf16 peak (for MFU), looked up by name; None where unknown (and on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def vit_flops(cfg, tokens_extra=0, layers=None):
    """Forward FLOPs of the ViT image tower for one image (2 per multiply-add): patch embedding,
    then per block QKV/out projections, attention and the 4x MLP."""
    n = (cfg.image_resolution // cfg.vision_patch_size) ** 2 + 1 + tokens_extra
    w, L = cfg.vision_width, layers or cfg.vision_layers
    patch = 2 * (n - 1) * 3 * cfg.vision_patch_size ** 2 * w
    block = 2 * n * w * (3 * w + w + 8 * w) + 2 * 2 * n * n * w
    return patch + L * block


def bench(args):
    """Times the work of each stage on random weights of real size and synthetic images:
    (a) image tower forward+backward, (b) a Phase-I step (2C prompts, VPT-deep / adapter) broken
    down into text tower, image tower, losses and optimizer, (c) a Phase-II step with and
    without the CoFT+ momentum encoder and queue, (d) the generation pass over N images.
    Prints ms/step, images/s or prompts/s, peak memory, and MFU on GPUs with a known peak."""
    device = torch.device(args.device)
    amp, _ = amp_settings(device)
    cuda = device.type == "cuda"
    peak = device_peak_tflops(device)
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, "
          f"{'bf16' if amp.get('dtype') == torch.bfloat16 else 'fp16' if cuda else 'fp32'}, threads "
          f"{torch.get_num_threads()}, peak bf16 {peak or '-'} TFLOP/s", flush=True)

    def timed(fn, steps=args.bench_steps):
        return time_per_call(fn, steps, device)

    def report(what, sec, mem, n=None, unit="images/s", flops=None):
        rate = f"{n / sec:9.1f} {unit}" if n else " " * 19
        mfu = f"  MFU {100 * flops / sec / (peak * 1e12):5.1f}%" if flops and peak else ""
        mem = "" if mem != mem else f"  peak {mem:8.0f} MiB" + (" (GPU)" if cuda else " (RSS)")
        print(f"  {what:58s} {1000 * sec:9.1f} ms  {rate}{mem}{mfu}", flush=True)

    for name in args.bench_models.split(","):
        torch.manual_seed(0)
        cfg = clip_model.CONFIGS[name]
        clip = clip_model.CLIP(cfg).to(device).eval().requires_grad_(False)
        if args.grad_checkpointing:
            clip.transformer.grad_checkpointing = True
            if cfg.is_vit:
                clip.visual.transformer.grad_checkpointing = True
        R, B = cfg.image_resolution, args.bench_batch
        x = torch.randn(B, 3, R, R, device=device)
        img_flops = vit_flops(cfg) if cfg.is_vit else None
        M = 16 if clip.context_length >= 32 else 4  # the tiny test configurations have a short context
        print(f"{name}: batch {B}, {R}px", flush=True)

        # (a) image tower forward + backward (all weights trainable)
        tower = copy.deepcopy(clip.visual).train().requires_grad_(True)

        def image_step():
            with torch.autocast(**amp):
                loss = tower(x).float().pow(2).mean()
            loss.backward()
        sec, mem = timed(image_step)
        report("(a) image tower fwd+bwd", sec, mem, B, flops=3 * B * img_flops if img_flops else None)
        del tower

        # (b) Phase-I step per class count: text side, image side, loss, optimizer
        for C in [int(c) for c in args.bench_classes.split(",")]:
            names = [f"class number {i}" for i in range(C)]
            model = DualPromptModel(clip, names, M, None, 20, True).to(device)
            y = torch.randint(0, C, (B,), device=device)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
            tokens, _ = model.prompts.prompt_embeddings()

            def text_step(full=False):
                with torch.autocast(**amp):
                    tok, emb = model.prompts.prompt_embeddings()
                    t = clip.encode_text(tok, embeddings=emb, full_length=full).float()
                t.pow(2).mean().backward()

            def img_step():
                with torch.autocast(**amp):
                    v = model.image_features(x).float()
                if v.requires_grad:
                    v.pow(2).mean().backward()

            def full_step():
                with torch.autocast(**amp):
                    loss, _ = phase1_loss(model, x, y, 0.01)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            t_text, _ = timed(text_step)
            t_text_full, _ = timed(lambda: text_step(True))
            t_img, _ = timed(img_step)
            s_pos = torch.randn(B, C, device=device, requires_grad=True)
            s_neg = torch.randn(B, C, device=device, requires_grad=True)
            t_loss, _ = timed(lambda: (loss_l1(s_pos, y, 0.01) + loss_l2(s_pos, s_neg, y, complement_labels(
                y, C), 0.01)).backward())
            t_opt, _ = timed(opt.step)
            t_step, mem = timed(full_step)
            L = int(tokens.argmax(-1).max()) + 1
            report(f"(b) Phase-I step, C={C} (2C={2 * C} prompts, {L}/{clip.context_length} tokens)", t_step, mem, B)
            report(f"      text tower fwd+bwd up to EOT", t_text, float("nan"), 2 * C, "prompts/s")
            report(f"      text tower fwd+bwd at full length (x{t_text_full / t_text:.1f} slower)", t_text_full,
                   float("nan"), 2 * C, "prompts/s")
            report("      image tower with VPT / adapter fwd+bwd", t_img, float("nan"), B)
            report("      losses fwd+bwd", t_loss, float("nan"))
            report("      optimizer step", t_opt, float("nan"))
            del model, opt

        # (c) Phase-II full fine-tuning step, batch B and 2B, with and without momentum contrast
        for b in (B, 2 * B):
            xb = torch.randn(b, 3, R, R, device=device)
            yb = torch.randint(0, 10, (b,), device=device)
            for contrast in (False, True):
                ft = FineTuned(clip.visual, 10).to(device).train()
                mc = MomentumContrast(ft, 4096).to(device).train() if contrast else None
                opt = torch.optim.SGD(ft.parameters(), lr=1e-3, momentum=0.9)

                def ft_step():
                    with torch.autocast(**amp):
                        loss = F.cross_entropy(ft(xb), yb)
                        if mc is not None:
                            loss = loss + mc(xb, xb, torch.arange(b, device=device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sec, mem = timed(ft_step)
                # CE: fwd+bwd of b images; contrast: + fwd+bwd of b queries + fwd of b keys
                flops = (3 * b + (4 * b if contrast else 0)) * img_flops if img_flops else None
                report(f"(c) Phase-II step, batch {b}" + (" + momentum encoder & queue" if contrast else ""),
                       sec, mem, b, flops=flops)
                del ft, mc, opt

        # (d) generation pass: two Phase-I models' image features over N images (inference mode)
        models = [DualPromptModel(clip, ["a", "b"], M, None, 20, True).to(device) for _ in range(2)]
        n_batches = max(args.bench_images // B, 1)

        def generation():
            with torch.inference_mode(), torch.autocast(**amp):
                for _ in range(n_batches):
                    for mdl in models:
                        mdl.image_features(x)
        sec, mem = timed(generation, 1)
        report(f"(d) generation pass, 2 models x {n_batches * B} images", sec, mem, 2 * n_batches * B,
               flops=2 * n_batches * B * img_flops if img_flops else None)
        del clip, models
        if cuda:
            torch.cuda.empty_cache()


def bench_reference(args):
    """Side by side in one process, same weights and inputs: our image tower vs open-clip-torch's
    (forward+backward), and our Phase-I text step (learnable contexts, up to the EOT) vs the same
    prompt embeddings encoded at full length by open-clip-torch's text tower. Needs the package
    open-clip-torch (a test-only dependency)."""
    try:
        import open_clip
    except ImportError:
        raise data.DataError("--bench-ref needs open-clip-torch: pip install open-clip-torch") from None
    device = torch.device(args.device)
    amp, _ = amp_settings(device)

    def timed(fn):
        return time_per_call(fn, args.bench_steps, device)[0]

    def fwd_bwd(fn, *inputs):
        def step():
            with torch.autocast(**amp):
                out = fn(*inputs).float()
            out.pow(2).mean().backward()
        return step

    for name in args.bench_models.split(","):
        torch.manual_seed(0)
        ours = clip_model.CLIP(clip_model.CONFIGS[name]).to(device)
        sd = ours.state_dict()
        ref = open_clip.model.build_model_from_openai_state_dict({k: v.clone() for k, v in sd.items()},
                                                                 cast_dtype=torch.float32).float().to(device)
        ref.load_state_dict(sd)
        ours.train(), ref.train()  # the same mode on both sides (open_clip's builder returns eval mode)
        B, R = args.bench_batch, ours.visual.resolution
        x = torch.randn(B, 3, R, R, device=device)
        t_ours, t_ref = timed(fwd_bwd(ours.encode_image, x)), timed(fwd_bwd(ref.encode_image, x))
        print(f"{name} image tower fwd+bwd, batch {B}: ours {B / t_ours:.2f} images/s, open_clip "
              f"{B / t_ref:.2f} images/s (ours x{t_ref / t_ours:.2f})", flush=True)
        ours.requires_grad_(False)
        ref.requires_grad_(False)
        M = 16 if ours.context_length >= 32 else 4
        for C in [int(c) for c in args.bench_classes.split(",")]:
            pl = PromptLearner(ours, [f"class number {i}" for i in range(C)], M).to(device)

            def ours_text():
                tok, emb = pl.prompt_embeddings()
                return ours.encode_text(tok, embeddings=emb)

            def ref_text():  # open_clip's text tower on the same embeddings, all 77 positions
                tok, emb = pl.prompt_embeddings()
                h = ref.transformer(emb + ref.positional_embedding, attn_mask=ref.attn_mask)
                h = ref.ln_final(h)
                return h[torch.arange(len(tok), device=device), tok.argmax(-1)] @ ref.text_projection

            with torch.no_grad():
                diff = (ours_text() - ref_text()).abs().max().item()
            t_ours, t_ref = timed(fwd_bwd(ours_text)), timed(fwd_bwd(ref_text))
            print(f"{name} Phase-I text step, {2 * C} prompts with learnable contexts: ours (to EOT) "
                  f"{2 * C / t_ours:.1f} prompts/s, open_clip at full length {2 * C / t_ref:.1f} prompts/s "
                  f"(ours x{t_ref / t_ours:.2f}; max feature difference {diff:.1e})", flush=True)


# -----------------------------------------------------------------------------
# CLI


def parser():
    p = train.Parser(description="CoFT: label-free collaborative fine-tuning of CLIP",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="digits", help="digits (offline demo), a CoOp dataset name, imagefolder, cifar10, cifar100")
    a("--data-root", default=None, help="root of the CoOp layout / image folder / CIFAR download dir")
    a("--clip", default="demo", help="RN50 ... ViT-L/14@336px, a checkpoint path, or demo (offline stand-in)")
    a("--out", default="runs/coft")
    a("--method", default="coft", choices=["coft", "topk", "shots", "probe"],
      help="topk: the UPL-like self-training baseline; shots: fine-tune on the --labelled-shots images alone; "
           "probe: linear probe with TRUE labels (ceiling, reference only)")
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--workers", type=number(int, 0), default=None, help="DataLoader workers (default: 8 on CUDA, 0 on CPU)")
    a("--resume", action="store_true",
      help="continue the run in --out (same flags): finished stages are reused, the last epoch checkpoint resumed")
    a("--restart", action="store_true", help="discard the run in --out (config, stages, results) and start over")
    a("--phase", default="all", choices=["all", "1", "2"],
      help="1: zero-shot + Phase I (+ filter) only; 2: Phase II from the Phase-I models saved in --out")
    a("--eval-only", action="store_true", help="evaluate the models saved in --out, train nothing")
    a("--table", nargs="+", metavar="RUN_DIR", help="print a results table of finished runs and exit")
    a("--bench", action="store_true", help="time each stage on random weights of real size and exit")
    a("--bench-ref", action="store_true", help="with --bench: compare with open-clip-torch side by side instead")
    a("--bench-models", default="ViT-B/16,RN50")
    a("--bench-batch", type=number(int, 1), default=None, help="default 64 on GPU, 8 on CPU")
    a("--bench-classes", default=None, help="Phase-I class counts (default 10,100,1000 on GPU, 10,100 on CPU)")
    a("--bench-images", type=number(int, 1), default=None, help="images in the generation pass (default 4096 GPU, 32 CPU)")
    a("--bench-steps", type=number(int, 1), default=None, help="timed steps per figure (default 10 GPU, 2 CPU)")
    a("--compile", action="store_true", help="torch.compile the towers' forward passes")
    a("--grad-checkpointing", action="store_true", help="recompute transformer blocks in backward (memory)")
    a("--log-every", type=number(int, 0), default=20, help="progress line every N steps (0: none)")
    a("--eval-batch", type=number(int, 1), default=256)
    a("--eval-split", default="test", choices=["test", "dev"],
      help="dev: report on the labelled dev split instead (for choosing hyperparameters; never tune on test)")
    # seed set
    a("--K", type=number(int, 1), default=16, help="seed-set images per class")
    a("--labelled-shots", type=number(int, 0), default=0, metavar="N",
      help="semi-supervised setting (paper Sec. 4.4): N true-labelled train images per class join S* and both "
           "clean sets with their true labels")
    # Phase I
    a("--M", type=number(int, 1), default=16, help="context tokens per prompt")
    a("--ctx-init", default=None, help='initialise both contexts from words, e.g. "a photo of a"')
    a("--vpt-tokens", type=number(int, 0), default=20)
    a("--vpt", default="deep", choices=["deep", "shallow"])
    a("--lam", type=number(float, 0), default=1.0, help="weight of L2")
    a("--detach-neg", action="store_true",
      help="DeFT: L2 trains only the negative context (detached s+ and image features)")
    a("--p1-epochs", type=number(int, 1), default=20)
    a("--p1-lr", type=number(float, 0, low_open=True), default=0.03)
    a("--batch", type=number(int, 1), default=64)
    a("--weight-decay", type=number(float, 0), default=5e-4, help="SGD weight decay, both phases")
    a("--momentum", type=number(float, 0, 1, high_open=True), default=0.9, help="SGD momentum, both phases")
    a("--warmup-epochs", type=number(int, 0), default=1, help="linear warm-up before the cosine decay, both phases")
    a("--clip-grad", type=number(float, 0), default=None,
      help="gradient-norm clipping threshold, both phases (0: off); default off (the published recipes), 1.0 for "
           "the demo backbone (chosen on its dev split)")
    # Phase II
    a("--branches", type=int, default=2, choices=[1, 2])
    a("--fft-epochs", type=number(int, 1), default=10)
    a("--fft-lr", type=number(float, 0, low_open=True), default=None,
      help="default 5e-4 (published); 2e-5 for the demo backbone (chosen on its dev split)")
    a("--fft-aug", default="strong", choices=["strong", "weak"])
    a("--fft-init", default="pretrained", choices=["pretrained", "phase1"],
      help="phase1: also carry (and train) the Phase-I VPT / adapter in the fine-tuned encoder")
    a("--fft-backbone", default=None, help="Phase II on another backbone (distillation), e.g. ViT-B/16")
    # CoFT+
    a("--plus", action="store_true", help="CoFT+: --rounds 3 --contrast, and LLM prompts (or the template ensemble)")
    a("--rounds", type=number(int, 1), default=None, help="Phase-I rounds R (default 1; 3 with --plus)")
    a("--contrast", action="store_true", help="momentum contrastive loss on all unlabelled images in Phase II")
    a("--gamma", type=number(float, 0), default=1.0, help="weight of L_Cont")
    a("--mu", type=number(float, 0, 1), default=0.999, help="EMA momentum of the key encoder")
    a("--tau-c", type=number(float, 0, low_open=True), default=0.07, help="InfoNCE temperature tau'")
    a("--queue", type=number(int, 1), default=4096, help="key queue size (capped to the number of unlabelled images)")
    a("--llm-prompts", default=None, help="JSON {class: [prompts]} for the zero-shot pass (CoFT+)")
    a("--template-ensemble", action="store_true", help="zero-shot pass with all hand-written templates")
    a("--write-llm-prompts", default=None, metavar="FILE",
      help="ask an OpenAI-compatible endpoint for class prompts, write FILE and exit (key: $OPENAI_API_KEY)")
    a("--api-base", default="https://api.openai.com/v1")
    a("--llm", default="gpt-4o-mini", help="model name for --write-llm-prompts")
    a("--prompts-per-class", type=number(int, 1), default=10)
    a("--head-init", default="text", choices=["text", "random"])
    return p


def run_summary(m):
    """The numbers of one run that a results table shows (None where they do not apply)."""
    pair = lambda *keys: [m[k] for k in keys if k in m]  # noqa: E731
    kept = [m[f"clean_set_{a}"]["kept_fraction"] for a in (1, 2) if f"clean_set_{a}" in m]
    return {"zero-shot": m["zero_shot_acc"], "S* prec": m["seed_set"]["precision"],
            "kept %": sum(kept) / len(kept) if kept else None,
            "clean prec": [m[f"clean_set_{a}"]["precision"] for a in (1, 2) if f"clean_set_{a}" in m],
            "agree %": m.get("phase1_agreement"),
            "phase I": pair("phase1_model1_acc", "phase1_model2_acc"),
            "branches": pair("branch1_acc", "branch2_acc"),
            "final acc": next((m[k] for k in ("ensemble_acc", "topk_acc", "shots_acc", "probe_acc") if k in m), None),
            "time s": m["time_s"]["total"]}


def table(run_dirs):
    """One line per run (from its metrics.json), then, for runs named <name>-s<seed>, one line per
    name with the mean and standard deviation over seeds."""
    def f(x, sd=None):
        if x is None or x == []:
            return "-"
        if isinstance(x, list):
            return "/".join(f(v) for v in x)
        return f"{x:.1f}" + ("" if sd is None else f"±{sd:.1f}")

    runs, groups = [], {}
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.exists():
            print(f"{d}: no metrics.json (unfinished run)")
            continue
        try:
            m = json.loads(path.read_text())
            summary = run_summary(m)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise RunError(f"{path} is damaged or not from a finished run of this code ({type(e).__name__}: "
                           f"{str(e)[:60]}): rerun it with --resume, or leave it out of --table") from None
        name = Path(d).name
        runs.append((name, m.get("method", "?"), summary))
        groups.setdefault(re.sub(r"-s\d+$", "", name), []).append(runs[-1][2])
    cols = list(runs[0][2]) if runs else []
    rows = [("run", "method", *cols)] + [(n, meth, *(f(v) for v in s.values())) for n, meth, s in runs]
    if any(len(g) > 1 for g in groups.values()):
        rows.append(("", "", *[""] * len(cols)))
        rows.append((f"mean±sd over seeds", "n", *cols))
        for name, g in groups.items():
            cells = []
            for c in cols:
                vals = [sum(v) / len(v) if isinstance(v, list) and v else v for v in (r[c] for r in g)]  # pairs: mean
                vals = [v for v in vals if v is not None and v != []]
                t = torch.tensor(vals, dtype=torch.float64)
                cells.append(f(t.mean().item(), t.std().item() if len(vals) > 1 else None) if vals else "-")
            rows.append((name, str(len(g)), *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows[1:] else []
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        if args.table:
            return table(args.table)
        if args.bench:
            gpu = args.device.startswith("cuda")
            args.bench_batch = args.bench_batch or (64 if gpu else 8)
            args.bench_classes = args.bench_classes or ("10,100,1000" if gpu else "10,100")
            args.bench_images = args.bench_images or (4096 if gpu else 32)
            args.bench_steps = args.bench_steps or (10 if gpu else 2)
            return bench_reference(args) if args.bench_ref else bench(args)
        if args.plus:  # CoFT+ = all three parts; each part alone is its own flag
            args.contrast = True
            args.rounds = args.rounds or 3
            args.template_ensemble = args.template_ensemble or not args.llm_prompts
        args.rounds = args.rounds or 1
        if args.workers is None:
            args.workers = min(8, os.cpu_count() or 1) if args.device.startswith("cuda") else 0
        # real backbones: the published recipes (DeFT / ActiveCLIP: no clipping, Phase-II lr 5e-4); the
        # offline stand-in: the values chosen on the demo's dev split (README, "Offline demo")
        if args.clip_grad is None:
            args.clip_grad = 1.0 if args.clip == "demo" else 0.0
        if args.fft_lr is None:
            args.fft_lr = 2e-5 if args.clip == "demo" else 5e-4
        if args.write_llm_prompts:
            task = data.load_task(args.dataset, args.data_root)
            path = write_llm_prompts(args.write_llm_prompts, task.classnames, args.api_base, args.llm,
                                     os.environ.get("OPENAI_API_KEY"), args.prompts_per_class)
            print(f"wrote prompts for {len(task.classnames)} classes to {path}")
            return None
        return run(args)
    except (data.DataError, clip_model.CLIPError, RunError, OSError) as e:
        # raised in a DataLoader worker, the message carries the worker's traceback: keep its last line
        print(f"error: {str(e).strip().splitlines()[-1].removeprefix('data.DataError: ')}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        where = "" if args.table or args.bench or args.write_llm_prompts else \
            (f": finished stages and the last epoch checkpoint are in {args.out}/stages; the same command with "
             f"--resume continues from there")
        print(f"\ninterrupted{where}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
