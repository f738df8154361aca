"""
VeCAF: vision-language collaborative active fine-tuning (Zhang et al., "VeCAF: Vision-language
Collaborative Active Finetuning with Training Objective Awareness", ACM MM 2024, arXiv
2401.07853; official code github.com/RoyZry98/VeCAF-Pytorch, built on ActiveFT, Xie et al.,
"Active Finetuning: Exploiting Annotation Budget in the Pretraining-Finetuning Paradigm", CVPR 2023).

A labelled pool with captions; in loops, choose the few images most useful for the current
model's training objective, fine-tune on them, repeat with the selection growing by a budget:
  - ActiveFT selection: K learnable centroids in the normalised feature space, pulled towards
    the samples assigned to them and pushed apart from each other; then each centroid takes its
    nearest free sample;
  - objective-aware data selection (ODS): the pull is weighted by the current model's
    per-sample loss on the pool, so selection follows what the model still gets wrong;
  - an ensemble of selectors, combined by matching their centroids;
  - cross-attentive embedding augmentation (CEA): a selected image's embedding moves towards its
    caption's text embedding (e_aug = e - eta * alpha * (e - t)), and the moved features feed the
    next loop's selection; captions describing a target domain prepare selection for it.

    python vecaf.py --dataset cifar10 --data-root DATA --clip ViT-B/16 --percent 1 --loops 5
    python vecaf.py --method activeft ...          a baseline (random, activeft, ods, cea, ensemble, full)
    python vecaf.py --table runs/vecaf/* --plot curves.svg   results table (B2A, accuracy at equal batches)
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads exits quietly (130); from main on, runs.run_cli speaks
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import csv
import json
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoints
import clip_model
import data
import llm
import standin
import ddp
import page
import runs
import train
from clip_model import unit
from runs import number_type, shown
from train import RunError, seed_of

# -----------------------------------------------------------------------------
# ActiveFT selection, objective-aware (ODS)


def log_repulsion(theta, tau):
    """log Z_j = log sum_k exp(theta_k . theta_j / tau) [K] for unit centroids theta [K, D]; the
    theta_k side is detached (ActiveFT's code), so the gradient moves theta_j only."""
    return torch.logsumexp(theta.detach() @ theta.T / tau, dim=0)  # column j: sum over k


def selection_loss(f, theta, tau=0.07, beta=1.0, w=None, weighting="kl", log_z=None):
    """The selection objective on a mini-batch of unit pool features f [B, D] for raw centroids
    theta [K, D] (normalised here). Each sample is assigned to its most similar centroid c(i) and

        J_i = -log( e_i / (e_i + beta * Z_c(i)) ),   e_i = exp(f_i . theta_c(i) / tau)

    (ActiveFT, the paper's Eq. 4 as its code computes it), evaluated in log space. With per-sample
    objective weights w [B] (ODS):
      weighting="kl" (default): the loss is the w-weighted mean of J_i, the weighted-KL reading of
        VeCAF's D_KL(p_L || p_S) with p_L the pool re-weighted by the training objective: a
        high-loss sample pulls its centroid harder;
      weighting="official": w multiplies e_i inside J_i (the official code); since
        dJ_i/d(f.theta) = -(beta Z / (w e + beta Z)) / tau, a large w *weakens* the pull, so this
        variant moves centroids away from high-loss samples."""
    if weighting not in ("kl", "official"):
        raise ValueError(f"weighting must be 'kl' or 'official', not {weighting!r}")
    theta = F.normalize(theta, dim=-1)
    s, c = (f @ theta.T / tau).max(dim=1)  # log e_i [B], assignment c(i) [B]
    log_z = log_repulsion(theta, tau) if log_z is None else log_z
    log_bz = math.log(beta) + log_z[c]  # log(beta Z_c(i)) [B]
    if w is not None and weighting == "official":
        s = s + torch.log(w)
    J = torch.logaddexp(s, log_bz) - s  # [B]
    if w is None or weighting == "official":
        return J.mean()
    return (w * J).sum() / w.sum()


def margins(logits):
    """The current model's margin per sample [N]: its top-1 minus its top-2 logit, at least 1e-4
    (the official code's `margin_false`; the paper names margins beside losses as the training
    objective ODS may read). Unlike the loss it needs no label."""
    top2 = logits.float().topk(2, dim=1).values  # [N, 2]
    return (top2[:, 0] - top2[:, 1]).clamp_min(1e-4)


def objective_weights(values, transform="none"):
    """ODS weights from the current model's per-sample objective [N] (losses or margins): as they
    are (`none`), divided by their mean (`mean`), or through one of the official code's switches:
    `sigmoid`, `log`, `exp`, `normalize` (unit L2 norm over the pool). The paper's p_L re-weights
    the pool by the training objective, so the weights must be positive: a transform that gives a
    weight <= 0 (log of a value below 1) raises ValueError."""
    v = values.float().clamp_min(0)
    if transform == "none":
        w = v + 1e-6  # a sample the model fits perfectly still counts a little
    elif transform == "mean":
        w = v / v.mean().clamp_min(1e-12) + 1e-6
    elif transform in ("sigmoid", "log", "exp"):
        w = getattr(torch, transform)(v)
    elif transform == "normalize":
        w = F.normalize(v + 1e-6, dim=0)
    else:
        raise ValueError(f"unknown weight transform {transform!r}")
    if not bool((w > 0).all() and w.isfinite().all()):
        raise ValueError(f"weights by {transform!r} are not all positive and finite (min {w.min().item():.3g})")
    return w


def optimise_centroids(features, K, seed, iters=300, lr=1e-3, tau=0.07, beta=1.0, batch=None, w=None,
                       weighting="kl"):
    """ActiveFT's centroid optimisation: K centroids initialised at K random pool samples (drawn
    with `seed`), Adam lr 1e-3, `iters` steps, each on a random mini-batch of `batch` pool samples
    (None: the whole pool, as the official CIFAR scripts) so that the assignment's [B, K] matrix,
    not [N, K], is what memory holds. features: [N, D] unit; w: [N] ODS weights or None.
    Returns unit centroids [K, D] (float32, on the features' device)."""
    N = len(features)
    g = torch.Generator().manual_seed(seed)
    theta = features[torch.randperm(N, generator=g)[:K].to(features.device)].float().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(iters):
        if batch is None or batch >= N:
            f, wb = features, w
        else:
            idx = torch.randint(0, N, (batch,), generator=g).to(features.device)
            f, wb = features[idx], None if w is None else w[idx]
        loss = selection_loss(f.float(), theta, tau, beta, wb, weighting)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unit(theta.detach())


@torch.no_grad()
def top_free(centroids, features, free, m, chunk):
    """For each centroid [K, D], its m most similar free samples among features [N, D]: (sims,
    indices) [K, m'], m' = min(m, free count), best first. The pool is scanned in chunks of
    `chunk` samples with a running top-m, so memory holds one [K, chunk] block, never [K, N]."""
    K, m = len(centroids), min(m, int(free.sum()))
    best_s = torch.full((K, 0), -math.inf, device=centroids.device)
    best_i = torch.zeros((K, 0), dtype=torch.long, device=centroids.device)
    for start in range(0, len(features), chunk):
        s = centroids @ features[start:start + chunk].float().T  # [K, chunk]
        s.masked_fill_(~free[start:start + chunk], -math.inf)
        s, i = s.topk(min(m, s.shape[1]), dim=1)  # the chunk's best [K, m]: only these meet the running best
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)  # [K, <= 2m]
        best_s, top = s.topk(min(m, s.shape[1]), dim=1)
        best_i = i.gather(1, top)
    return best_s, best_i


@torch.no_grad()
def nearest_unique(centroids, features, taken=None, m=16, chunk=None):
    """Each centroid takes its nearest free sample, K unique indices [K] (ActiveFT's last step).
    taken: [N] bool, samples already selected in earlier loops (never picked again). In rounds:
    every centroid still without a sample proposes its nearest free one; a sample proposed by
    several goes to the most similar of them (the official code lets centroids choose in index
    order instead; both give every centroid the nearest sample free when it chose). Candidates
    come m at a time from `top_free` (no [N, K] matrix); a centroid whose m are all taken asks
    for 2m more."""
    K, N = len(centroids), len(features)
    free = torch.ones(N, dtype=torch.bool, device=features.device) if taken is None else ~taken.to(features.device)
    if K > int(free.sum()):
        raise ValueError(f"{K} samples to select but only {int(free.sum())} of {N} are not selected yet")
    chunk = chunk or max(1, 2 ** 25 // max(K, 1))  # [K, chunk] at most ~32M similarities
    centroids = centroids.float()
    pick = torch.full((K,), -1, dtype=torch.long, device=features.device)
    todo = torch.arange(K, device=features.device)
    while len(todo):
        sims, cand = top_free(centroids[todo], features, free, m, chunk)  # [k, m]
        active = torch.ones(len(todo), dtype=torch.bool, device=features.device)
        while active.any():
            ok = free[cand] & active[:, None]  # [k, m]: candidates still free
            active &= ok.any(1)
            if not active.any():
                break
            first = ok.float().argmax(1)  # position of each centroid's nearest free candidate
            rows = active.nonzero().squeeze(1)
            s, prop = sims[rows, first[rows]], cand[rows, first[rows]]  # proposals [a]
            # the most similar proposer of each proposed sample wins it (ties: the lower index)
            order = torch.argsort(s, descending=True, stable=True)
            rows, prop = rows[order], prop[order]
            uniq, inverse = torch.unique(prop, return_inverse=True)
            winner = torch.full((len(uniq),), len(rows), device=prop.device).scatter_reduce(
                0, inverse, torch.arange(len(rows), device=prop.device), "amin")
            won = rows[winner]
            pick[todo[won]] = uniq
            free[uniq] = False
            active[won] = False
        todo = todo[pick[todo] < 0]
        m *= 2
    return pick


# -----------------------------------------------------------------------------
# An ensemble of selectors


def min_cost_assignment(cost):
    """The permutation col [n] minimising sum_i cost[i, col[i]] for a square cost [n, n]: the
    Hungarian method with potentials (shortest augmenting paths, O(n^3)), in float64 on the CPU.
    Python steps grow as n^2, so it serves the small K of ensembles (`match`); scipy's
    linear_sum_assignment is its test oracle."""
    a = cost.detach().double().cpu()
    n = a.shape[0]
    u, v = torch.zeros(n + 1, dtype=torch.float64), torch.zeros(n + 1, dtype=torch.float64)
    p = torch.zeros(n + 1, dtype=torch.long)  # p[j]: the row matched to column j (1-based; 0 = none)
    way = torch.zeros(n + 1, dtype=torch.long)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = torch.full((n + 1,), math.inf, dtype=torch.float64)
        used = torch.zeros(n + 1, dtype=torch.bool)
        while True:  # grow the alternating tree from row i until it reaches a free column
            used[j0] = True
            i0 = int(p[j0])
            cur = a[i0 - 1] - u[i0] - v[1:]  # reduced costs of row i0 [n]
            better = ~used[1:] & (cur < minv[1:])
            minv[1:] = torch.where(better, cur, minv[1:])
            way[1:] = torch.where(better, torch.tensor(j0), way[1:])
            free_minv = minv[1:].masked_fill(used[1:], math.inf)
            j1 = int(free_minv.argmin()) + 1
            delta = free_minv[j1 - 1]
            u.index_add_(0, p[used], delta.expand(int(used.sum())))
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:  # augment along the path
            j1 = int(way[j0])
            p[j0] = p[j1]
            j0 = j1
    col = torch.empty(n, dtype=torch.long)
    col[p[1:] - 1] = torch.arange(n)
    return col


def match(reference, other, optimal_up_to=256):
    """A permutation of `other`'s centroids [K, D] onto `reference`'s [K, D] (both unit):
    maximum total cosine similarity (Hungarian) for K <= optimal_up_to; beyond, each reference
    centroid takes its most similar free one (`nearest_unique`'s rounds: O(K^2) similarities,
    no O(K^3) work), a greedy match, not optimal."""
    if len(reference) <= optimal_up_to:
        return min_cost_assignment(-(reference @ other.T)).to(other.device)
    return nearest_unique(reference, other)


def combine(selectors, optimal_up_to=256):
    """VeCAF's ensemble: the centroids of E selectors [E, K, D] (different seeds), each matched
    to the first selector's and averaged, renormalised [K, D] (our rule: the official
    combination is an unexplained extrapolation)."""
    ref = selectors[0]
    total = ref.clone()
    for other in selectors[1:]:
        total += other[match(ref, other, optimal_up_to)]
    return unit(total)


# -----------------------------------------------------------------------------
# Cross-attentive embedding augmentation (CEA)


def cross_attention_weights(e, captions, caption_of, scale):
    """alpha_i [B]: image i's attention on its own caption among the distinct captions
    (softmax_u(scale * e_i . t_u), read at u = caption_of[i]). e: [B, D] unit image embeddings,
    captions: [U, D] unit embeddings of the distinct captions, caption_of: [B] indices into them.
    Identical captions (class-keyword templates) are one key, so alpha does not fall with the
    number of same-class images; scale: the CLIP's own logit scale, the temperature its
    contrastive softmax was trained at."""
    att = torch.softmax(scale * e.float() @ captions.float().T, dim=1)  # [B, U]
    return att.gather(1, caption_of[:, None]).squeeze(1)


def cea(e, captions, caption_of, eta=1.2, scale=100.0, alpha=None):
    """The paper's CEA: e_aug_i = e_i - eta * alpha_i * (e_i - t_i), t_i = captions[caption_of[i]],
    moving a selected image's embedding towards its caption's (eta = 1.2, the official code).
    alpha None: cross-attention weights (`cross_attention_weights`); a number (the official code's
    alpha is 1, a softmax over one key) applies to every image. Returns [B, D], not renormalised
    (selection normalises its features)."""
    t = captions[caption_of]  # [B, D]
    a = cross_attention_weights(e, captions, caption_of, scale)[:, None] if alpha is None else float(alpha)
    return e - eta * a * (e - t)


# -----------------------------------------------------------------------------
# Captions: a file, class keywords, a language model, or a target domain's description


def read_captions(path, pool, root):
    """A JSON file {image: caption} -> the pool's captions [N] in pool order. Keys are image paths
    relative to --data-root or --images (absolute paths are accepted too) or '#<index>' for
    in-memory images (data.item_key); every pool image needs a caption and every key must name a
    pool image, else one line says which and how many."""
    try:
        table = json.loads(Path(path).read_text(), object_pairs_hook=data.json_object)
    except data.DuplicateKey as e:
        raise data.DataError(f"the captions file {path} gives {e.args[0]!r} two captions (JSON would keep only the "
                             f"last): keep one") from None
    except (OSError, ValueError) as e:
        raise data.DataError(f"cannot read the captions file {path} ({type(e).__name__}: {str(e)[:80]}); "
                             f"give a JSON object {{image path: caption}}") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) and v.strip() for v in table.values()):
        raise data.DataError(f"{path}: expected a JSON object {{image path: caption}} whose captions are "
                             f"non-empty strings")

    names = data.PoolNames(pool, root)
    given, written, unknown = {}, {}, []
    for k, v in table.items():
        try:
            i = names.find(k)
        except data.NameIsAmbiguous as e:
            raise data.DataError(f"{path}: the key {k!r} could be the pool's {e.args[0]!r} or {e.args[1]!r} (they "
                                 f"differ only in spaces around them or in Unicode form): write it exactly as its file "
                                 f"is named") from None
        if i is None:
            unknown.append(k)
        elif names.keys[i] in given:  # two spellings of one path ("a.png", "./a.png")
            raise data.DataError(f"the captions file {path} gives one image two captions, as "
                                 f"{written[names.keys[i]]!r} "
                                 f"and {k!r}: keep one")
        else:
            given[names.keys[i]], written[names.keys[i]] = v.strip(), k
    if unknown:
        raise data.DataError(f"{path}: {runs.counted(len(unknown), 'caption key')} not in the train pool, e.g. "
                             f"{sorted(unknown)[0]!r}; keys are image paths relative to --data-root ('#<index>' for "
                             f"in-memory images)")
    keys = names.keys
    missing = [k for k in keys if k not in given]
    if missing:
        raise data.DataError(f"{path}: {len(missing)} of {len(keys)} train images have no caption, e.g. "
                             f"{missing[0]!r}; caption every train image, or leave out --captions (class-keyword "
                             f"captions)")
    return [given[k] for k in keys]


def write_captions(path, pool, hints, root, api_base, model, api_key=None, save_every=50, exif_orientation=True):
    """Captions for the pool from an image-capable model (llm.caption_image, with hints[i], the
    class name of pool image i where its label is known, as a hint; None: no hint), written to
    `path` every `save_every` images and at the end, each time atomically; an existing file's
    captions are kept, so a stopped run continues where it stopped. An existing file that is not
    a JSON object of captions is refused before the first (paid) request, and whatever came back
    is saved before an error or Ctrl-C is reported. Image files are read as training reads them
    (`exif_orientation`: the task's)."""
    path = Path(path)
    done = {}
    if path.exists():
        try:
            done = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"--write-captions {path} exists but is not readable JSON ({type(e).__name__}): move it "
                           f"away, or give another file") from None
        if not isinstance(done, dict) or not all(isinstance(v, str) for v in done.values()):
            raise RunError(f"--write-captions {path} exists but is not a JSON object of captions: move it away, or "
                           f"give another file")
    try:
        for i, (source, _) in enumerate(pool):
            k = data.item_key(source, i, root)
            if k in done:
                continue
            done[k] = llm.caption_image(source, api_base, model, api_key, hint=hints[i],
                                        exif_orientation=exif_orientation)
            if len(done) % save_every == 0:
                runs.write_json(done, path)
    finally:  # also when a request fails or Ctrl-C comes: nothing paid for is lost
        if done:
            runs.write_json(done, path)
    return path


@torch.no_grad()
def encode_texts(clip, texts, device, batch=256):
    """Unit text embeddings [len(texts), D] of free-form captions (truncated to the context)."""
    out = []
    for i in range(0, len(texts), batch):
        tokens = clip_model.tokenize(texts[i:i + batch], clip.context_length, truncate=True).to(device)
        out.append(unit(clip.encode_text(tokens)))
    return torch.cat(out)


def caption_table(clip, task, pool_labels, device, template, ood_captions=None, captions=None):
    """What CEA moves the selected features towards: (t [U, D] unit embeddings of the distinct
    captions, caption_of [N] each pool image's row). --ood-captions: per class, the mean of its
    target-domain captions (prompt ensembling), which replace the in-domain ones; `captions`: the
    pool's captions [N] (--captions, read_captions); otherwise class-keyword captions (`template`,
    --caption-template, with the class name), one per class."""
    if ood_captions or not captions:
        templates = ood_captions or [template]
        return clip_model.text_classifier(clip, clip_model.class_prompts(task.classnames, templates), device), \
            pool_labels.to(device)
    distinct = sorted(set(captions))
    row = {c: u for u, c in enumerate(distinct)}
    return encode_texts(clip, distinct, device), torch.tensor([row[c] for c in captions], device=device)


# -----------------------------------------------------------------------------
# A run: its settings, what its parts share

class Parts(NamedTuple):
    """Which of VeCAF's parts a --method uses."""
    ods: bool  # ODS weights on the selection objective
    cea: bool  # caption-embedding augmentation
    ensemble: bool  # an ensemble of selectors


METHODS = {"vecaf": Parts(True, True, True), "activeft": Parts(False, False, False), "ods": Parts(True, False, False),
           "cea": Parts(False, True, False), "ensemble": Parts(False, False, True),
           "random": Parts(False, False, False), "full": Parts(False, False, False)}


@dataclass(frozen=True)
class Selection:
    """How each loop selects (Sec. 3: ActiveFT's objective with VeCAF's parts, METHODS), from the
    CLI's flags (settings_of)."""
    method: str  # a key of METHODS
    budget: int  # K: new images per loop
    loops: int
    iters: int  # centroid optimisation steps
    select_lr: float  # their Adam lr
    tau: float
    beta: float  # the weight of the repulsion Z
    select_batch: int  # pool samples per centroid step
    ods_objective: str  # what ODS weighs by: the per-sample "loss" or "margin"
    ods_weights: str  # the weights from it (objective_weights)
    ods_weighting: str  # "kl" (the paper's weighted KL) or "official"
    ensemble: int  # E selectors
    optimal_up_to: int  # Hungarian matching up to this K, greedy beyond
    eta: float  # CEA step
    alpha: str  # CEA weight: "attention" or "one"


@dataclass(frozen=True)
class FineTuning:
    """Each loop's fine-tuning (the paper's DeiT recipe), from the CLI's flags (settings_of)."""
    epochs: int
    lr: float
    sgd: train.SGDRecipe
    label_smoothing: float
    aug: str
    head_init: str  # "text" (the zero-shot classifier) or "random"
    eval_grid: int  # evaluate every this many training batches, counted over all loops (the curve's points)
    max_batches: int | None  # --method full: the schedule ends after this many batches


def settings_of(args):
    """The CLI's (resolved) flags -> (Selection, FineTuning)."""
    def of(S):
        return {f: getattr(args, f) for f in S.__dataclass_fields__ if hasattr(args, f)}
    return Selection(**of(Selection)), FineTuning(**of(FineTuning), sgd=train.SGDRecipe(**of(train.SGDRecipe)))


@dataclass
class Run(runs.Run):
    """What a run's parts share, made once by `prepare` (runs.Run: its folder, config, how it
    computes, the seeded loaders, the evaluation pass and a stage; every stage's record is the
    whole config)."""
    task: data.Task
    clip: clip_model.CLIP  # frozen: the pretrained features and the caption embeddings
    pool: data.ImageDataset  # the train split (the pool) under the test transform
    # [N] the pool's labels: the dataset's (a simulated person, who knows every label), or those a
    # person has given in the labels file (--labels), -1 for the images they have not labelled
    y_pool: torch.Tensor
    person: bool  # the labels come from a person (--labels): only the picks' labels are ever read
    labels_file: str | None
    line: dict  # with --labels: pool index -> its line in the labels file (for messages)
    evaluated: data.ImageDataset  # the eval split under the test transform
    y_eval: torch.Tensor | None  # None without a labelled eval split (--images without --check)
    captions: tuple | None  # CEA's targets (caption_table); None for methods without CEA


# -----------------------------------------------------------------------------
# The stages: loops of selection and fine-tuning


def stage_file(run, tag):
    """stages/<tag>.pt, a result without a model (features, a selection): load() gives it if this
    run saved it before under the same settings (else None: compute it), save(dict) writes it."""
    return runs.RecordedFile(runs.stage_path(run.out, tag), run.record(tag), reuse=True)


def pool_features(run):
    """The pretrained image tower's unit features of the pool [N, D] (on the device), the space
    selection works in; computed once per run folder (stages/features.pt)."""
    file = stage_file(run, "features")
    features = file.load()
    if features is None:
        features = {"f": run.outputs(lambda x: unit(run.clip.encode_image(x)), run.pool)}
        file.save(features)
    return features["f"].to(run.device)


@torch.no_grad()
def per_sample_objective(run, model):
    """The current model on every pool image (test transform) -> (cross-entropy [N], margins [N]):
    ODS's training objective, the loss (plain CE, without the training's label smoothing) read
    with the TRUE label of every pool image, selected or not, as the official code evaluates the
    pool with its targets (None where a person labels the picks: they have not labelled the
    pool); or the label-free margin. Each image's logits are reduced in its batch: no N x C matrix."""
    def objective(x, y):  # [B, 2]: the loss at the label, the margin
        logits = model(x).float()
        loss = torch.zeros(len(x), device=x.device) if run.person else F.cross_entropy(logits, y, reduction="none")
        return torch.stack([loss, margins(logits)], 1)
    out = run.outputs(objective, run.pool, with_labels=True)  # [N, 2]
    loss, margin = out.T.contiguous()  # contiguous: a mean over a strided column sums in another order
    return None if run.person else loss, margin


def select(run, selection, loop, model, bank, taken):
    """This loop's K new pool indices [K] (none of them `taken`), saved as stages/select<loop>.pt
    before any fine-tuning so a resumed run does not redo it. random: uniform; otherwise E
    selectors (seeds keyed by loop and selector) optimise centroids on the unit feature bank with
    ODS weights from `model`'s per-sample objective where the method uses them, their centroids are
    combined (E > 1), and each centroid takes its nearest free sample."""
    file = stage_file(run, f"select{loop}")
    done = file.load()
    if done is not None:
        return done["new"].to(run.device), done["diagnostics"]
    t = time.time()
    K = selection.budget
    losses, margin = (None if v is None else v.to(run.device) for v in per_sample_objective(run, model))
    if selection.method == "random":
        free = (~taken).nonzero().squeeze(1)
        g = torch.Generator().manual_seed(seed_of(run.seed, "random", loop))
        new = free[torch.randperm(len(free), generator=g)[:K].to(run.device)]
    else:
        parts = METHODS[selection.method]  # ActiveFT's selection, with these of VeCAF's parts
        f = unit(bank)
        w = None
        if parts.ods:
            try:
                w = objective_weights(losses if selection.ods_objective == "loss" else margin, selection.ods_weights)
            except ValueError as e:
                raise RunError(f"ODS at loop {loop}: {e}: choose another --ods-weights") from None
        centroids = torch.stack([
            optimise_centroids(f, K, seed_of(run.seed, "select", loop, e), selection.iters, selection.select_lr,
                               selection.tau, selection.beta, selection.select_batch, w, selection.ods_weighting)
            for e in range(selection.ensemble if parts.ensemble else 1)])  # [E, K, D]
        norms = centroids.norm(dim=-1)  # unit rows, unless theta overflowed (to inf, NaN or, normalised, 0)
        if not (torch.isfinite(norms) & ((norms - 1).abs() < 1e-3)).all():  # nearest-unique would pick by index
            raise RunError(f"loop {loop}: the centroid optimisation diverged (non-finite centroids) at --select-lr "
                           f"{selection.select_lr:g}: lower it")
        new = nearest_unique(combine(centroids, selection.optimal_up_to), f, taken)
    new = ddp.from_rank0(new)  # torchrun: every process fine-tunes on the very same selection
    # the picks' mean loss against the free pool's: how far selection leans towards what the model gets wrong
    diagnostics = {"select_s": time.time() - t}
    for name, part in (("loss_new", new), ("loss_pool", slice(None)), ("loss_free", ~taken)):
        diagnostics[name] = None if losses is None else losses[part].mean().item()
    file.save({"new": new.cpu(), "diagnostics": diagnostics})
    return new, diagnostics


def fine_tune(run, fine_tuning, tag, model, idx, evaluate, before):
    """The fine-tuning of one loop (the paper's recipe on the model CoFT's Phase II also trains:
    clip_model.ImageClassifier, the image tower + a linear head): cross-entropy with label
    smoothing on the selected pool images idx with their labels (run.y_pool), by fine_tuning.sgd (SGD with momentum,
    warm-up + cosine) for fine_tuning.epochs (or fine_tuning.max_batches), continuing from `model` (the previous
    loop'run). `evaluate(model)` runs after every batch that ends on the grid, fine_tuning.eval_grid batches
    counted over all loops (`before`: the earlier loops' batches), so that every run, whatever its
    epoch length, is measured at the same batch counts; and after the loop's last batch.
    Returns fit's history."""
    augment = data.make_transform(fine_tuning.aug if fine_tuning.aug != "none" else "test", run.clip.visual, run.task)
    train_set = data.ImageDataset([run.task.train[i] for i in idx.tolist()], augment,
                                  labels=run.y_pool[idx.cpu()].tolist(), exif_orientation=run.task.exif_orientation)

    def batches(epoch):
        return run.train_loader(train_set, fine_tuning.sgd.batch, (tag, epoch))

    def loss(model, b, _):  # cross-entropy with label smoothing on a batch (x, y, index)
        return {"CE": (F.cross_entropy(model(b[0]), b[1], label_smoothing=fine_tuning.label_smoothing), len(b[1]))}

    def on_grid(step, total):
        return (before + step) % fine_tuning.eval_grid == 0 or step == total

    record = run.record(tag)
    if run.person:  # an epoch checkpoint resumes only under the labels it was trained with
        record["labels"] = data.labels_digest(idx, run.y_pool[idx.cpu()])
    # the loop's stage file (its model, the selection, the curve) is written by active_finetuning
    return run.stage(tag, model, loss, batches, epochs=fine_tuning.epochs, lr=fine_tuning.lr, recipe=fine_tuning.sgd,
                     record=record, evaluate=evaluate, evaluate_at=on_grid, max_steps=fine_tuning.max_batches,
                     finished_file=False)


def last_finished(run, loops):
    """The last loop whose stage file exists (0: none)."""
    return max((l for l in range(1, loops + 1) if runs.stage_path(run.out, f"loop{l}").exists()), default=0)


def active_finetuning(run, selection, fine_tuning):
    """The loops (paper Sec. 3 and its experimental setting): per loop, select --budget new pool images
    (earlier picks stay selected), move the new picks' features towards their captions (CEA,
    where the method uses it: the moved features feed the next loops' selection), then fine-tune
    the current model on everything selected so far. Accuracy on the eval split is measured
    against the number of training batches. Every loop is saved (stages/loop<l>.pt: the model,
    the selection, the moved features, the curve) and each epoch checkpointed, so --resume
    continues exactly. --method full: one loop on the whole pool."""
    N = len(run.y_pool)
    W = clip_model.text_classifier(run.clip, data.zero_shot_prompts(run.task), run.device) \
        if fine_tuning.head_init == "text" else None
    model = clip_model.ImageClassifier(run.clip.visual, len(run.task.classnames), W,
                                       run.clip.logit_scale.exp().item()).to(run.device)

    def evaluate(model):  # None without a labelled eval split: the curve then holds batch counts only
        return None if run.y_eval is None else train.accuracy(run.outputs(model, run.evaluated), run.y_eval)

    bank = pool_features(run) if selection.method != "full" else None  # [N, D]; CEA moves the selected rows
    selected = torch.zeros(0, dtype=torch.long, device=run.device)
    curve, loops = [[0, evaluate(model)]], []  # (training batches so far, eval accuracy)
    run.metrics["zero_shot_acc"] = curve[0][1]
    done = last_finished(run, selection.loops)
    if done:  # continue after the last finished loop (its file holds everything so far)
        saved = runs.load_stage(run.out, f"loop{done}", run.record(f"loop{done}"), model)
        selected, curve, loops = saved["selected"].to(run.device), saved["curve"], saved["loops"]
        if run.person:
            labels_of_finished_loops(run, selected.cpu(), saved["labels"], loops)
        if bank is not None:
            bank[selected] = saved["bank_rows"].to(run.device)
        print(f"{'loop 1' if done == 1 else f'loops 1-{done}'}: loaded from {run.out}/stages", flush=True)
    for loop in range(done + 1, selection.loops + 1):
        cost = train.StageCost(run.device)
        taken = torch.zeros(N, dtype=torch.bool, device=run.device)
        taken[selected] = True
        if selection.method == "full":
            new, diagnostics = torch.arange(N, device=run.device), {}
        else:
            new, diagnostics = select(run, selection, loop, model, bank, taken)
        if (run.y_pool[new.cpu()] < 0).any():  # a person labels the picks before the loop goes on
            ask_for_labels(run, loop, model, new.cpu(), [(x["loop"], x["acc"]) for x in loops if x["acc"] is not None])
        if run.person:
            runs.set_waiting(run.out, None)  # every pick so far is labelled: nothing is asked now
        if selection.method != "full":
            if run.captions is not None:  # CEA on this loop's picks, their captions the attention's keys
                t_all, caption_of = run.captions
                keys, row = caption_of[new].unique(return_inverse=True)
                bank[new] = cea(bank[new], t_all[keys], row, selection.eta, run.clip.logit_scale.exp().item(),
                                None if selection.alpha == "attention" else 1.0)
        selected = torch.cat([selected, new])
        tag = f"loop{loop}"
        before = loops_batches(loops)
        history = fine_tune(run, fine_tuning, tag, model, selected, evaluate, before)
        curve += [[before + step, acc] for step, acc in history["evaluated"]]
        loops.append({"loop": loop, "selected": len(selected), "new": len(new), "acc": curve[-1][1],
                      "batches": before + len(history["loss"]), "classes": len(run.y_pool[selected.cpu()].unique()),
                      "time_s": cost.seconds(), "peak_mib": cost.peak_mib(), **diagnostics})
        runs.save_stage(run.out, tag, run.record(tag), model, selected=selected.cpu(), curve=curve, loops=loops,
                        bank_rows=None if bank is None else bank[selected].cpu(),
                        **({"labels": run.y_pool[selected.cpu()]} if run.person else {}))
        print(f"loop {loop}/{selection.loops}: {len(selected)} selected ({len(new)} new), {loops[-1]['batches']} "
              f"batches, {run.metrics['eval_split']} acc {shown(curve[-1][1])}", flush=True)
    run.metrics.update(loops=loops, curve=curve, final_acc=curve[-1][1], batches=loops[-1]["batches"],
                       selected=len(selected))
    return model, selected


TO_LABEL_COLUMNS = ("path", "class", "loop", "score", "suggestion")


def to_label_name(loop):
    """The list of loop `loop`'s picks a person is asked to label, in the run folder."""
    return f"to_label_loop{loop}.csv"


def lists(path, keys):
    """Whether the CSV file at `path` lists exactly the images `keys` (item_key spellings) in its
    path column: a list of this loop's picks a person may be filling in."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return {data.csv_untext(r.get("path") or "") for r in csv.DictReader(f)} == set(keys)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def ask_for_labels(run, loop, model, new, accuracy=()):
    """Stop the run for a person: write this loop's picks `new` to OUT/to_label_loop<loop>.csv, a
    form to fill in (path as a labels file names it; class: empty for the person, the label where
    the labels file gives one already; loop; score: the current model's margin on it, top-1 minus
    top-2 logit, low where it is unsure; suggestion: its top-1 class), and say what to do next in
    one line. A list there that is an input of this command or that a person changed stays as it
    is (the form goes to the next free name), and one that lists these very picks is used as it
    is (runs.write_for_person); the run never deletes a list. The selection is saved
    (stages/select<loop>.pt), so the run, once the labels are given, goes on from here exactly."""
    with torch.no_grad():
        logits = run.outputs(model, torch.utils.data.Subset(run.pool, new.tolist()))  # [n, C]
    score, suggestion = margins(logits).tolist(), logits.argmax(1).tolist()
    keys = [data.item_key(run.task.train[i][0], i, run.task.root) for i in new.tolist()]
    y = run.y_pool[new].tolist()
    names, text = run.task.classnames, data.csv_text
    rows = [[text(key), text(names[y[j]]) if y[j] >= 0 else "", loop, f"{score[j]:.4f}", text(names[suggestion[j]])]
            for j, key in enumerate(keys)]
    path = runs.write_for_person(run.out, to_label_name(loop), TO_LABEL_COLUMNS, rows, run.inputs,
                                 f"loop {loop}'s list of images to label", keep=lambda p: lists(p, keys))
    runs.set_waiting(run.out, loop, accuracy)  # the page shows the accuracy so far: when more labels stop helping
    todo = sum(label < 0 for label in y)
    if runs.same_file(path, run.labels_file):
        raise runs.Waiting(f"loop {loop} selected {runs.counted(len(new), 'image')}, {todo} of them not labelled yet "
                           f"in {path} "
                           f"(--labels): fill in their class cells there, then run the same command again")
    raise runs.Waiting(f"loop {loop} selected {runs.counted(len(new), 'image')}, {todo} of them not labelled yet: "
                       f"fill in the "
                       f"class column of {path} and give that file as --labels (or add rows path,class for them to "
                       f"{run.labels_file}), then run again")


def labels_of_finished_loops(run, selected, trained_on, loops):
    """The labels the finished loops trained on (`trained_on`, their record, for the pool indices
    `selected`) into run.y_pool: a labels file need not repeat them (a person may give back only the
    latest list); a row that gives one of those images another class is refused in one line naming
    it (a finished loop cannot change)."""
    now = run.y_pool[selected]
    changed = ((now >= 0) & (now != trained_on)).nonzero().squeeze(1)
    if len(changed):
        p = int(changed[0])
        i = int(selected[p])
        loop = next(l["loop"] for l in loops if p < l["selected"])
        key, was = data.item_key(run.task.train[i][0], i, run.task.root), run.task.classnames[int(trained_on[p])]
        raise RunError(f"{run.labels_file} line {run.line[i]} gives {key!r} the class "
                       f"{run.task.classnames[int(now[p])]!r}, but loop {loop} trained on {was!r}: put the label "
                       f"back or remove the row (a finished loop cannot change), or --restart")
    run.y_pool[selected] = trained_on


def loops_batches(loops):
    """Training batches of the loops so far."""
    return loops[-1]["batches"] if loops else 0


# -----------------------------------------------------------------------------
# A finished run's classifier, rebuilt from its last loop (deploy.py)


def final_classifier(out, clip, metrics, classnames):
    """A finished run's classifier: the image tower and head fine-tuned in its last loop."""
    state = runs.read_torch(runs.stage_path(out, f"loop{len(metrics['loops'])}"), runs.REDO_STAGE)["model"]
    model = clip_model.ImageClassifier(clip.visual, len(classnames))
    model.load_state_dict(state)
    return model.eval()


# -----------------------------------------------------------------------------
# A run, end to end

# flags config.json leaves out: they change how a run goes, never its numbers (besides
# runs.UNRECORDED_FLAGS); the captions file is recorded by content
UNRECORDED_FLAGS = ("plot", "target", "at_batches", "write_captions", "api_base", "caption_model", "browser", "host")


def end_to_end(args):
    """The loops, then the final model's predictions; writes metrics.json and predictions.pt."""
    run, (selection, fine_tuning) = prepare(args)  # the parts see these settings, never the flags
    model, selected = active_finetuning(run, selection, fine_tuning)
    predictions = {"selected": selected.cpu()}
    if run.y_eval is not None:
        predictions.update(y=run.y_eval, final=run.outputs(model, run.evaluated).argmax(1))
    print(f"{selection.method}: {shown(run.metrics['final_acc'])} on {run.metrics['eval_split']} after "
          f"{run.metrics['batches']} batches on {run.metrics['selected']} of {len(run.y_pool)} pool images", flush=True)
    return runs.finish_run(run.out, run.metrics, predictions, run.t0)


def with_the_page(args):
    """--browser: the loop with a person in one command. Where the run stops for labels (runs.Waiting,
    the script's exit status 3), the page serves what it asks for (page.label_until_done) and, once
    every image asked for is labelled, the same command runs again in this process: the run goes on
    exactly as a person rerunning it would make it go on."""
    while True:
        try:
            return end_to_end(resolve_defaults(args))
        except runs.Waiting:
            if not page.label_until_done(args.out, args.host):  # a page with nothing to ask would loop forever
                raise RunError(f"the run waits for labels that {args.labels} gives every image it asks for, as the "
                               f"page reads it: check that file's rows for these images (OUT/to_label_loop<N>.csv)")


def check_args(args, pool_size):
    """The budget against the pool and the flag combinations, before anything is loaded."""
    total = args.budget * args.loops
    if args.method != "full" and total > pool_size:
        raise RunError(f"{runs.counted(args.loops, 'loop')} of {runs.counted(args.budget, 'image')} select {total} but "
                       f"the pool ({data.train_images_of(args.dataset)}) has {pool_size}: lower --percent / --budget or "
                       f"--loops")
    if not METHODS[args.method].cea:  # refused rather than accepted, recorded and ignored
        for flag, value in (("--ood-captions", args.ood_captions), ("--captions", args.captions)):
            if value:
                raise RunError(f"{flag} feeds CEA, which --method {args.method} does not use: drop it, or use "
                               f"--method vecaf or cea")
    if not METHODS[args.method].ods:
        for flag, value, default in (("--ods-objective", args.ods_objective, None),
                                     ("--ods-weights", args.ods_weights, "none"),
                                     ("--ods-weighting", args.ods_weighting, "kl")):
            if value != default:
                raise RunError(f"{flag} sets ODS's weights, which --method {args.method} does not use: drop it, "
                               f"or use --method vecaf or ods")
    if args.max_batches is not None:
        if args.method != "full":
            raise RunError(f"--max-batches trains the full-data reference to a budget; --method {args.method}'s "
                           f"batches follow --loops, --epochs and --budget: drop it, or use --method full")
        per_epoch = pool_size // args.batch if pool_size > args.batch else 1  # train_loader drops a last short batch
        if args.max_batches > args.epochs * per_epoch:
            raise RunError(f"--max-batches {args.max_batches} is more than --epochs {args.epochs} x {per_epoch} "
                           f"batches per epoch: raise --epochs to at least {-(-args.max_batches // per_epoch)}")
    for t in args.ood_captions or []:  # str.format would fail later, after the features are computed
        data.check_template(t, "--ood-captions")
    data.check_template(args.caption_template, "--caption-template")
    if args.browser and not args.labels:
        raise RunError("--browser shows a person the images to label: give the labels file they go to, --labels FILE")
    if args.browser and ddp.world()[1] > 1:
        raise RunError("--browser runs in one process: under torchrun the run stops for labels (exit status 3); "
                       "label with python page.py label OUT, then run the same command again")
    if args.labels and args.ods_objective == "loss":
        raise RunError("--ods-objective loss reads the label of every pool image, and a person labels only the "
                       "picks (--labels): use --ods-objective margin (the default with --labels)")
    if args.captions and not Path(args.captions).is_file():
        raise RunError(f"--captions {args.captions}: no such file; give a JSON file {{image path: caption}}, or "
                       f"leave it out for class-keyword captions")


def prepare(args):
    """The checks, the run folder and the backbone, cheap mistakes first -> (Run, (Selection,
    FineTuning))."""
    device = runs.start_processes(args.device)  # torchrun: join the job (plain python: nothing to join)
    standin.check_backbone("--clip", args.clip, args.clip_act)
    # a run stopped to wait for a person's labels goes on with the same command, no --resume needed
    waiting = runs.person_record(args.out)["waiting"] is not None and not (Path(args.out) / "metrics.json").exists()
    resume = args.resume or (waiting and not args.restart)
    runs.check_out(args.out, resume, args.restart, runs.input_files(args))
    t0 = time.time()
    task = ddp.rank0_first(lambda: data.task_of(args))  # rank 0 fills the digest cache the others then read
    eval_items = data.eval_items(task, args.eval_split)
    args = resolve_task_defaults(runs.with_precision(args, device), task)
    check_args(args, len(task.train))
    args.ods_objective = args.ods_objective or ("margin" if args.labels else "loss")
    y_pool, labels = pool_labels(task, args.labels)
    # read and checked now, before any work (check_args refuses --captions for methods without CEA)
    pool_captions = read_captions(args.captions, task.train, task.root) if args.captions else None
    config, how = runs.settings(args, UNRECORDED_FLAGS)
    images = data.record(task)
    config.update(data=data.fingerprint(images), clip=standin.backbone_id("--clip", args.clip, args.clip_act))
    if args.captions:  # the file by content
        config["captions"] = "sha256:" + checkpoints.sha256_of(args.captions)[:16]
    if labels is not None:  # it grows between loops: each loop records the labels it trained on
        config["labels"] = "a person's (--labels), checked per loop"
    if resume:  # the images must be those the run was made with (also between two steps with a person)
        data.check_same_images(runs.saved_images(args.out), images, args.out)
    torch.manual_seed(args.seed)
    clip, _ = standin.load("--clip", args.clip, args.clip_act, device)
    clip.requires_grad_(False)
    # every check passed: now --restart
    out = runs.open_run(args.out, config, resume, args.restart, how=how, inputs=runs.input_files(args), images=images)
    test = data.make_transform("test", clip.visual, task)
    captions = caption_table(clip, task, y_pool, device, args.caption_template, args.ood_captions,
                             pool_captions) if METHODS[args.method].cea else None
    metrics = {"dataset": args.dataset, "classnames": task.classnames, "clip": args.clip, "method": args.method,
               "seed": args.seed, "ods_objective": args.ods_objective, "eval_split": args.eval_split,
               "precision": args.precision,
               "budget": args.budget, "eval_grid": args.eval_grid, "max_batches": args.max_batches,
               "loops": args.loops, "pool": len(task.train), "processes": ddp.world()[1], "time_s": {}}
    print(f"{data.named(task.name)}: {len(task.classnames)} classes, pool {len(task.train)}, {len(eval_items)} "
          f"{args.eval_split} images; {args.method}: {runs.counted(args.loops, 'loop')} of "
          f"{runs.counted(args.budget, 'image')}; backbone {args.clip} on {device}, {args.precision}", flush=True)
    if labels is not None:
        print(labels.summary(), flush=True)
        print("labels from a person: selection reads no other label (ODS by the model's margin, CEA's class captions "
              "from the picks' given labels)", flush=True)
    if not eval_items:
        print("no labelled check set (--check): no accuracy is reported", flush=True)
    run = Run(**runs.fields_of(args, out, config, device, resume), task=task, clip=clip,
              pool=data.ImageDataset(task.train, test, exif_orientation=task.exif_orientation), y_pool=y_pool,
              person=labels is not None,
              labels_file=args.labels, line={} if labels is None else labels.line,
              evaluated=data.ImageDataset(eval_items, test, exif_orientation=task.exif_orientation),
              y_eval=torch.tensor([lab for _, lab in eval_items]) if eval_items else None,
              captions=captions, metrics=metrics, t0=t0)
    return run, settings_of(args)


def pool_labels(task, labels_file):
    """The labels the loops may read [N] and the labels file read (or None): with --labels, a
    person's, -1 for the images not labelled yet (a file that does not exist yet: none so far);
    else the dataset's own (a simulated person who knows every label)."""
    if labels_file is None:
        y = data.train_labels(task)
        if y is None:
            raise RunError("VeCAF fine-tunes on the labels of the images it selects, and these images carry none: "
                           "give --labels FILE (it need not exist yet): each loop lists the images to label and "
                           "waits for their rows in FILE")
        return y, None
    labels = data.read_labels(labels_file, task, missing_ok=True)
    y = torch.full((len(task.train),), -1, dtype=torch.long)
    y[labels.index] = labels.y
    return y, labels


def resolve_task_defaults(args, task):
    """Defaults that depend on the data: the per-loop budget K (--budget, else --percent of the
    pool, at least 1; --method full: the whole pool in one loop) and the caption template (the
    dataset's first). Returns a resolved copy of the flags."""
    args = argparse.Namespace(**vars(args))
    pool_size = len(task.train)
    args.caption_template = args.caption_template or task.templates[0]
    if args.method == "full":
        args.loops, args.budget, args.percent = 1, pool_size, 100.0
    elif args.budget is None:
        args.budget = max(1, round(args.percent / 100 * pool_size))
    return args


# -----------------------------------------------------------------------------
# Results: the table (B2A, accuracy at equal batches) and the curves


def accuracy_at(curve, batches):
    """The accuracy last measured at or before `batches` training batches (None: none yet)."""
    accs = [acc for b, acc in curve if b <= batches and acc is not None]
    return accs[-1] if accs else None


def batches_to(curve, target):
    """B2A: the training batches after which the accuracy first reached `target` (None: never)."""
    return next((b for b, acc in curve if acc is not None and acc >= target), None)


def on_grid(curve, grid):
    """The curve's points at multiples of `grid` batches (a loop's last batch may fall between)."""
    return [[b, acc] for b, acc in curve if b % grid == 0]


def is_svg(path):
    """Whether a file is an SVG image (--plot overwrites one, and no other file)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(200).lstrip().startswith(("<svg", "<?xml"))
    except (OSError, UnicodeDecodeError):
        return False


def report(run_dirs, target=0.95, at_batches=None, plot=None):
    """The results table of finished runs: per run the selection size, batches, accuracy after
    loop 1 and at the end; B2A, the batches to reach `target` x the mean final accuracy of the
    full-data runs trained to their whole schedule, read on the runs' common evaluation grid (a
    full-data epoch holds many batches, a selection loop's few; both are measured every
    --eval-grid batches); and the accuracy at an equal number of batches (--at-batches, default
    the fewest batches any selection run trained), for a full-data run only where its schedule
    ends there (--method full --max-batches), never read mid-schedule. --plot FILE: the mean
    accuracy-vs-batches curve of each group of runs (name without -s<seed>) as an SVG."""
    if plot is not None and (not Path(plot).resolve().parent.is_dir() or Path(plot).is_dir()):  # before any work
        raise RunError(f"--plot {plot}: {'is a folder' if Path(plot).is_dir() else 'its folder does not exist'}; give "
                       f"the path of the SVG file to write")
    if plot is not None and Path(plot).exists() and not is_svg(plot):
        raise RunError(f"--plot {plot} exists and is not an SVG file: give a new file name (only an SVG is "
                       f"overwritten)")
    read = runs.finished_runs(run_dirs, tuple(METHODS))
    finished = [(folder.name, m) for folder, m in read]
    for name, m in finished:
        if "curve" not in m:
            raise RunError(f"{name}/metrics.json is not from a finished VeCAF run: leave it out of --table")
        if "eval_grid" not in m:
            raise RunError(f"{name} was evaluated at epoch ends only (made before --eval-grid), so its batch "
                           f"counts are not comparable with other runs': rerun it")
    grids = sorted({m["eval_grid"] for _, m in finished})
    grid = math.lcm(*grids) if grids else 1
    if len(grids) > 1:
        print(f"runs evaluated every {', '.join(map(str, grids))} batches: B2A read on their common grid, "
              f"every {grid} batches")
    full = [m["final_acc"] for _, m in finished if m.get("method") == "full" and m.get("max_batches") is None
            and m["final_acc"] is not None]
    goal = target * sum(full) / len(full) if full else None
    if at_batches is None:
        at_batches = min((m["batches"] for _, m in finished if m.get("method") != "full"), default=None)
    if goal is None:
        print("no full-data run trained to its whole schedule (--method full) among the runs: no B2A target")
    else:
        print(f"B2A target: {target:g} x full-data final accuracy {sum(full) / len(full):.2f} = {goal:.2f}; "
              f"read every {grid} batches")

    def at(m):  # a full-data run's accuracy counts at the budget its schedule ends at, not mid-schedule
        if at_batches is None:
            return None
        if m["method"] == "full":
            return m["final_acc"] if m["batches"] == at_batches else None
        return accuracy_at(m["curve"], at_batches)

    def summarise(m):
        b2a = batches_to(on_grid(m["curve"], grid), goal) if goal is not None else None
        return {"selected": m["selected"], "batches": m["batches"], "loop 1": m["loops"][0]["acc"],
                "final acc": m["final_acc"], "B2A": b2a, "reached": None if goal is None else float(b2a is not None),
                f"acc@{at_batches}": at(m)}
    runs.table(read, summarise)
    if at_batches is not None and any(m.get("method") == "full" for _, m in finished):
        print(f"acc@{at_batches} of full data: runs whose schedule ends at {at_batches} batches only" + (
            "" if any(m.get("method") == "full" and m["batches"] == at_batches for _, m in finished) else
            f"; there is none: add one with --method full --max-batches {at_batches}"))
    if any(METHODS.get(m.get("method"), Parts(False, False, False)).ods and m.get("ods_objective", "loss") == "loss"
           for _, m in finished):
        print("note: ODS weighs the pool by the current model's per-sample loss, which reads the true label of every "
              "pool image, selected or not (as the official code); random and ActiveFT use no label")
    if plot:
        if not mean_curves(finished):
            raise RunError("--plot: none of these runs measured an accuracy (no labelled check set): there is no "
                           "curve to draw")
        print(f"wrote {write_svg(finished, plot, goal)}")


def mean_curves(finished):
    """{group: [(batches, mean accuracy over the group's runs)]}, the group being the run name
    without -s<seed>; runs of one setting are measured at the same batch counts."""
    groups = {}
    for name, m in finished:
        groups.setdefault(runs.seed_group(name), []).append(m["curve"])
    out = {}
    for g, curves in groups.items():
        by_b = {}
        for curve in curves:
            for b, acc in curve:
                if acc is not None:  # a run without a labelled eval split measures nothing
                    by_b.setdefault(b, []).append(acc)
        if by_b:
            out[g] = [(b, sum(a) / len(a)) for b, a in sorted(by_b.items())]
    return out


COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-9) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def write_svg(finished, path, goal=None, size=(720, 440)):
    """Accuracy against training batches, one line per group of runs (the paper's Fig. 1b), as a
    hand-written SVG (no plotting package); `goal`, the B2A target, as a dashed line. Written
    atomically."""
    curves = mean_curves(finished)
    W, H = size
    left, right, top, bottom = 60, 170, 20, 45
    xs = [b for c in curves.values() for b, _ in c]
    ys = [a for c in curves.values() for _, a in c] + ([goal] if goal else [])
    x0, x1 = 0, max(xs) or 1
    y0, y1 = math.floor(min(ys) / 5) * 5, min(100, math.ceil(max(ys) / 5) * 5)
    y1 = y1 if y1 > y0 else y0 + 5

    def X(b):
        return left + (W - left - right) * (b - x0) / (x1 - x0)

    def Y(a):
        return H - bottom - (H - top - bottom) * (a - y0) / (y1 - y0)
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
          f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>']
    for b in nice_ticks(x0, x1):
        el.append(f'<line x1="{X(b):.1f}" y1="{top}" x2="{X(b):.1f}" y2="{H - bottom}" stroke="#eee"/>'
                  f'<text x="{X(b):.1f}" y="{H - bottom + 16}" text-anchor="middle">{b:g}</text>')
    for a in nice_ticks(y0, y1):
        el.append(f'<line x1="{left}" y1="{Y(a):.1f}" x2="{W - right}" y2="{Y(a):.1f}" stroke="#eee"/>'
                  f'<text x="{left - 6}" y="{Y(a) + 4:.1f}" text-anchor="end">{a:g}</text>')
    el.append(f'<rect x="{left}" y="{top}" width="{W - left - right}" height="{H - top - bottom}" fill="none" '
              f'stroke="black"/><text x="{(left + W - right) / 2}" y="{H - 8}" text-anchor="middle">training '
              f'batches</text><text x="14" y="{(top + H - bottom) / 2}" text-anchor="middle" '
              f'transform="rotate(-90 14 {(top + H - bottom) / 2})">accuracy (%)</text>')
    if goal is not None:
        el.append(f'<line x1="{left}" y1="{Y(goal):.1f}" x2="{W - right}" y2="{Y(goal):.1f}" stroke="black" '
                  f'stroke-dasharray="4 3"/><text x="{W - right - 4}" y="{Y(goal) - 4:.1f}" text-anchor="end">'
                  f'B2A target {goal:.1f}</text>')
    for i, (name, c) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{X(b):.1f},{Y(a):.1f}" for b, a in c)
        el.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        ly = top + 10 + 18 * i
        el.append(f'<line x1="{W - right + 6}" y1="{ly + 24}" x2="{W - right + 26}" y2="{ly + 24}" '
                  f'stroke="{colour}" stroke-width="2"/><text x="{W - right + 30}" y="{ly + 28}">{name}</text>')
    el.append("</svg>\n")
    return runs.write_text("\n".join(el), path)


# -----------------------------------------------------------------------------
# CLI


def parser():
    p = runs.Parser(description="VeCAF: objective-aware active fine-tuning of CLIP's image tower",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    data.add_flags(p, "digits (offline demo), digits-bold (its test strokes thickened), a CoOp dataset name, "
                   "imagefolder, cifar10, cifar100")
    a("--labels", default=None, metavar="FILE",
      help="a person labels the picks: a CSV path,class (paths relative to --images / --data-root; the file need "
           "not exist yet). Each loop writes the images to label to OUT/to_label_loop<N>.csv, a form with an "
           "empty class column, and stops (exit status 3); fill it in and give it as --labels (or add its rows "
           "to FILE), and the run goes on. Without it: the dataset's own labels")
    a("--browser", action="store_true",
      help="with --labels: where a loop needs labels, serve a page to label its picks on (this machine's browser, "
           "the address printed), wait until every one is labelled, and go on: the loop in one command")
    a("--host", default="127.0.0.1", help="where --browser's page listens (another address: other machines reach it, "
      "with its token)")
    a("--clip", default="demo", help="demo (the offline stand-in), an OpenAI release (RN50 ... ViT-L/14@336px), "
      "open_clip:ARCH/TAG[=FILE], a Hugging Face CLIPModel folder or hf:ORG/NAME, or a checkpoint file "
      "(with --clip-act)")
    a("--out", default="runs/vecaf")
    a("--method", default="vecaf", choices=list(METHODS),
      help="vecaf: ODS + CEA + ensemble; activeft: the base selection alone; ods / cea / ensemble: ActiveFT with "
           "one of VeCAF's parts; random: uniform picks; full: fine-tuning on the whole pool (one loop)")
    a("--percent", type=number_type(float, 0, 100, low_open=True), default=1.0, help="per-loop budget, %% of the pool")
    a("--budget", type=number_type(int, 1), default=None, help="per-loop budget in images (overrides --percent)")
    a("--loops", type=number_type(int, 1), default=5, help="selection + fine-tuning loops (the selection grows by "
      "the budget each loop; full: 1)")
    runs.run_flags(p)
    a("--eval-split", default="test", choices=["test", "dev"], help="dev: for choosing settings (never test)")
    a("--eval-grid", type=number_type(int, 1), default=None,
      help="evaluate every this many training batches, counted over all loops, and after each loop: the "
           "curve's points, B2A's resolution; runs compared in one table share it (default: 5 for the digits, "
           "100 otherwise)")
    a("--max-batches", type=number_type(int, 1), default=None,
      help="--method full: end the schedule (warm-up + cosine) and training after this many batches, within "
           "--epochs: the full-data reference at an equal number of batches")
    a("--table", nargs="+", metavar="RUN_DIR", help="print a results table of finished runs and exit")
    a("--target", type=number_type(float, 0, 1, low_open=True), default=0.95,
      help="--table: B2A counts the batches to reach this fraction of the full-data runs' final accuracy")
    a("--at-batches", type=number_type(int, 0), default=None,
      help="--table: accuracy at this many batches (default: the fewest any selection run trained)")
    a("--plot", default=None, metavar="FILE.svg",
      help="--table: write the accuracy-vs-batches curves (an existing file only if an SVG)")
    # selection (ActiveFT + ODS + ensemble)
    a("--iters", type=number_type(int, 1), default=300, help="centroid optimisation steps")
    a("--select-lr", type=number_type(float, 0, low_open=True), default=1e-3, help="Adam lr of the centroids")
    a("--tau", type=number_type(float, 0, low_open=True), default=0.07)
    a("--beta", type=number_type(float, 0, low_open=True), default=1.0, help="weight of the repulsion Z")
    a("--select-batch", type=number_type(int, 1), default=65536,
      help="pool samples per centroid step (the whole pool when smaller: CIFAR-size pools)")
    a("--ods-objective", default=None, choices=["loss", "margin"],
      help="ODS weighs the pool by the current model's per-sample loss (which reads every pool image's true "
           "label, as the official code; the default) or by its label-free margin, top-1 minus top-2 logit (the "
           "default with --labels)")
    a("--ods-weights", default="none", choices=["none", "mean", "sigmoid", "log", "exp", "normalize"],
      help="ODS weights from the objective: as it is, over its mean, or one of the official code's transforms")
    a("--ods-weighting", default="kl", choices=["kl", "official"],
      help="kl: w-weighted attraction (the paper's weighted KL); official: w inside e_i (the official code)")
    a("--ensemble", type=number_type(int, 1), default=3, help="selectors E of the ensemble (vecaf, ensemble)")
    a("--optimal-up-to", type=number_type(int, 1), default=256,
      help="centroid matching: Hungarian up to this K, a greedy match beyond")
    # CEA and captions
    a("--eta", type=number_type(float, 0), default=1.2, help="CEA step")
    a("--alpha", default="attention", choices=["attention", "one"],
      help="CEA weight: cross-attention (image query, the batch's caption keys); one: the official code")
    a("--captions", default=None, help="JSON {image path relative to --data-root: caption} ('#<index>' for "
      "in-memory images); default: class-keyword captions")
    a("--caption-template", default=None, help="class-keyword captions (default: the dataset's first template)")
    a("--ood-captions", nargs="+", default=None, metavar="TEMPLATE",
      help="target-domain captions, e.g. 'a bold {}.' 'a sketch of a {}.': CEA moves towards them instead")
    a("--write-captions", default=None, metavar="FILE",
      help="caption the pool with an image-capable model at --api-base, write FILE and exit ($OPENAI_API_KEY)")
    a("--api-base", default="https://api.openai.com/v1")
    a("--caption-model", default="gpt-4o-mini")
    # fine-tuning (the official DeiT recipe)
    a("--epochs", type=number_type(int, 1), default=20, help="fine-tuning epochs per loop")
    a("--batch", type=number_type(int, 1), default=64,
      help="global batch size (ours, for small pools; the official DeiT recipe's is 512, with the lr scaled by "
           "batch / 512); under torchrun each of N processes takes a contiguous 1/N of every batch")
    a("--lr", type=number_type(float, 0, low_open=True), default=None,
      help="SGD lr (default 0.01 x batch / 512, the recipe; 3e-4 for the demo stand-in, chosen on its dev split)")
    a("--momentum", type=number_type(float, 0, 1, high_open=True), default=0.9)
    a("--weight-decay", type=number_type(float, 0), default=1e-4)
    a("--warmup-epochs", type=number_type(int, 0), default=5)
    a("--label-smoothing", type=number_type(float, 0, 1, high_open=True), default=0.1)
    a("--clip-grad", type=number_type(float, 0), default=0.0, help="gradient-norm clipping (0: off)")
    a("--aug", default=None, choices=["none", "weak", "crop", "strong"],
      help="fine-tuning augmentation (default weak; none for the digits, chosen on their dev split)")
    a("--head-init", default="text", choices=["text", "random"],
      help="text: the head starts as the zero-shot classifier (so loop 1's ODS losses mean something)")
    return p


def resolve_defaults(args):
    """Defaults that depend on other flags: the lr by batch (the stand-in's chosen on its dev
    split), the augmentation by dataset, one selector for methods without the ensemble, workers
    by device. Returns a resolved copy of the flags."""
    args = argparse.Namespace(**vars(args))
    args.dataset = data.dataset_name(args)
    demo = args.clip == standin.NAME
    if args.lr is None:  # the recipe's linear scaling; the stand-in's value chosen on the digits' dev split
        args.lr = 3e-4 if demo else 0.01 * args.batch / 512
    digits = args.dataset.lower().startswith("digits")
    if args.aug is None:  # crops of the 32-px digits cost the stand-in accuracy (docs/vecaf.md)
        args.aug = "none" if digits else "weak"
    if args.eval_grid is None:  # per dataset, never per method: every run of a table shares the grid
        args.eval_grid = 5 if digits else 100
    if not METHODS[args.method].ensemble:
        args.ensemble = 1
    if args.workers is None:
        args.workers = train.default_workers(args.device)
    return args


def main(argv=None):
    args = parser().parse_args(argv)

    def body():
        if args.table:
            return report(args.table, args.target, args.at_batches, args.plot)
        if args.write_captions:
            args.dataset = data.dataset_name(args)
            task = data.task_of(args)
            y = pool_labels(task, args.labels)[0] if args.labels else data.train_labels(task)
            hints = [None if y is None or y[i] < 0 else data.prompt_name(task.classnames[y[i]])
                     for i in range(len(task.train))]
            if any(h is None for h in hints):  # the class hint reads a label: only the labels there are
                print(f"{sum(h is None for h in hints)} of {len(hints)} images have no label"
                      f"{' in ' + args.labels if args.labels else ''}: they are captioned without a class hint",
                      flush=True)
            runs.check_not_input(args.write_captions, "--write-captions", runs.input_files(args))
            path = write_captions(args.write_captions, task.train, hints, task.root, args.api_base,
                                  args.caption_model, os.environ.get("OPENAI_API_KEY"),
                                  exif_orientation=task.exif_orientation)
            print(f"wrote captions for {len(task.train)} images to {path}")
            return None
        return with_the_page(args) if args.browser else end_to_end(resolve_defaults(args))
    def where():
        if args.write_captions:
            return f" (the captions so far are in {args.write_captions}; the same command continues)" \
                if Path(args.write_captions).is_file() else " (no captions had been saved yet)"
        return "" if args.table else runs.saved_in(args.out, "finished loops and the last epoch checkpoint")()
    return runs.run_cli(body, where, errors=data.USER_ERRORS)


if __name__ == "__main__":
    main()
