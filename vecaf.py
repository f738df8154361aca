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
"""
import math

import torch
import torch.nn.functional as F

from clip_model import unit

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


def objective_weights(losses, transform="none"):
    """ODS weights from the current model's per-sample losses [N]: as they are (`none`), through a
    sigmoid (`sigmoid`, the official code's option), or divided by their mean (`mean`), all
    positive. The paper's p_L re-weights the pool by the training objective."""
    losses = losses.float().clamp_min(0)
    if transform == "sigmoid":
        return torch.sigmoid(losses)
    if transform == "mean":
        return losses / losses.mean().clamp_min(1e-12) + 1e-6
    if transform == "none":
        return losses + 1e-6  # a sample the model fits perfectly still counts a little
    raise ValueError(f"unknown weight transform {transform!r}")


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
    `chunk` samples with a running top-m, so memory holds [K, chunk + m], never [K, N]."""
    K, m = len(centroids), min(m, int(free.sum()))
    best_s = torch.full((K, 0), -math.inf, device=centroids.device)
    best_i = torch.zeros((K, 0), dtype=torch.long, device=centroids.device)
    for start in range(0, len(features), chunk):
        s = centroids @ features[start:start + chunk].float().T  # [K, chunk]
        s = s.masked_fill(~free[start:start + chunk], -math.inf)
        i = torch.arange(start, start + s.shape[1], device=s.device).expand(K, -1)
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
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
