"""VeCAF (vecaf.py): the selection objective, nearest-unique selection, ODS, the ensemble's
matching and CEA, against direct recomputations and hand-made cases."""
import itertools
import math

import pytest
import torch

import vecaf
from clip_model import unit


def pool(n, d=8, seed=0):
    return unit(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


# ---- the selection objective

def direct_loss(f, theta, tau, beta, w=None, weighting=None):
    """J written out sample by sample with plain exponentials (no log-space tricks)."""
    c = theta / theta.norm(dim=1, keepdim=True)
    Z = [sum(math.exp(float(c[k] @ c[j]) / tau) for k in range(len(c))) for j in range(len(c))]
    J = []
    for i in range(len(f)):
        sims = [float(f[i] @ c[j]) for j in range(len(c))]
        j = max(range(len(c)), key=lambda k: sims[k])
        e = math.exp(sims[j] / tau) * (float(w[i]) if weighting == "official" else 1.0)
        J.append(-math.log(e / (e + beta * Z[j])))
    if weighting == "kl":
        return sum(float(w[i]) * J[i] for i in range(len(J))) / float(w.sum())
    return sum(J) / len(J)


@pytest.mark.parametrize("weighting", [None, "kl", "official"])
def test_selection_loss_equals_a_direct_recomputation(weighting):
    f, theta = pool(30, seed=1), torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    w = torch.rand(30, generator=torch.Generator().manual_seed(3)).double() + 0.1 if weighting else None
    for tau, beta in ((0.07, 1.0), (0.5, 2.0)):
        ours = vecaf.selection_loss(f.double(), theta.double(), tau, beta, w, weighting or "kl")
        assert ours.item() == pytest.approx(direct_loss(f.double(), theta.double(), tau, beta, w, weighting), rel=1e-9)


def test_the_repulsion_moves_each_centroid_not_the_others():
    """One side of Z is detached (ActiveFT's code): d log Z_j / d theta_k = 0 for k != j."""
    theta = unit(torch.randn(4, 8, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    vecaf.log_repulsion(theta, 0.07)[0].backward()
    assert theta.grad[0].abs().sum() > 0 and theta.grad[1:].abs().sum() == 0


# ---- nearest-unique selection

def assert_nearest_free(centroids, features, pick, taken):
    """Every pick is unique and not taken before, and every sample more similar to a centroid than
    its pick was gone when it chose: taken earlier or picked by another centroid."""
    assert len(set(pick.tolist())) == len(pick) and not taken[pick].any()
    gone = taken.clone()
    gone[pick] = True
    s = centroids @ features.T
    for i, p in enumerate(pick.tolist()):
        closer = (s[i] > s[i, p]).nonzero().squeeze(1)
        assert gone[closer].all() and not (closer == p).any()


def test_nearest_unique_picks_distinct_nearest_free_samples_and_never_an_earlier_one():
    f = pool(300, seed=0)
    c = unit(f[:40] + 0.05 * torch.randn(40, 8, generator=torch.Generator().manual_seed(1)))  # crowded centroids
    c = torch.cat([c, c[:10]])  # 10 duplicated centroids must still get distinct samples
    taken = torch.zeros(300, dtype=torch.bool)
    taken[torch.arange(0, 300, 7)] = True  # an earlier loop's selection
    pick = vecaf.nearest_unique(c, f, taken)
    assert_nearest_free(c, f, pick, taken)
    # small chunks and candidate lists (running top-m merge, the m-doubling path) give the same picks
    assert torch.equal(vecaf.nearest_unique(c, f, taken, m=1, chunk=7), pick)
    with pytest.raises(ValueError, match="only 8 of 10 are not selected yet"):
        vecaf.nearest_unique(c[:10], f[:10], torch.tensor([True, True] + [False] * 8))


def test_contested_sample_goes_to_the_closer_centroid():
    f = unit(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]))
    c = unit(torch.tensor([[0.9, 0.1], [1.0, 0.05]]))  # both want sample 0; centroid 1 is closer
    assert vecaf.nearest_unique(c, f).tolist() == [1, 0]


# ---- ODS

def angle_of(theta):
    return math.degrees(math.atan2(float(theta[0, 1]), float(theta[0, 0])))


def test_ods_pulls_selection_towards_high_loss_samples_and_the_official_variant_away():
    """Samples spread over a quarter circle; those above 45 degrees have a high loss. One centroid:
    plain ActiveFT settles inside the arc; the weighted-KL reading moves it towards the high-loss
    side; the official variant (w inside e_i weakens a sample's pull) moves it the other way."""
    a = torch.linspace(0, math.pi / 2, 91)
    f = torch.stack([a.cos(), a.sin()], 1)  # [91, 2]
    w = vecaf.objective_weights(torch.where(a > math.pi / 4, 3.0, 0.1))
    kw = dict(K=1, seed=0, iters=400, lr=0.02, tau=0.2)
    plain = angle_of(vecaf.optimise_centroids(f, **kw))
    kl = angle_of(vecaf.optimise_centroids(f, w=w, weighting="kl", **kw))
    official = angle_of(vecaf.optimise_centroids(f, w=w, weighting="official", **kw))
    assert 30 < plain < 60 and kl > plain + 5 and official < plain - 5


def test_mini_batches_cover_the_whole_pool_as_the_full_batch_does():
    f = pool(200, seed=4)
    full = vecaf.optimise_centroids(f, 10, seed=0, iters=50)
    assert torch.equal(vecaf.optimise_centroids(f, 10, seed=0, iters=50, batch=500), full)  # batch >= N: whole pool
    mini = vecaf.optimise_centroids(f, 10, seed=0, iters=50, batch=64)
    assert mini.shape == (10, 8) and torch.allclose(mini.norm(dim=1), torch.ones(10))
    assert torch.equal(vecaf.optimise_centroids(f, 10, seed=0, iters=50, batch=64), mini)  # seeded


# ---- the ensemble

def test_min_cost_assignment_is_optimal():
    g = torch.Generator().manual_seed(0)
    for n in range(1, 7):  # brute force over every permutation
        cost = torch.randn(n, n, generator=g).double()
        best = min(sum(float(cost[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n)))
        col = vecaf.min_cost_assignment(cost)
        assert sorted(col.tolist()) == list(range(n))
        assert float(cost[torch.arange(n), col].sum()) == pytest.approx(best, abs=1e-9)
    scipy = pytest.importorskip("scipy.optimize")
    for n in (20, 100):
        cost = torch.randn(n, n, generator=g).double()
        r, c = scipy.linear_sum_assignment(cost.numpy())
        col = vecaf.min_cost_assignment(cost)
        assert float(cost[torch.arange(n), col].sum()) == pytest.approx(float(cost.numpy()[r, c].sum()), abs=1e-9)


@pytest.mark.parametrize("optimal_up_to", [256, 0])
def test_combine_undoes_each_selectors_order(optimal_up_to):
    ref = pool(12, seed=5)
    g = torch.Generator().manual_seed(6)
    others = [unit(ref[torch.randperm(12, generator=g)] + 0.01 * torch.randn(12, 8, generator=g)) for _ in range(3)]
    combined = vecaf.combine(torch.stack([ref, *others]), optimal_up_to)
    assert (combined * ref).sum(1).min() > 0.999


# ---- CEA

def test_cea_is_the_formula_and_its_special_cases():
    e = pool(6, seed=7)
    T = pool(3, seed=8)
    of = torch.tensor([0, 0, 1, 2, 2, 2])
    scale = 10.0
    alpha = torch.stack([torch.softmax(scale * e[i] @ T.T, 0)[of[i]] for i in range(6)])
    expected = e - 1.2 * alpha[:, None] * (e - T[of])
    assert torch.allclose(vecaf.cea(e, T, of, eta=1.2, scale=scale), expected, atol=1e-6)
    assert torch.equal(vecaf.cea(e, T, of, eta=0.0, scale=scale), e)  # eta = 0 changes nothing
    assert torch.allclose(vecaf.cea(e, T, of, alpha=1.0), e - 1.2 * (e - T[of]))  # the official update
    # one distinct caption: the softmax has one key, alpha = 1, the official update
    one = torch.zeros(6, dtype=torch.long)
    assert torch.allclose(vecaf.cea(e, T[:1], one, scale=scale), e - 1.2 * (e - T[0]), atol=1e-6)
