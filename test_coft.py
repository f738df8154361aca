"""Tests of coft.py: the building blocks against hand computations, then whole runs on tiny
backbones (end to end, an audit of every saved number, run folders and resume, one-line errors).
Run every test file: python -m pytest -q"""
import copy
import csv
import functools
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoints
import clip_model as cm
import coft
import data
import imagefiles
import runs
import train
from conftest import (coft_args, coft_error, numbers, randomized, run_coft, stage_state, tiny_open_clip, tower,
                      write_digit_layouts, write_labels)


# --------------------------------------------------------------------------- CoFT: building blocks

def test_sec311_seed_set_is_the_top_k_per_class_with_ties_to_the_lower_index():
    probs = torch.tensor([
        [0.9, 0.1, 0.0],   # 0 -> class 0
        [0.6, 0.4, 0.0],   # 1 -> class 0
        [0.6, 0.3, 0.1],   # 2 -> class 0, ties with 1 on confidence
        [0.2, 0.8, 0.0],   # 3 -> class 1
        [0.7, 0.2, 0.1],   # 4 -> class 0
    ])
    idx, y = coft.topk_per_class(*probs.max(1), K=3)
    # class 0: 0 (0.9), 4 (0.7), then the tie 1/2 at 0.6 goes to the lower index; class 1 has 1 < K;
    # class 2 has no candidate at all
    assert idx.tolist() == [0, 4, 1, 3] and y.tolist() == [0, 0, 0, 1]


def random_scores(B=6, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, generator=g) * 2 - 1, torch.rand(B, C, generator=g) * 2 - 1, \
        torch.randint(0, C, (B,), generator=g)


def complements(y, C, seed=0):
    """Complement labels drawn as the Phase-I step draws them: one uniform shift in 1..C-1 per sample."""
    return coft.complement_labels(y, C, torch.randint(1, C, y.shape, generator=torch.Generator().manual_seed(seed)))


def test_eq4_l1_eq5_p_clean_eq6_l2_equal_their_formulas_written_out():
    s_pos, s_neg, y = random_scores()
    tau = 0.1  # direct exp() below stays finite; the implementation is stable at any tau
    yc = complements(y, 5, seed=1)
    assert (yc != y).all() and (yc >= 0).all() and (yc < 5).all()
    # L1: -log softmax of the true class, written out
    l1 = torch.stack([-(s_pos[i, y[i]] / tau - torch.logsumexp(s_pos[i] / tau, 0)) for i in range(6)]).mean()
    assert torch.allclose(coft.loss_l1(s_pos, y, tau), l1, atol=1e-5)
    # p_clean from its definition, then L2 = -[log p_y + log(1 - p_y')]
    e_pos, e_neg = torch.exp(s_pos.double() / tau), torch.exp(s_neg.double() / tau)
    p = e_pos / (e_pos + e_neg)
    assert torch.allclose(coft.p_clean(s_pos, s_neg, tau).double(), p, atol=1e-6)
    l2 = -(torch.log(p[torch.arange(6), y]) + torch.log(1 - p[torch.arange(6), yc])).mean()
    assert torch.allclose(coft.loss_l2(s_pos, s_neg, y, yc, tau).double(), l2, rtol=1e-5)
    # at CLIP's temperature the direct formula overflows in float32; ours stays finite
    assert torch.isfinite(coft.loss_l2(s_pos, s_neg, y, yc, 0.01))


def test_eq6_complement_labels_are_uniform_over_the_other_classes():
    y = torch.zeros(20000, dtype=torch.long)
    yc = complements(y, 5)
    counts = torch.bincount(yc, minlength=5)
    assert counts[0] == 0 and (counts[1:] - 5000).abs().max() < 300


def test_phase1_as_the_loop_runs_it_draws_every_other_class_as_complement_never_the_label(tmp_path, monkeypatch):
    """Eq. 6 as Phase I's stage calls it: across the steps of two tiny Phase-I models, each
    sample's complement label y' is another class than its label y, and every other class (every
    offset (y' - y) mod C in 1 .. C-1) is drawn. A draw that can return y itself (then L2 pushes
    the true class's s- up) or that never reaches some class fails."""
    seen, real = [], coft.phase1_losses

    def recording(model, x, y, y_comp, *a, **kw):
        seen.append((y.clone(), y_comp.clone()))
        return real(model, x, y, y_comp, *a, **kw)
    monkeypatch.setattr(coft, "phase1_losses", recording)
    run_coft(tmp_path, "--phase", "1", "--K", "8", "--p1-epochs", "2", "--batch", "16", "--vpt-tokens", "0")
    y, y_comp = (torch.cat(t) for t in zip(*seen))
    C = 10
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(y) == 2 * 2 * m["seed_set"]["size"] and ((y_comp >= 0) & (y_comp < C)).all()  # 2 models, 2 epochs
    assert (y_comp != y).all()
    assert set(((y_comp - y) % C).tolist()) == set(range(1, C))


def test_eq6_l2_step_raises_p_clean_of_the_label_and_lowers_the_complements():
    """One gradient step on L2 must raise p_clean of the label and lower that of the complement."""
    s_pos, s_neg, y = random_scores(B=1, C=4, seed=3)
    s_pos = (s_pos * 0.01).requires_grad_(True)
    s_neg = (s_neg * 0.01).requires_grad_(True)
    yc = (y + 1) % 4
    tau = 0.01
    before = coft.p_clean(s_pos, s_neg, tau).detach()
    coft.loss_l2(s_pos, s_neg, y, yc, tau).backward()
    with torch.no_grad():
        after = coft.p_clean(s_pos - 1e-3 * s_pos.grad, s_neg - 1e-3 * s_neg.grad, tau)
    assert after[0, y] > before[0, y] and after[0, yc] < before[0, yc]


def test_sec321_filter_keeps_a_label_iff_the_peers_positive_prompt_beats_its_negative():
    """The filter on model b's scores at model a's labels, read from b's features and prompt
    embeddings (scores_at), against the full score matrices by hand."""
    g = torch.Generator().manual_seed(4)
    v, t_pos, t_neg = (cm.unit(torch.randn(n, 8, generator=g)) for n in (50, 7, 7))
    y_a = torch.randint(0, 7, (50,), generator=g)
    s_pos_b, s_neg_b = cm.similarity(v, t_pos), cm.similarity(v, t_neg)  # [50, 7]
    mask = coft.collaborative_filter(coft.scores_at(v, t_pos, y_a), coft.scores_at(v, t_neg, y_a))
    expected = [bool(s_pos_b[i, y_a[i]] > s_neg_b[i, y_a[i]]) for i in range(50)]
    assert mask.tolist() == expected and 0 < sum(expected) < 50


# The method's steps as research code would run them on any CLIP of OpenAI's layout: a Phase-I step
# of two models (with VPT, or a ResNet's adapter), the filter both ways (one image labelled), and
# two CoFT+ Phase-II steps with the queue, the branch carrying model 1's VPT or adapter.
METHOD_STEPS = """
import torch
import coft_method as m


def steps(clip, tokenize, out):
    tau = 1 / clip.logit_scale.exp().item()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    res, models = {}, []
    for k in (1, 2):
        torch.manual_seed(k)
        model = m.DualPromptModel(clip, tokenize, ["cat", "dog", "bird"], M=4, vpt_tokens=2)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
        terms = m.phase1_terms(model, x, y, torch.randint(1, 3, (8,), generator=g), tau, lam=1.0)
        loss = sum(value for value, _ in terms.values())
        loss.backward()
        res[f"phase1 loss {k}"] = loss.detach()
        res.update({f"phase1 grad {k} {n}": p.grad for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        models.append(model)
    with torch.no_grad():
        scores = [m.phase1_scores(*model(x), tau) for model in models]
    for a, d in enumerate(m.filter_both_ways(scores, tau, torch.tensor([5]), torch.tensor([0]))):
        res.update({f"filter {a} {k}": v for k, v in d._asdict().items()})
    peft = models[0]
    ft = m.Phase2Classifier(clip.visual, 3, scores[0].t_pos, 1 / tau, None if peft.vpt is None else peft.vpt.prompts,
                            peft.adapter)
    mc = m.MomentumContrast(ft, size=6, mu=0.9).train()
    opt = torch.optim.SGD([p for p in mc.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for step in range(2):
        terms = m.phase2_contrast_terms(mc, x[:4], y[:4], x[4:], x[4:].flip(-1), torch.arange(4) + 4 * step, 1.0)
        loss = sum(value for value, _ in terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        res[f"phase2 loss {step}"] = loss.detach()
    res.update(queue=mc.queue, queue_idx=mc.queue_idx, head=ft.head.weight.detach(), logits=ft.eval()(x).detach())
    torch.save(res, out)
"""

# Run in a folder holding nothing but the copied method, on another implementation of CLIP whose
# weights come as weights.pt: open_clip's CLIP (conftest.tiny_open_clip's architecture), or OpenAI's
# (its package's clip/model.py, loaded from its file: the package's __init__ needs pkg_resources),
# each with open_clip's tokenizer (OpenAI's BPE and format).
ON_ANOTHER_CLIP = """
import importlib.metadata
import importlib.util
import sys
import torch
import open_clip
from steps import steps
assert not {"clip_model", "data", "train", "runs", "ddp", "standin", "llm", "coft", "checkpoints"} & set(sys.modules)
impl, vit = sys.argv[1], sys.argv[2] == "vit"
if impl == "open_clip":
    vision = dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16) if vit else \\
        dict(image_size=32, layers=(1, 1, 1, 1), width=8)
    clip = open_clip.model.CLIP(32, vision, dict(context_length=16, vocab_size=49408, width=64, heads=1, layers=2))
else:
    spec = importlib.util.spec_from_file_location(
        "openai_clip_model", importlib.metadata.distribution("openai-clip").locate_file("clip/model.py"))
    openai = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(openai)
    clip = openai.CLIP(64, 32, 2 if vit else (1, 1, 1, 1), 64 if vit else 8, 8, 16, 49408, 64, 1, 2)
clip.load_state_dict(torch.load("weights.pt"))
steps(clip.eval().requires_grad_(False), lambda texts: open_clip.tokenize(texts, context_length=16), "theirs.pt")
"""


@pytest.mark.parametrize("impl", ["open_clip", "openai"])
@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_the_method_copied_alone_runs_on_open_clip_and_openais_clip_equal_to_this_projects(tmp_path, tower, impl):
    """The top of coft.py (down to its "Everything above is the method" line), copied alone into an
    empty folder, runs unedited on open_clip's CLIP (batch-first blocks, the causal mask beside
    them) and on OpenAI's (sequence-first blocks holding their mask), ViT and ResNet: a Phase-I
    step of two models, the filter both ways and CoFT+'s Phase-II steps with the queue. The same
    steps on this project's CLIP loaded with the same weights (its shared-prefix text path, its own
    attention) give the same losses, gradients, labels, masks, margins, queue and logits."""
    open_clip = pytest.importorskip("open_clip")
    import importlib.metadata
    import subprocess
    import sys
    if impl == "openai":
        try:
            importlib.metadata.distribution("openai-clip")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("OpenAI's clip package (openai-clip) is not installed")
        sd, known = randomized(f"tiny-{'vit' if tower == 'vit' else 'rn'}").state_dict(), dict(act="quick_gelu")
    else:  # the ViT's 4 heads of 16 are a count its weights do not give
        sd = tiny_open_clip(open_clip, tower == "resnet", quick_gelu=False).state_dict()
        known = dict(act="gelu", **({"vision_heads": 4} if tower == "vit" else {}))
    source = Path(coft.__file__).read_text()
    core = source[:source.index("# ====")]
    assert "Everything above is the method" in source[source.index("# ===="):][:200]
    (tmp_path / "coft_method.py").write_text(core)
    (tmp_path / "steps.py").write_text(METHOD_STEPS)
    (tmp_path / "check.py").write_text(ON_ANOTHER_CLIP)
    torch.save(sd, tmp_path / "weights.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "check.py", impl, tower], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = torch.load(tmp_path / "theirs.pt")
    ours_clip = cm.build_model(sd, **known).requires_grad_(False)
    here = {"__name__": "steps_here"}
    sys.modules["coft_method"] = coft
    try:
        exec(METHOD_STEPS, here)
    finally:
        del sys.modules["coft_method"]
    here["steps"](ours_clip, coft.tokenize_for(ours_clip), tmp_path / "ours.pt")
    ours = torch.load(tmp_path / "ours.pt")
    assert ours.keys() == theirs.keys()
    assert any(k.startswith("phase1 grad 1 vpt" if tower == "vit" else "phase1 grad 1 adapter") for k in ours)
    for k, a in ours.items():
        b = theirs[k]
        if a.dtype in (torch.bool, torch.long):
            assert torch.equal(a, b), k
        else:  # (the adapter's `down` has no gradient at its first step: `up` starts at zero)
            assert (a - b).abs().max() <= 1e-4 * a.abs().max(), k
    zero = [k for k, a in ours.items() if a.is_floating_point() and not a.abs().max() > 0]
    assert zero == [] if tower == "vit" else all(" adapter.down." in k for k in zero)
    assert 0 < ours["filter 0 keep"].sum() < 8 or 0 < ours["filter 1 keep"].sum() < 8  # the filter decides


def tiny_backbone(name="tiny-vit", seed=0):
    return randomized(name, seed=seed).requires_grad_(False)


def auroc_by_pairs(score, positive):
    """AUROC by its definition: over every (positive, negative) pair, 1 if the positive scores
    higher, 1/2 if they tie; in %."""
    pos, neg = score[positive], score[~positive]
    wins = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    return 100.0 * wins.mean().item()


def test_label_steps_blockwise_equal_the_full_score_matrices_ties_included(monkeypatch):
    """The label steps read a few numbers per image, block by block of rows (coft.BLOCK, here 7
    rows): labels and confidences (labels_of), S* (topk_per_class), the filter and its margin,
    the softmax at another model's label (scores_at) and the AUROCs give exactly what the full
    N x C matrices give, written out here as the run computed them before. Integer features:
    every similarity is exact and many tie, in both labels and confidences."""
    C, N, D, tau = 5, 60, 4, 0.5
    monkeypatch.setattr(coft, "BLOCK", 7 * C)
    assert len(coft.row_blocks(N, C)) == 9
    g = torch.Generator().manual_seed(0)
    v_a, v_b, t_pos_a, t_pos_b, t_neg_b = (torch.randint(-2, 3, (n, D), generator=g).float()
                                           for n in (N, N, C, C, C))
    s_pos_a, s_pos_b, s_neg_b = v_a @ t_pos_a.T, v_b @ t_pos_b.T, v_b @ t_neg_b.T  # [N, C], exact
    probs_a = (s_pos_a / tau).softmax(1)
    y_a, conf, y_conf = coft.labels_of(v_a, t_pos_a, tau)
    assert torch.equal(y_a, s_pos_a.argmax(1)) and torch.equal(conf, probs_a.max(1).values)
    assert torch.equal(y_conf, probs_a.max(1).indices)
    ties = (s_pos_a == s_pos_a.max(1, keepdim=True).values).sum(1) > 1
    assert ties.sum() >= 5 and (conf[:, None] == conf[None]).sum() > N + 20  # tied labels and tied confidences
    # S*: per class the K most confident, ties to the lower index (the per-class loop it replaced)
    for K in (1, 3, 100):
        keep = []
        for k in range(C):
            idx = (y_conf == k).nonzero().squeeze(1)
            keep.append(idx[torch.sort(-conf[idx], stable=True).indices[:K]])
        idx, y = coft.topk_per_class(conf, y_conf, K)
        assert torch.equal(idx, torch.cat(keep)) and torch.equal(y, y_conf[idx])
    # the filter, its margin and the diagnosis' scores, at model a's labels
    i = torch.arange(N)
    at_pos, at_neg = coft.scores_at(v_b, t_pos_b, y_a), coft.scores_at(v_b, t_neg_b, y_a)
    assert torch.equal(at_pos, s_pos_b[i, y_a]) and torch.equal(at_neg, s_neg_b[i, y_a])
    keep = coft.collaborative_filter(at_pos, at_neg)
    assert torch.equal(keep, s_pos_b[i, y_a] > s_neg_b[i, y_a]) and 0 < keep.sum() < N
    (at_pos_too, peer), (_, own) = coft.scores_at(v_b, t_pos_b, y_a, tau), coft.scores_at(v_a, t_pos_a, y_a, tau)
    assert torch.equal(peer, (s_pos_b / tau).softmax(1)[i, y_a]) and torch.equal(own, probs_a[i, y_a])
    assert torch.equal(at_pos_too, at_pos) and torch.equal(own, conf)  # the probability at the top label: the top one
    y_true = torch.randint(0, C, (N,), generator=g)
    right = y_a == y_true
    d = coft.filter_diagnosis(y_a, keep, at_pos - at_neg, peer, own, y_true)
    assert d == {"removed_precision": coft.label_precision(y_a[~keep], y_true[~keep]),
                 "auroc_peer_margin": coft.auroc(s_pos_b[i, y_a] - s_neg_b[i, y_a], right),
                 "auroc_peer_confidence": coft.auroc((s_pos_b / tau).softmax(1)[i, y_a], right),
                 "auroc_own_confidence": coft.auroc(probs_a[i, y_a], right)}


def test_auroc_known_answers_ties_and_pairwise_count():
    right = torch.tensor([False, False, True, True])
    assert coft.auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), right) == pytest.approx(75.0)  # 3 of 4 pairs
    assert coft.auroc(torch.tensor([0.1, 0.2, 0.3, 0.4]), right) == pytest.approx(100.0)
    assert coft.auroc(torch.tensor([0.4, 0.3, 0.2, 0.1]), right) == pytest.approx(0.0)
    assert coft.auroc(torch.ones(4), right) == pytest.approx(50.0)  # all tied: chance
    assert coft.auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])) is None  # no wrong label to rank
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 6, (300,), generator=g).float()  # many ties
    positive = torch.rand(300, generator=g) < 0.3 + 0.1 * score  # higher scores more often positive
    assert coft.auroc(score, positive) == pytest.approx(auroc_by_pairs(score, positive), abs=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")  # independent oracle: Mann-Whitney U / (n+ n-)
    u = scipy_stats.mannwhitneyu(score[positive].numpy(), score[~positive].numpy()).statistic
    assert coft.auroc(score, positive) == pytest.approx(100 * u / (positive.sum() * (~positive).sum()).item())


CLASSES = ["zero", "one", "two"]


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_phase1_trains_only_prompts_and_vpt(name):
    clip = tiny_backbone(name)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    torch.manual_seed(0)
    model = coft.DualPromptModel(clip, coft.tokenize_for(clip), CLASSES, M=4, vpt_tokens=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"prompts.ctx_pos", "prompts.ctx_neg"} | (
        {"vpt.prompts"} if name == "tiny-vit" else {"adapter.down.weight", "adapter.down.bias",
                                                     "adapter.up.weight", "adapter.up.bias"})
    assert trainable == expected  # the frozen CLIP is not part of the model's parameters
    assert all(not k.startswith(("visual", "transformer")) for k in model.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # two steps: the adapter's zero-initialised `up` blocks `down`'s first gradient
        opt.zero_grad()
        l1, l2 = coft.phase1_losses(model, x, y, complements(y, 3), tau=0.01)
        (l1 + l2).backward()
        opt.step()
    assert all(not torch.equal(start[n], p) for n, p in model.named_parameters()), "every Phase-I part moves"
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items()), "the backbone must stay frozen"


def test_eq6_l2_reaches_the_visual_prompts_unless_detached_as_in_deft():
    """Gradients of L1 + L2 vs L1 alone. Default: L2 moves the positive context and the visual
    prompts too (the negative prompt regularises the visual modules). --detach-neg (DeFT: p_clean
    from a detached s+ and from image features detached for s-): L2 trains only the negative
    context, so the positive context and the VPT get exactly L1's gradient. The loss value is the
    same either way."""
    clip = tiny_backbone()
    model = coft.DualPromptModel(clip, coft.tokenize_for(clip), CLASSES, M=4, vpt_tokens=3)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))

    def grads(lam, detach):
        model.zero_grad()
        l1, l2 = coft.phase1_losses(model, x, y, complements(y, 3), 0.01, detach)
        loss = l1 + lam * l2
        loss.backward()
        g = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
        return loss.detach(), g

    _, l1 = grads(0.0, False)
    assert l1["prompts.ctx_neg"].abs().sum() == 0  # L1 never sees the negative prompts
    loss_both, both = grads(1.0, False)
    loss_det, det = grads(1.0, True)
    assert torch.equal(loss_both, loss_det)
    for name in ("prompts.ctx_pos", "vpt.prompts"):
        assert not torch.allclose(both[name], l1[name], rtol=1e-3, atol=1e-6), name  # L2 reaches them by default
        assert torch.allclose(det[name], l1[name], rtol=1e-5, atol=1e-8), name  # DeFT: L1's gradient alone
    assert det["prompts.ctx_neg"].abs().sum() > 0 and torch.allclose(det["prompts.ctx_neg"], both["prompts.ctx_neg"])


def test_vpt_zero_tokens_equal_the_plain_vit_and_prompts_enter_as_written():
    """VPT (encode_image_with_prompts) over the ViT layout: no tokens give the tower's own
    features; shallow and deep prompts equal the token sequences built by hand."""
    m = randomized("tiny-vit", vision_layers=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    W = m.visual.conv1.out_channels
    with torch.no_grad():
        plain = m.encode_image(x)
        for depth in (1, 3):
            assert torch.equal(coft.encode_image_with_prompts(m.visual, x, torch.zeros(depth, 0, W)), plain)
        shallow = torch.randn(1, 5, W)
        deep = torch.cat([shallow, torch.randn(2, 5, W)])
        out_s = coft.encode_image_with_prompts(m.visual, x, shallow)
        out_d = coft.encode_image_with_prompts(m.visual, x, deep)
        assert not torch.allclose(out_s, plain) and not torch.allclose(out_s, out_d)
        # shallow prompts are exactly extra tokens after CLS: recompute them by hand
        v = m.visual
        h = v.conv1(x).flatten(2).transpose(1, 2)
        h = torch.cat([v.class_embedding.expand(len(x), 1, -1), h], 1) + v.positional_embedding
        h = v.ln_pre(h)
        h = torch.cat([h[:, :1], shallow.expand(len(x), -1, -1), h[:, 1:]], 1)
        h = v.transformer(h)
        assert (v.ln_post(h[:, 0]) @ v.proj - out_s).abs().max() < 1e-5
        # deep prompts by hand: before block i < D, block i-1's prompt outputs are *replaced* by set i
        h = v.conv1(x).flatten(2).transpose(1, 2)
        h = v.ln_pre(torch.cat([v.class_embedding.expand(len(x), 1, -1), h], 1) + v.positional_embedding)
        for i, block in enumerate(v.transformer.resblocks):
            patches = h[:, 1:] if i == 0 else h[:, 1 + 5:]
            h = block(torch.cat([h[:, :1], deep[i].expand(len(x), -1, -1), patches], 1))
        assert (v.ln_post(h[:, 0]) @ v.proj - out_d).abs().max() < 1e-5
    # deep prompts: every layer's set receives a gradient
    deep.requires_grad_(True)
    coft.encode_image_with_prompts(m.visual, x, deep).sum().backward()
    assert (deep.grad.flatten(1).abs().sum(1) > 0).all()


def test_eq2_eq3_prompts_equal_hand_built_token_sequences():
    """The learner's 2C prompts equal encoding 'X X X X name.' with X's embedding swapped out."""
    clip = tiny_backbone()
    pl = coft.PromptLearner(clip, coft.tokenize_for(clip), CLASSES, M=4)
    with torch.no_grad():
        t_pos, t_neg = pl(clip)
        tokens = cm.tokenize([f"X X X X {c}." for c in CLASSES], clip.context_length)
        emb = clip.token_embedding(tokens)
        emb[:, 1:5] = pl.ctx_neg
        ref = F.normalize(clip.encode_text(tokens, embeddings=emb), dim=-1)
    assert (t_neg - ref).abs().max() < 1e-5 and not torch.allclose(t_pos, t_neg)
    pl2 = coft.PromptLearner(clip, coft.tokenize_for(clip), CLASSES, ctx_init="a photo of a")
    assert pl2.M == 4 and torch.equal(pl2.ctx_pos, pl2.ctx_neg)


def test_prompt_learner_shared_prefix_equals_plain_encoding():
    """forward (each context's prefix computed once, clip_model.CLIP.encode_text_shared) equals
    encode_text of prompt_embeddings(), the 2C prompts whole, and the method's path over OpenAI's
    layout (encode_text_embeddings): features and context gradients, with class names of
    different lengths."""
    clip = tiny_backbone()
    names = ["zero", "one hundred", "a much longer class name here"]
    pl = coft.PromptLearner(clip, coft.tokenize_for(clip), names, M=4)
    with torch.no_grad():
        pl.ctx_pos.normal_(generator=torch.Generator().manual_seed(0))
        pl.ctx_neg.normal_(generator=torch.Generator().manual_seed(1))
    t_pos, t_neg = pl(clip)
    tokens, emb = pl.prompt_embeddings()
    ref = F.normalize(clip.encode_text(tokens, embeddings=emb), dim=-1)  # [2C, D]
    shared = torch.cat([t_pos, t_neg])
    assert (shared - ref).abs().max() < 1e-5 and not torch.allclose(t_pos, t_neg)
    # the method's own path for models without encode_text_shared: whole prompts, whole context, open_clip's mask
    layout = F.normalize(coft.encode_text_embeddings(clip, emb, tokens.argmax(-1)), dim=-1)
    assert (layout - ref).abs().max() < 1e-5
    w = torch.randn(shared.shape, generator=torch.Generator().manual_seed(2))
    ctx = [pl.ctx_pos, pl.ctx_neg]
    for a, b in zip(torch.autograd.grad((shared * w).sum(), ctx), torch.autograd.grad((ref * w).sum(), ctx)):
        assert b.abs().max() > 0 and (a - b).abs().max() < 1e-5 * b.abs().max()


def test_similarity_logits_are_fp32_under_bf16_autocast():
    """Under (CPU) bf16 autocast the towers run in bf16, but every normalised-feature product is
    fp32: zero-shot logits, s+ / s- and the Phase-I loss, the Phase-II head, InfoNCE. Each is
    compared with float64 arithmetic on the same features (a bf16 logit near 30 is off by ~0.1)."""
    clip = tiny_backbone()
    tau = 0.01
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    W = F.normalize(torch.randn(3, clip.cfg.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    bf16 = dict(device_type="cpu", dtype=torch.bfloat16)

    def close(a, b):
        return a.dtype == torch.float32 and (a.double() - b).abs().max().item() < 1e-4

    with torch.no_grad(), torch.autocast(**bf16):
        zs = cm.zero_shot_logits(clip, W, x, tau)
        f = clip.encode_image(x)
    assert f.dtype == torch.bfloat16  # the tower itself does run in bf16 here
    assert close(zs, F.normalize(f.double(), dim=-1) @ W.double().t() / tau)

    model = coft.DualPromptModel(clip, coft.tokenize_for(clip), CLASSES, M=4, vpt_tokens=2)
    y = torch.tensor([0, 1, 2, 0] * 4)
    with torch.autocast(**bf16):
        v, t_pos, t_neg = model(x)
        yc = complements(y, 3, seed=3)
        loss = sum(coft.phase1_losses(model, x, y, yc, tau))
    v, t_pos, t_neg = v.double(), t_pos.double(), t_neg.double()
    s_pos, s_neg = v @ t_pos.t(), v @ t_neg.t()
    ref = F.cross_entropy(s_pos / tau, y) + coft.loss_l2(s_pos, s_neg, y, yc, tau)
    assert close(loss, ref)

    ft = coft.Phase2Classifier(clip.visual, 3, W, 1 / tau)
    mc = coft.MomentumContrast(ft, size=8)
    mc.enqueue(F.normalize(torch.randn(8, clip.cfg.embed_dim), dim=-1), torch.arange(8) + 100)
    with torch.no_grad(), torch.autocast(**bf16):
        logits, feats = ft(x), ft.features(x)
        nce = mc.info_nce(feats[:8], feats[8:], torch.arange(8))
    assert close(logits, feats.double() @ ft.head.weight.double().t() + ft.head.bias.double())
    q, k = feats[:8].double(), feats[8:].double()
    direct = torch.cat([(q * k).sum(1, keepdim=True), q @ mc.queue.double().t()], 1) / mc.tau
    assert close(nce, F.cross_entropy(direct, torch.zeros(8, dtype=torch.long)))


def test_eq7_head_starts_as_the_prompt_classifier():
    clip = tiny_backbone()
    text = F.normalize(torch.randn(3, clip.cfg.embed_dim), dim=-1)
    ft = coft.Phase2Classifier(clip.visual, 3, text, clip.logit_scale.exp().item())
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ text.t()
        assert (ft(x) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_phase2_changes_the_encoder_not_the_frozen_backbone(name):
    clip = tiny_backbone(name)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    ft = coft.Phase2Classifier(clip.visual, 3, None).train()
    enc0 = {k: v.clone() for k, v in ft.visual.state_dict().items()}
    opt = torch.optim.SGD(ft.parameters(), lr=0.1)
    F.cross_entropy(ft(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert all(p.grad is not None for p in ft.visual.parameters() if p.requires_grad)
    changed = [k for k, v in ft.visual.state_dict().items() if not torch.equal(enc0[k], v)]
    assert len(changed) > len(enc0) // 2  # the encoder itself is fine-tuned, not just the head
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    # Phase II never touches the text tower: it has no text parameters at all
    assert not any(k.startswith(("transformer.", "token_embedding", "ln_final")) for k in ft.state_dict())


def test_contrastive_epoch_is_one_pass_over_all_unlabelled_images():
    """CoFT+ Phase II: every unlabelled image enters L_Cont exactly once per epoch; the clean
    loader cycles alongside, each cycle drawn afresh, so L_FFT gets at least one full clean pass."""
    class Items(torch.utils.data.Dataset):
        def __init__(self, n, two_views):
            self.n, self.two = n, two_views

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            x = torch.full((1,), float(i))
            return ((x, x) if self.two else x), 0, i

    unlabelled = torch.utils.data.DataLoader(Items(10, True), batch_size=4, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
    cycles = []

    def make_clean(cycle):
        cycles.append(cycle)
        return torch.utils.data.DataLoader(Items(5, False), batch_size=2, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(cycle))

    batches = list(coft.CleanAndUnlabelled(make_clean, unlabelled))
    assert len(batches) == len(coft.CleanAndUnlabelled(make_clean, unlabelled)) == 3  # ceil(10 / 4): no image dropped
    seen_u = torch.cat([b[5] for b in batches])
    assert sorted(seen_u.tolist()) == list(range(10))
    assert all(torch.equal(b[3][:, 0].long(), b[5]) for b in batches)  # views travel with their indices
    assert cycles == [0, 1]  # 2 clean batches per cycle (5 images, drop_last): the second cycle starts at step 3
    first_cycle = torch.cat([b[2] for b in batches[:2]]).tolist()
    assert len(set(first_cycle)) == 4  # a full pass of the clean loader, without repeats


def test_end_to_end_every_accuracy_is_its_saved_predictions_accuracy(tmp_path, pretrained_tiny):
    m = run_coft(tmp_path, ckpt=pretrained_tiny[0])
    preds = torch.load(tmp_path / "run" / "predictions.pt")
    for key, model in (("zero_shot_acc", "zero_shot"), ("phase1_model1_acc", "round1_model1"),
                       ("phase1_model2_acc", "round1_model2"), ("branch1_acc", "branch1"), ("branch2_acc", "branch2"),
                       ("ensemble_acc", "ensemble")):
        assert m[key] == pytest.approx(100 * (preds[model] == preds["y"]).float().mean().item()), key
    pl = torch.load(tmp_path / "run" / "pseudo_labels.pt")
    assert m["phase1_agreement"] == pytest.approx(100 * (pl["generated"][0] == pl["generated"][1]).float().mean().item())
    assert m["seed_set"]["size"] <= 10 * 4
    for a in (1, 2):
        c = m[f"clean_set_{a}"]
        assert 0 <= c["size"] <= 899 and c["kept_fraction"] == pytest.approx(100 * c["size"] / 899)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    # every trained stage reports its pre-clip gradient norms: 2 epochs x steps per epoch
    p1_steps = 2 * -(-m["seed_set"]["size"] // 64)
    assert {k: v["steps"] for k, v in m["grad_norms"].items()} == {
        "phase1_round1_model1": p1_steps, "phase1_round1_model2": p1_steps,
        "branch1": 2 * (m["clean_set_1"]["size"] // 64), "branch2": 2 * (m["clean_set_2"]["size"] // 64)}
    assert all(0 <= v["clipped_fraction"] <= 1 and v["median_norm"] > 0 for v in m["grad_norms"].values())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["K"] == 4
    # --eval-only reloads the saved models and reproduces every number without training
    assert m["zero_shot_acc"] > 15 and m["seed_set"]["size"] > 10  # a backbone that means something
    again = run_coft(tmp_path, "--eval-only", ckpt=pretrained_tiny[0])
    assert numbers(again) == numbers(m)


# ---- an audit: every number and set of a finished run recomputed by hand from its saved files

@functools.lru_cache(maxsize=1)
def digit_tensors():
    """The digits task's train and test images under the test transform, and their labels."""
    task = data.digits_task()
    tf = data.make_transform("test", tower(32), task)
    stack = lambda items: torch.stack([tf(img) for img, _ in items])  # noqa: E731
    labels = lambda items: torch.tensor([y for _, y in items])  # noqa: E731
    return task, stack(task.train), labels(task.train), stack(task.test), labels(task.test)


def topk_by_hand(probs, K):
    """Per class, the K images labelled with it that have the highest probability, ties to the lower index."""
    conf, y = probs.max(1)
    idx = [i for k in range(probs.shape[1])
           for i in sorted((i for i in range(len(y)) if y[i] == k), key=lambda i: (-conf[i].item(), i))[:K]]
    return sorted(zip(idx, y[idx].tolist()))


def pairs(idx, y):
    return sorted(zip(idx.tolist(), y.tolist()))


def same_argmax(logits, predicted):
    """predicted == logits.argmax(1), except where the top two are within float noise (batching)."""
    top2 = logits.topk(2, dim=1).values
    differ = logits.argmax(1) != predicted
    return not (differ & (top2[:, 0] - top2[:, 1] > 1e-4)).any()


def acc(pred, y):
    return 100.0 * (pred == y).float().mean().item()


@pytest.fixture(scope="session")
def audited_run(tmp_path_factory, pretrained_tiny):
    """One CoFT run with two Phase-I rounds on the pretrained tiny backbone, plus the head every
    Phase-II branch started from."""
    tmp = tmp_path_factory.mktemp("audit")
    heads, real_fit = [], train.fit

    def recording_fit(model, *a, **kw):
        if isinstance(model, coft.Phase2Classifier):
            heads.append(model.head.weight.detach().clone())
        return real_fit(model, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "fit", recording_fit)
        m = run_coft(tmp, "--rounds", "2", ckpt=pretrained_tiny[0])
    return tmp / "run", m, heads, checkpoints.load(str(pretrained_tiny[0]), act="quick_gelu")[0]


def phase1_scores_by_hand(run_dir, clip, r, m, X):
    model = coft.DualPromptModel(clip, coft.tokenize_for(clip), data.DIGIT_NAMES, 4, None, 2, True)
    model.load_state_dict(stage_state(run_dir, f"phase1_round{r}_model{m}"))
    with torch.no_grad():
        t_pos, t_neg = model.prompts(clip)
        v = model.image_features(X)
    return v @ t_pos.t(), v @ t_neg.t(), t_pos


def test_audit_zero_shot_and_seed_set(audited_run):
    """S*: per class the top-K of the zero-shot softmax at CLIP's own temperature (Eq. 1)."""
    run_dir, m, _, clip = audited_run
    task, X_train, y_train, X_test, y_test = digit_tensors()
    pl, preds = torch.load(run_dir / "pseudo_labels.pt"), torch.load(run_dir / "predictions.pt")
    T = zero_shot_text(clip, task)
    with torch.no_grad():
        cos_train = F.normalize(clip.encode_image(X_train), dim=-1) @ T.t()
        cos_test = F.normalize(clip.encode_image(X_test), dim=-1) @ T.t()
    scale = clip.logit_scale.exp().item()
    expected = topk_by_hand((scale * cos_train).softmax(1), 4)
    assert expected != topk_by_hand(cos_train.softmax(1), 4)  # another temperature ranks differently
    for r1_set in pl["seed_sets"][0]:  # round 1: both models train on S*
        assert pairs(*r1_set) == expected
    assert same_argmax(cos_test, preds["zero_shot"]) and m["zero_shot_acc"] == pytest.approx(acc(preds["zero_shot"], y_test))
    assert m["seed_set"]["precision"] == pytest.approx(100 * sum(y_train[i] == y for i, y in expected).item() / len(expected))


def test_audit_rounds_filter_heads_and_ensemble(audited_run):
    """Round 2 of each model trains on the top-K of *its own* round-1 model; model a's labels are
    kept where *model b* has s+ > s- (Sec. 3.2.1); branch a's head starts from *model a's*
    positive prompts; the ensemble is the mean of the branches' softmax."""
    run_dir, m, heads, clip = audited_run
    _, X_train, y_train, X_test, y_test = digit_tensors()
    pl, preds = torch.load(run_dir / "pseudo_labels.pt"), torch.load(run_dir / "predictions.pt")
    scale = clip.logit_scale.exp().item()
    r1 = [phase1_scores_by_hand(run_dir, clip, 1, mm, X_train) for mm in (1, 2)]
    own_topk = [topk_by_hand((scale * s[0]).softmax(1), 4) for s in r1]
    assert own_topk[0] != own_topk[1]
    assert [pairs(*st) for st in pl["seed_sets"][1]] == own_topk
    # the filter, both directions, with the last round's models
    r2 = [phase1_scores_by_hand(run_dir, clip, 2, mm, X_train) for mm in (1, 2)]
    i = torch.arange(len(y_train))
    for a, b in ((0, 1), (1, 0)):
        y_a = r2[a][0].argmax(1)
        peer = (r2[b][0][i, y_a] > r2[b][1][i, y_a]).nonzero().squeeze(1)
        own = (r2[a][0][i, y_a] > r2[a][1][i, y_a]).nonzero().squeeze(1)
        assert not torch.equal(peer, own)  # validating with one's own scores would give another set
        assert torch.equal(pl["clean"][a], peer) and torch.equal(pl["clean_labels"][a], y_a[peer])
        assert torch.equal(pl["generated"][a], y_a)
        c = m[f"clean_set_{a + 1}"]
        assert c["size"] == len(peer)
        # the diagnosis: removed labels' precision, and how three scores rank right above wrong labels
        removed = torch.ones(len(y_a), dtype=torch.bool)
        removed[peer] = False
        right = y_a == y_train
        assert c["removed_precision"] == pytest.approx(100 * right[removed].float().mean().item())
        margin = r2[b][0][i, y_a] - r2[b][1][i, y_a]
        assert c["auroc_peer_margin"] == pytest.approx(auroc_by_pairs(margin, right), abs=0.05)
        for key, s_pos in (("auroc_peer_confidence", r2[b][0]), ("auroc_own_confidence", r2[a][0])):
            assert c[key] == pytest.approx(auroc_by_pairs((scale * s_pos).softmax(1)[i, y_a], right), abs=0.05)
        assert c["auroc_peer_confidence"] != pytest.approx(c["auroc_own_confidence"], abs=0.01)
    # heads: logit_scale * the branch's own model's t+
    assert len(heads) == 2
    for a in (0, 1):
        assert torch.allclose(heads[a], scale * r2[a][2], atol=1e-5)
        assert not torch.allclose(heads[a], scale * r2[1 - a][2], atol=1e-2)
    # Phase-I accuracies, branches and the ensemble from the saved weights
    for mm in (1, 2):
        s_test = phase1_scores_by_hand(run_dir, clip, 2, mm, X_test)[0]
        assert same_argmax(s_test, preds[f"round2_model{mm}"])
        assert m[f"phase1_model{mm}_acc"] == pytest.approx(acc(s_test.argmax(1), y_test))
    probs = []
    for a in (1, 2):
        ft = coft.Phase2Classifier(clip.visual, 10)
        ft.load_state_dict(stage_state(run_dir, f"branch{a}"))
        with torch.no_grad():
            logits = ft.eval()(X_test)
        assert same_argmax(logits, preds[f"branch{a}"]) and m[f"branch{a}_acc"] == pytest.approx(acc(preds[f"branch{a}"], y_test))
        probs.append(logits.softmax(1))
    ensemble = (probs[0] + probs[1]) / 2
    assert same_argmax(ensemble, preds["ensemble"])
    assert (preds["ensemble"] != preds["branch1"]).any() and (preds["ensemble"] != preds["branch2"]).any()
    assert m["ensemble_acc"] == pytest.approx(acc(preds["ensemble"], y_test))


def test_branches_draw_their_own_batches_and_augmentations(tmp_path, pretrained_tiny, monkeypatch):
    """With equal clean sets (every label kept), the two branches still see different orders and
    different augmentations of the same image."""
    monkeypatch.setattr(coft, "collaborative_filter", lambda s_pos, s_neg: torch.ones(len(s_pos), dtype=torch.bool))
    first, real_fit = [], train.fit

    def recording_fit(model, step_fn, *a, **kw):
        if not isinstance(model, coft.Phase2Classifier):
            return real_fit(model, step_fn, *a, **kw)
        seen = []
        first.append(seen)

        def step(mdl, b, g):
            seen.append((b[0].clone(), b[2].clone()))
            return step_fn(mdl, b, g)
        return real_fit(model, step, *a, **kw)

    monkeypatch.setattr(train, "fit", recording_fit)
    run_coft(tmp_path, "--p1-epochs", "1", "--fft-epochs", "1", "--fft-aug", "strong", ckpt=pretrained_tiny[0])
    pl = torch.load(tmp_path / "run" / "pseudo_labels.pt")
    assert torch.equal(pl["clean"][0], pl["clean"][1]) and len(first) == 2
    (x1, i1), (x2, i2) = first[0][0], first[1][0]
    assert not torch.equal(i1, i2)
    common = set(i1.tolist()) & set(i2.tolist())
    assert common and all(not torch.equal(x1[i1 == j][0], x2[i2 == j][0]) for j in common)


def test_topk_baseline_and_resnet_backbone(tmp_path):
    m = run_coft(tmp_path, "--method", "topk", name="tiny-rn")
    assert "phase1_model1_acc" not in m
    # the baseline's number is its saved model's accuracy on the test images, fine-tuned on S*
    clip = checkpoints.load(str(tmp_path / "tiny-rn.pt"), act="quick_gelu")[0]
    ft = coft.Phase2Classifier(clip.visual, 10)
    ft.load_state_dict(stage_state(tmp_path / "run", "topk"))
    _, _, _, X_test, y_test = digit_tensors()
    with torch.no_grad():
        logits = ft.eval()(X_test)
    preds = torch.load(tmp_path / "run" / "predictions.pt")
    assert same_argmax(logits, preds["topk"]) and m["topk_acc"] == pytest.approx(acc(preds["topk"], y_test))
    assert m["grad_norms"]["topk"]["steps"] == 2  # 2 epochs of one batch (S* has <= 40 images)
    m = run_coft(tmp_path, "--branches", "1", name="tiny-rn", out="rn")
    preds = torch.load(tmp_path / "rn" / "predictions.pt")
    assert "branch2_acc" not in m and torch.equal(preds["ensemble"], preds["branch1"])
    assert m["ensemble_acc"] == m["branch1_acc"]


def record_training_sets(monkeypatch):
    """A list that receives (items, labels) of every training set train.fit is given from now on."""
    trained_on, real_fit = [], train.fit

    def recording_fit(model, step_fn, make_loader, *a, **kw):
        ds = make_loader(0).dataset.dataset  # the ImageDataset inside train.SeededSamples
        trained_on.append((ds.items, ds.labels))
        return real_fit(model, step_fn, make_loader, *a, **kw)

    monkeypatch.setattr(train, "fit", recording_fit)
    return trained_on


def zero_shot_text(clip, task):
    """The unit text embeddings [C, D] of the task's primary template, computed here from scratch."""
    with torch.no_grad():
        return F.normalize(clip.encode_text(cm.tokenize([task.templates[0].format(c) for c in task.classnames],
                                                        clip.context_length)), dim=-1)


def test_self_training_relabels_with_its_own_model_above_the_threshold(tmp_path, pretrained_tiny, monkeypatch):
    """--method selftrain: round 1 trains on every train image whose zero-shot confidence (Eq. 1)
    is >= --threshold, with its zero-shot label; round 2 on the same rule applied to round 1's
    fine-tuned model; the result is round 2's model."""
    trained_on = record_training_sets(monkeypatch)
    m = run_coft(tmp_path, "--method", "selftrain", "--rounds", "2", "--threshold", "0.3", ckpt=pretrained_tiny[0])
    task, X_train, y_train, X_test, y_test = digit_tensors()
    clip = checkpoints.load(str(pretrained_tiny[0]), act="quick_gelu")[0]
    T = zero_shot_text(clip, task)
    with torch.no_grad():
        labellers = [(clip.logit_scale.exp() * F.normalize(clip.encode_image(X_train), dim=-1) @ T.t()).softmax(1)]
    models = []
    for r in (1, 2):
        ft = coft.Phase2Classifier(clip.visual, 10)
        ft.load_state_dict(stage_state(tmp_path / "run", f"selftrain_round{r}"))
        with torch.no_grad():
            labellers.append(ft.eval()(X_train).softmax(1))
        models.append(ft)
    assert len(trained_on) == 2
    for r, (items, labels) in enumerate(trained_on):
        conf, y = labellers[r].max(1)
        near = ((conf - 0.3).abs() < 1e-4).sum().item()  # float noise may move an image across the threshold
        picked = (conf >= 0.3).nonzero().squeeze(1)
        assert abs(len(items) - len(picked)) <= near
        if near == 0:
            assert all(torch.equal(a[0], task.train[i][0]) for a, i in zip(items, picked.tolist()))
            assert labels == y[picked].tolist()
        log = m["selftrain_rounds"][r]
        assert log["size"] == len(items) and log["kept_fraction"] == pytest.approx(100 * len(items) / 899)
        assert log["precision"] == pytest.approx(100 * (y[picked] == y_train[picked]).float().mean().item())
    assert len(trained_on[0][0]) != len(trained_on[1][0])  # the second round's labeller is another model
    preds = torch.load(tmp_path / "run" / "predictions.pt")
    with torch.no_grad():
        logits = models[1](X_test)
    assert same_argmax(logits, preds["selftrain"]) and m["selftrain_acc"] == pytest.approx(acc(preds["selftrain"], y_test))
    assert m["selftrain_acc"] == m["selftrain_rounds"][1]["acc"]
    assert set(m["grad_norms"]) == {"selftrain_round1", "selftrain_round2"}


def test_labelled_shots_join_the_seed_set_and_both_clean_sets(tmp_path, pretrained_tiny, monkeypatch, capsys):
    """--labelled-shots N: N true-labelled images per class, drawn with the seed, are in every
    round's seed set and in both clean sets with their true labels; --method shots trains on them alone."""
    m = run_coft(tmp_path, "--labelled-shots", "2", "--rounds", "2", "--phase", "1", ckpt=pretrained_tiny[0])
    _, _, y_train, _, _ = digit_tensors()
    pl = torch.load(tmp_path / "run" / "pseudo_labels.pt")
    L = pl["labelled"]
    assert len(set(L.tolist())) == 20 and torch.bincount(y_train[L], minlength=10).tolist() == [2] * 10
    assert m["labelled_shots"] == {"per_class": 2, "size": 20}
    truth = set(zip(L.tolist(), y_train[L].tolist()))
    for sets in pl["seed_sets"]:
        for idx, y in sets:
            assert truth <= set(pairs(idx, y)) and len(set(idx.tolist())) == len(idx)  # no image twice
    for idx, y in zip(pl["clean"], pl["clean_labels"]):
        assert truth <= set(pairs(idx, y))
    assert not torch.equal(L, data.few_shot(data.digits_task(), 2, coft.seed_of(1, "labelled shots"), True))
    # --method shots: fine-tuned on exactly these images and labels
    trained_on = record_training_sets(monkeypatch)
    m = run_coft(tmp_path, "--labelled-shots", "2", "--method", "shots", ckpt=pretrained_tiny[0], out="shots")
    task = data.digits_task()
    (items, labels), = trained_on
    assert labels == y_train[L].tolist() and "shots_acc" in m
    assert len(items) == len(L) and all(torch.equal(a[0], task.train[i][0]) for a, i in zip(items, L.tolist()))
    assert "--labelled-shots" in coft_error(capsys, "--method", "shots", "--out", str(tmp_path / "x"))


def test_fft_init_phase1_and_distillation_backbone(tmp_path, pretrained_tiny):
    rn = tmp_path / "rn.pt"
    torch.save(randomized("tiny-rn").state_dict(), rn)
    # Phase I on the ViT, Phase II on a ResNet: the branch's encoder is the other backbone
    m = run_coft(tmp_path, "--fft-backbone", str(rn), "--branches", "1", ckpt=pretrained_tiny[0], out="distil")
    keys = stage_state(tmp_path / "distil", "branch1")
    assert any(k.startswith("visual.layer1.") for k in keys) and "vpt" not in keys and 0 <= m["ensemble_acc"] <= 100
    # --fft-init phase1 carries the Phase-I VPT into the fine-tuned encoder, where it keeps training
    run_coft(tmp_path, "--fft-init", "phase1", "--branches", "1", ckpt=pretrained_tiny[0], out="p1init")
    p1 = stage_state(tmp_path / "p1init", "phase1_round1_model1")["vpt.prompts"]
    ft = stage_state(tmp_path / "p1init", "branch1")["vpt"]
    assert ft.shape == p1.shape and not torch.equal(ft, p1)


def test_fft_init_phase1_needs_a_backbone_its_vpt_fits(tmp_path, capsys):
    """--fft-init phase1 with an --fft-backbone the Phase-I VPT cannot enter: one line, before any training."""
    for name, cfg in (("vit", {}), ("narrow", dict(vision_width=32)), ("shallow", dict(vision_layers=1))):
        torch.save(randomized("tiny-vit", **cfg).state_dict(), tmp_path / f"{name}.pt")
    torch.save(randomized("tiny-rn").state_dict(), tmp_path / "rn.pt")
    for other, what in (("narrow", "width 32"), ("rn", "is a ResNet"), ("shallow", "1 blocks")):
        out = tmp_path / f"run-{other}"
        err = coft_error(capsys, "--clip", str(tmp_path / "vit.pt"), "--clip-act", "quick_gelu",
                         "--fft-backbone", str(tmp_path / f"{other}.pt"),
                        "--fft-init", "phase1", "--M", "4", "--vpt-tokens", "2", "--out", str(out))
        assert "--fft-init pretrained" in err and what in err, err
        assert not list(out.rglob("*.pt"))  # refused before any work


# --------------------------------------------------------------------------- CoFT+

def tiny_finetuned(seed=0):
    clip = tiny_backbone(seed=seed)
    return coft.Phase2Classifier(clip.visual, 3, F.normalize(torch.randn(3, clip.cfg.embed_dim), dim=-1))


def test_queue_wraps_around_and_overwrites_the_oldest():
    mc = coft.MomentumContrast(tiny_finetuned(), size=5)
    keys = torch.arange(1, 8).float()[:, None].expand(7, mc.queue.shape[1])  # key i is all i's
    ids = torch.arange(1, 8) * 100  # key i belongs to image 100 i
    mc.enqueue(keys[:3], ids[:3])
    assert mc.count == 3 and mc.ptr == 3 and mc.queue[:3, 0].tolist() == [1, 2, 3]
    mc.enqueue(keys[3:7], ids[3:7])  # 4 more: two fill the end, two overwrite the oldest (1 and 2)
    assert mc.count == 5 and mc.ptr == 2 and mc.queue[:, 0].tolist() == [6, 7, 3, 4, 5]
    assert mc.queue_idx.tolist() == [600, 700, 300, 400, 500]  # each key keeps its image index
    big = torch.arange(10, 22)
    mc.enqueue(big.float()[:, None].expand(12, mc.queue.shape[1]), big)  # larger than the queue
    assert sorted(mc.queue[:, 0].tolist()) == [17, 18, 19, 20, 21]
    assert (mc.queue[:, 0].long() == mc.queue_idx).all()


def test_eq8_momentum_update_is_exact():
    mc = coft.MomentumContrast(tiny_finetuned(), size=4, mu=0.9)
    with torch.no_grad():
        for p in mc.model.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in mc.key_model.parameters()]
    mc.momentum_update()
    for p_m, p_m0, p in zip(mc.key_model.parameters(), before, mc.model.parameters()):
        assert torch.allclose(p_m, 0.9 * p_m0 + 0.1 * p, atol=1e-6)
    assert not any(p.requires_grad for p in mc.key_model.parameters())


def direct_info_nce(q, k, negatives, tau):
    """Eq. 9 written out per query: -log(e^{q.k/tau} / (e^{q.k/tau} + sum over its negatives))."""
    return torch.stack([-torch.log(torch.exp(q[i] @ k[i] / tau) / (torch.exp(q[i] @ k[i] / tau) + sum(
        (torch.exp(q[i] @ n / tau) for n in negatives[i]), torch.tensor(0.0)))) for i in range(len(q))]).mean()


def test_eq9_info_nce_equals_its_formula_and_keys_carry_no_gradient():
    mc = coft.MomentumContrast(tiny_finetuned(), size=6, tau=0.07)
    g = torch.Generator().manual_seed(0)
    mc.enqueue(F.normalize(torch.randn(4, mc.queue.shape[1], generator=g), dim=-1), torch.tensor([10, 11, 12, 13]))
    q = F.normalize(torch.randn(3, mc.queue.shape[1], generator=g), dim=-1)
    k = F.normalize(torch.randn(3, mc.queue.shape[1], generator=g), dim=-1)
    queue = mc.queue[:4]
    direct = direct_info_nce(q, k, [queue] * 3, 0.07)  # images 0-2: none of them is in the queue
    assert torch.allclose(mc.info_nce(q, k, torch.tensor([0, 1, 2])), direct, atol=1e-5)
    # the full forward: gradients reach the online model only; the keys enter the queue detached
    x = torch.randn(2, 3, 32, 32)
    loss = mc(x, x.flip(-1), torch.tensor([20, 21]))
    loss.backward()
    assert all(p.grad is None for p in mc.key_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mc.model.visual.parameters())
    assert not mc.queue.requires_grad and mc.count == 6 and mc.queue_idx[4:6].tolist() == [20, 21]


def test_queue_excludes_the_querys_own_image():
    """A query never meets an older key of its own image among its negatives (CoFT+ queue)."""
    mc = coft.MomentumContrast(tiny_finetuned(), size=8, tau=0.07)
    g = torch.Generator().manual_seed(1)
    D = mc.queue.shape[1]
    stale = F.normalize(torch.randn(5, D, generator=g), dim=-1)
    mc.enqueue(stale, torch.tensor([7, 3, 7, 9, 4]))  # image 7 has two stale keys, image 3 one
    q = F.normalize(torch.randn(3, D, generator=g), dim=-1)
    k = F.normalize(torch.randn(3, D, generator=g), dim=-1)
    idx = torch.tensor([7, 3, 5])
    negatives = [stale[[1, 3, 4]], stale[[0, 2, 3, 4]], stale]  # image 5 has no key in the queue
    assert torch.allclose(mc.info_nce(q, k, idx), direct_info_nce(q, k, negatives, 0.07), atol=1e-5)
    assert not torch.allclose(mc.info_nce(q, k, idx), direct_info_nce(q, k, [stale] * 3, 0.07), atol=1e-3)
    # a query whose every queued key is its own has only its positive: the loss is exactly 0
    solo = coft.MomentumContrast(tiny_finetuned(), size=4)
    solo.enqueue(stale[:2], torch.tensor([1, 1]))
    assert solo.info_nce(q[:1], k[:1], torch.tensor([1])).item() == 0.0


def test_keys_enter_the_queue_after_the_loss():
    """The loss of a batch is computed against the queue as it was before the batch: with an
    empty queue it has no negatives at all (loss exactly 0), then the batch's keys are queued."""
    mc = coft.MomentumContrast(tiny_finetuned(), size=8)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    loss = mc(x, x.flip(-1), torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0 and mc.count == 3 and mc.queue_idx[:3].tolist() == [0, 1, 2]
    before = mc.queue[:3].clone()
    x2 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q = mc.model.features(x2)
        key_model = copy.deepcopy(mc.key_model)
        for p_m, p in zip(key_model.parameters(), mc.model.parameters()):
            p_m.mul_(mc.mu).add_(p, alpha=1 - mc.mu)
        k = key_model.features(x2.flip(-1))
    loss2 = mc(x2, x2.flip(-1), torch.tensor([3, 4]))
    assert torch.allclose(loss2, direct_info_nce(q, k, [before] * 2, mc.tau), atol=1e-5)
    assert torch.allclose(mc.queue[3:5], k, atol=1e-6)


def test_llm_prompts_drive_the_zero_shot_pass(tmp_path, pretrained_tiny):
    prompts = {c: [f"a photo of the number {c}.", f"the digit {c}"] for c in data.DIGIT_NAMES}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    m = run_coft(tmp_path, "--llm-prompts", str(tmp_path / "p.json"), "--phase", "1", ckpt=pretrained_tiny[0])
    clip, _ = checkpoints.load(str(pretrained_tiny[0]), act="quick_gelu")
    with torch.no_grad():  # each class: the mean of its prompts' normalised embeddings, by hand
        W = torch.stack([F.normalize(F.normalize(clip.encode_text(cm.tokenize(prompts[c], clip.context_length)),
                                                 dim=-1).mean(0), dim=0) for c in data.DIGIT_NAMES])
    task = data.digits_task()
    x = torch.stack([data.make_transform("test", tower(32), task)(img) for img, _ in task.test])
    y = torch.tensor([label for _, label in task.test])
    with torch.no_grad():
        acc = 100.0 * (F.normalize(clip.encode_image(x), dim=-1) @ W.t()).argmax(1).eq(y).float().mean().item()
    assert m["zero_shot_acc"] == pytest.approx(acc) and m["parts"]["zero_shot_prompts"] == "llm"
    (tmp_path / "bad.json").write_text(json.dumps({"zero": ["x"]}))
    with pytest.raises(SystemExit):
        run_coft(tmp_path, "--llm-prompts", str(tmp_path / "bad.json"), ckpt=pretrained_tiny[0], out="bad")


def test_rounds_restart_from_pretrained_weights(tmp_path, pretrained_tiny, monkeypatch):
    """Every round's models start from a fresh initialisation (not the previous round's prompts),
    over a backbone that is still the pre-trained one, and train on their own new seed set."""
    starts, real_fit = [], train.fit

    def recording_fit(model, *a, **kw):
        if isinstance(model, coft.DualPromptModel):
            starts.append(({k: v.clone() for k, v in model.state_dict().items()},
                           {k: v.clone() for k, v in model.clip.state_dict().items()}))
        out = real_fit(model, *a, **kw)
        if isinstance(model, coft.DualPromptModel):
            starts[-1] += ({k: v.clone() for k, v in model.state_dict().items()},)
        return out

    monkeypatch.setattr(train, "fit", recording_fit)
    m = run_coft(tmp_path, "--rounds", "2", "--phase", "1", ckpt=pretrained_tiny[0])
    assert len(starts) == 4 and len(m["rounds"]) == 2  # 2 rounds x 2 models
    pretrained = checkpoints.load(str(pretrained_tiny[0]), act="quick_gelu")[0].state_dict()
    for start, backbone, _ in starts:
        assert all(torch.equal(pretrained[k], v) for k, v in backbone.items())
    r1m1_end, r2m1_start = starts[0][2], starts[2][0]
    for k in r2m1_start:
        assert not torch.equal(r2m1_start[k], r1m1_end[k])  # no carry-over of trained prompts / VPT
    # round 2's start is a fresh draw: re-creating the model under round 2's seed gives it exactly
    clip = checkpoints.load(str(pretrained_tiny[0]), act="quick_gelu")[0]  # (building a model draws random numbers: before seeding)
    torch.manual_seed(coft.seed_of(0, "init", 2, 1))
    fresh = coft.DualPromptModel(clip, coft.tokenize_for(clip), data.DIGIT_NAMES, 4, None, 2, True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in r2m1_start.items())
    assert m["rounds"][1]["model1_seed_set"]["size"] > 0


def test_plus_end_to_end_and_resume_restores_queue_and_momentum_encoder(tmp_path, monkeypatch, pretrained_tiny):
    ckpt = pretrained_tiny[0]
    plus = ("--plus", "--rounds", "2", "--queue", "100")
    queries, real_nce = [], coft.MomentumContrast.info_nce

    def recording_nce(self, q, k, idx, *rest):
        queries.append(idx.clone())
        return real_nce(self, q, k, idx, *rest)

    real_save, saved = runs.atomic_save, {}

    def recording_save(obj, path):  # the last epoch checkpoint of branch 1 (deleted once the stage is saved)
        if Path(path).name == "branch1.ckpt":
            saved["ckpt"] = copy.deepcopy(obj)
        real_save(obj, path)

    monkeypatch.setattr(coft.MomentumContrast, "info_nce", recording_nce)
    monkeypatch.setattr(runs, "atomic_save", recording_save)
    full = run_coft(tmp_path, *plus, out="full", ckpt=ckpt)
    monkeypatch.setattr(coft.MomentumContrast, "info_nce", real_nce)
    monkeypatch.setattr(runs, "atomic_save", real_save)
    assert full["method"] == "coft+" and full["parts"] == {"rounds": 2, "contrast": True,
                                                           "zero_shot_prompts": "ensemble"}
    # each epoch of each branch is one pass over all 899 unlabelled images: ceil(899 / 64) = 15 steps
    assert len(queries) == 2 * 2 * 15
    for start in range(0, len(queries), 15):
        assert sorted(torch.cat(queries[start:start + 15]).tolist()) == list(range(899))
    state = saved["ckpt"]["model"]
    assert not (tmp_path / "full" / "stages" / "branch1.ckpt").exists()  # superseded by stages/branch1.pt
    assert state["count"] == 100 and any(k.startswith("key_model.visual.") for k in state)
    assert state["queue_idx"].min() >= 0 and len(set(state["queue_idx"].tolist())) == 100
    real_save = runs.atomic_save

    def dying_save(obj, path):
        real_save(obj, path)
        if Path(path).name == "branch1.ckpt":
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "atomic_save", dying_save)
    with pytest.raises(SystemExit):
        run_coft(tmp_path, *plus, out="killed", ckpt=ckpt)
    monkeypatch.setattr(runs, "atomic_save", real_save)
    resumed = run_coft(tmp_path, *plus, "--resume", out="killed", ckpt=ckpt)
    assert numbers(resumed) == numbers(full)


# --------------------------------------------------------------------------- your own images

@pytest.fixture(scope="module")
def digit_layouts(tmp_path_factory):
    """The digits as PNG files, labelled (--dataset imagefolder) and as your own images (a flat folder,
    a check set, classes.txt), both listing the images in one order."""
    return write_digit_layouts(tmp_path_factory.mktemp("layouts"), n_train=400, n_test=200)


def own(root, *extra):
    """The CLI arguments of a run on the flat folder instead of the digits."""
    return ["--images", str(root / "flat"), "--classes", str(root / "classes.txt"), *extra]


def without_dataset(argv):
    i = argv.index("--dataset")
    return argv[:i] + argv[i + 2:]


LABEL_FIGURES = ("zero_shot_train_label_precision", "seed_set.precision", "clean_set_1.precision",
                 "clean_set_1.all_labels_precision", "clean_set_1.removed_precision", "clean_set_1.auroc_peer_margin",
                 "clean_set_2.auroc_peer_confidence", "clean_set_2.auroc_own_confidence",
                 "rounds.0.model1_seed_set.precision")


@pytest.mark.parametrize("variant", [(), ("--plus", "--rounds", "2", "--queue", "100")], ids=["coft", "coft+"])
def test_coft_training_is_label_free_a_flat_folder_trains_the_labelled_layouts_weights(
        tmp_path, pretrained_tiny, digit_layouts, variant):
    """CoFT and CoFT+ on your own images (a flat folder, no label anywhere; the test split as --check)
    train the same weights and make the same test predictions as on the labelled layout
    (--dataset imagefolder, the same images in the same order): no step reads a train label. Every
    figure that needs one is null there, and present here."""
    root = digit_layouts[0]
    ckpt = pretrained_tiny[0]
    labelled = run_coft(tmp_path, "--dataset", "imagefolder", "--data-root", str(root / "labelled"), *variant,
                        out="labelled", ckpt=ckpt)
    flat = coft.main(without_dataset(coft_args(tmp_path, *own(root, "--check", str(root / "check")), *variant,
                                               out="flat", ckpt=ckpt)))
    stages = sorted(p.stem for p in (tmp_path / "flat" / "stages").glob("*.pt"))
    assert stages == sorted(p.stem for p in (tmp_path / "labelled" / "stages").glob("*.pt")) and "branch2" in stages
    for tag in stages:
        a, b = stage_state(tmp_path / "labelled", tag), stage_state(tmp_path / "flat", tag)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), tag
    pa, pb = torch.load(tmp_path / "labelled" / "predictions.pt"), torch.load(tmp_path / "flat" / "predictions.pt")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    fa, fb = flat_metrics(labelled), flat_metrics(flat)
    for k in LABEL_FIGURES:
        assert fb[k] is None and isinstance(fa[k], float), k
    assert fb["dataset"] == "images" and fb["ensemble_acc"] == fa["ensemble_acc"]
    same = [k for k in fa if k not in LABEL_FIGURES and not k.startswith(("time_s", "peak_mib", "dataset")) and
            "precision" not in k and "auroc" not in k and not k.endswith(("_s", "_mib"))]
    assert all(fa[k] == fb[k] for k in same), [k for k in same if fa[k] != fb[k]]
    assert fb["zero_shot_mean_confidence"] > 0 and fb["phase1_agreement"] > 0  # what is known without labels


def flat_metrics(m):
    from conftest import flat
    return flat(m)


def test_without_a_check_set_a_run_reports_what_needs_no_label_and_deploys(tmp_path, pretrained_tiny, digit_layouts,
                                                                           capsys):
    """Your own images without --check: no accuracy anywhere (null, '-' in the table, one line on why),
    the label-free figures are there, and deploy.py uses the run as any other."""
    import deploy
    root = digit_layouts[0]
    m = coft.main(without_dataset(coft_args(tmp_path, *own(root), out="bare", ckpt=pretrained_tiny[0])))
    out = capsys.readouterr().out
    assert "no labelled check set (--check): no accuracy is reported" in out and "carry no labels" in out
    for k in ("zero_shot_acc", "phase1_model1_acc", "branch1_acc", "ensemble_acc"):
        assert m[k] is None, k
    assert 0 < m["zero_shot_mean_confidence"] <= 100 and 0 < m["clean_set_1"]["kept_fraction"] <= 100
    assert 0 <= m["phase1_agreement"] <= 100 and m["rounds"][0]["model1_mean_confidence"] > 0
    assert torch.load(tmp_path / "bare" / "predictions.pt") == {}
    coft.main(["--table", str(tmp_path / "bare")])
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[0] == "bare" and row[2:4] == ["-", "-"]  # zero-shot, S* precision
    model, classnames, transform = deploy.load(tmp_path / "bare")
    assert classnames == (root / "classes.txt").read_text().split()
    x = torch.stack([transform(Image.open(root / "flat" / f"{i:04d}.png").convert("RGB")) for i in range(3)])
    assert model(x).shape == (3, 10)


def test_pseudo_labels_csv_is_what_each_branch_trained_on_and_reads_back_as_labels(tmp_path, pretrained_tiny,
                                                                                  digit_layouts):
    """pseudo_labels.csv: a row per image; where branchA_kept is 1 its branchA_class is in clean set A
    with that label, kept iff the peer's margin is > 0; the zero-shot class and confidence are the
    zero-shot pass's; the class column is empty, a form for a person. The file, some class cells
    filled in, is a labels file: those rows become the next run's labelled images, and its class
    column then holds them."""
    root = digit_layouts[0]
    m = coft.main(without_dataset(coft_args(tmp_path, *own(root), "--phase", "1", out="p1", ckpt=pretrained_tiny[0])))
    rows = list(csv.DictReader(open(tmp_path / "p1" / "pseudo_labels.csv")))
    pl = torch.load(tmp_path / "p1" / "pseudo_labels.pt")
    names = m["classnames"]
    assert [r["path"] for r in rows] == [f"{i:04d}.png" for i in range(400)]
    assert all(r["class"] == "" for r in rows)
    for a, (cls, kept, margin) in enumerate([("branch1_class", "branch1_kept", "branch1_peer_margin"),
                                            ("branch2_class", "branch2_kept", "branch2_peer_margin")]):
        assert [names.index(r[cls]) for r in rows] == pl["generated"][a].tolist()
        keep = [i for i, r in enumerate(rows) if r[kept] == "1"]
        assert keep == pl["clean"][a].tolist() == [i for i, r in enumerate(rows) if float(r[margin]) > 0]
        assert [names.index(rows[i][cls]) for i in keep] == pl["clean_labels"][a].tolist()
    assert sum(float(r["zero_shot_confidence"]) for r in rows) / len(rows) == pytest.approx(
        m["zero_shot_mean_confidence"] / 100, abs=1e-4)
    assert all(r["labelled"] == "0" for r in rows)
    # a person checks five rows, fills in their class (one other than model 1's), and gives the file (other
    # columns, unchecked rows and all) as --labels
    checked = tmp_path / "checked.csv"
    with open(checked, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        fixed = [dict(r, **{"class": r["branch1_class"]}) for r in rows[:5]]
        fixed[0]["class"] = names[(names.index(fixed[0]["branch1_class"]) + 1) % 10]
        w.writerows(fixed + rows[5:])
    coft.main(without_dataset(coft_args(tmp_path, *own(root), "--phase", "1", "--labels", str(checked), out="again",
                                        ckpt=pretrained_tiny[0])))
    again = list(csv.DictReader(open(tmp_path / "again" / "pseudo_labels.csv")))
    given = [(r["path"], r["class"]) for r in again if r["labelled"] == "1"]
    assert sorted(given) == sorted((r["path"], r["class"]) for r in fixed)
    assert all(r["branch1_kept"] == r["branch2_kept"] == "1" and r["branch1_class"] == r["branch2_class"] == r["class"]
               for r in again if r["labelled"] == "1")
    assert all(r["class"] == "" for r in again if r["labelled"] == "0")


def test_a_person_who_fills_in_pseudo_labels_csv_in_place_and_gives_it_back_to_its_run_loses_nothing(tmp_path,
                                                                                                   capsys):
    """The natural action (issue 45): a person fills in the class of the 15 most doubtful rows of
    OUT/pseudo_labels.csv in place and reruns with --labels OUT/pseudo_labels.csv --out OUT --restart.
    The file stays byte for byte as the person left it, the run trains on exactly those 15 labels,
    and its own pseudo-labels go to the next free name, pseudo_labels-2.csv, as it says."""
    task = data.digits_task()
    run_coft(tmp_path, "--phase", "1")
    form = tmp_path / "run" / "pseudo_labels.csv"
    with open(form, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    doubtful = sorted(range(len(rows)), key=lambda i: float(rows[i]["branch1_peer_margin"]))[:15]
    for i in doubtful:  # what the person sees in image #i
        rows[i]["class"] = task.classnames[task.train[int(rows[i]["path"][1:])][1]]
    with open(form, "w", newline="", encoding="utf-8") as f:  # saved in place, as a spreadsheet or a script does
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    filled = form.read_bytes()
    capsys.readouterr()
    m = run_coft(tmp_path, "--phase", "1", "--labels", str(form), "--restart")
    out = capsys.readouterr().out
    assert form.read_bytes() == filled
    given = sorted((rows[i]["path"], rows[i]["class"]) for i in doubtful)
    counts = [sum(c == name for _, c in given) for name in task.classnames]
    assert m["labels"] == {"file": str(form), "size": 15, "per_class": counts}
    with open(tmp_path / "run" / "pseudo_labels-2.csv", newline="", encoding="utf-8") as f:
        again = list(csv.DictReader(f))
    assert sorted((r["path"], r["class"]) for r in again if r["labelled"] == "1") == given
    assert sorted(torch.load(tmp_path / "run" / "pseudo_labels.pt")["labelled"].tolist()) == sorted(doubtful)
    assert f"--labels {form}: 15 labelled rows read (15 images), {len(rows) - 15} rows with an empty class" in out
    assert f"note: --restart kept {form} (this command's --labels)" in out
    assert f"note: {form} (this command's --labels) stays as it is: this run's pseudo_labels.csv is in {form.parent}/" \
           f"pseudo_labels-2.csv" in out
    # given back untouched, a form labels nothing: said in one line, before any work
    with open(tmp_path / "blank.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([dict(r, **{"class": ""}) for r in rows])
    err = coft_error(capsys, *coft_args(tmp_path, "--phase", "1", "--labels", str(tmp_path / "blank.csv"), out="b"))
    assert f"labels no image: every row of it ({len(rows)}) has an empty class cell; fill in the class" in err, err
    assert not (tmp_path / "b").exists()


def test_a_labels_file_is_the_few_labels_setting(tmp_path, pretrained_tiny):
    """--labels with the images --labelled-shots 2 draws, class by class in its order, trains what
    --labelled-shots trains: the paper's few-labels setting from a person's file."""
    task = data.digits_task()
    drawn = data.few_shot(task, 2, coft.seed_of(0, "labelled shots"), True)
    path = write_labels(tmp_path / "labels.csv", [(f"#{i}", task.classnames[task.train[i][1]]) for i in drawn.tolist()])
    a = run_coft(tmp_path, "--labelled-shots", "2", "--phase", "1", out="shots", ckpt=pretrained_tiny[0])
    b = run_coft(tmp_path, "--labels", str(path), "--phase", "1", out="file", ckpt=pretrained_tiny[0])
    for tag in ("phase1_round1_model1", "phase1_round1_model2"):
        sa, sb = stage_state(tmp_path / "shots", tag), stage_state(tmp_path / "file", tag)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), tag
    pa, pb = torch.load(tmp_path / "shots" / "pseudo_labels.pt"), torch.load(tmp_path / "file" / "pseudo_labels.pt")
    assert torch.equal(pa["labelled"], pb["labelled"])
    assert all(torch.equal(x, y) for x, y in zip(pa["clean"], pb["clean"]))
    assert b["labels"] == {"file": str(path), "size": 20, "per_class": [2] * 10} and a["seed_set"] == b["seed_set"]


@pytest.mark.parametrize("classes, argv, expect", [
    ("json", ("--llm-prompts", "P"), "--llm-prompts P and the prompts of --classes"),
    ("json", ("--template-ensemble",), "--template-ensemble is not used: the prompts of --classes"),
    ("json", ("--template", "a {}."), "--template and the prompts of --classes"),
    (None, ("--llm-prompts", "P", "--template", "a {}."), "--template is not used: the prompts of --llm-prompts P"),
    (None, ("--llm-prompts", "P", "--template-ensemble"), "--template-ensemble is not used"),
    (None, ("--llm-prompts", "P", "--template-ensemble", "--plus"), "--template-ensemble is not used"),
    (None, ("--method", "probe", "--labels", "L"), "--method probe fits the true label of every train image, so "
                                                   "--labels is not used"),
    (None, ("--method", "probe", "--labelled-shots", "2"), "so --labelled-shots is not used"),
])
def test_a_flag_the_run_would_leave_unread_is_refused(tmp_path, capsys, classes, argv, expect):
    """The zero-shot prompts come from one place (--llm-prompts, a {class: [prompts]} --classes file,
    or the templates): a flag the prompts in use leave unread is one line before any work, not a
    setting recorded in config.json and ignored; so are labels --method probe never reads. --plus
    with a prompts file is no conflict (its template ensemble stands in for missing prompts)."""
    root, _, _ = write_digit_layouts(tmp_path / "own", n_train=10, n_test=0)
    (root / "c.json").write_text(json.dumps({c: [f"a photo of the digit {c}."] for c in data.DIGIT_NAMES}))
    data_flags = ["--images", str(root / "flat"), "--classes", str(root / "c.json")] if classes else []
    argv = coft_args(tmp_path)[2 if classes else 0:] + data_flags + list(argv)
    assert coft_args(tmp_path)[:2] == ["--dataset", "digits"]
    err = coft_error(capsys, *argv)
    assert expect in err, err
    assert not (tmp_path / "run").exists()
    plus = coft.resolve_defaults(coft.parser().parse_args(data_flags + ["--plus"]))
    assert plus.template_ensemble
    coft.check_prompt_flags(plus, data.task_of(plus))  # no error


@pytest.mark.parametrize("argv, expect", [
    (("--method", "probe"), "--method probe fits the TRUE label"),
    (("--labelled-shots", "2"), "--labelled-shots N draws labelled images from the dataset's labels"),
    (("--eval-split", "dev"), "no dev split"),
    (("--dataset", "dtd"), "drop --dataset dtd"),
    (("--data-root", "x"), "drop --data-root"),
    (("--labels", "LABELS", "--labelled-shots", "1"), "give one of the two"),
    (("--labels", "EMPTY"), "labels no image"),
    (("--method", "shots"), "--labels FILE"),
])
def test_own_images_mistakes_are_one_line(tmp_path, capsys, digit_layouts, argv, expect):
    root = digit_layouts[0]
    write_labels(tmp_path / "labels.csv", [("0000.png", "zero")])
    write_labels(tmp_path / "empty.csv", [])
    argv = [str(tmp_path / "labels.csv") if a == "LABELS" else str(tmp_path / "empty.csv") if a == "EMPTY" else a
            for a in argv]
    err = coft_error(capsys, *own(root), "--out", str(tmp_path / "run"), *argv)
    assert expect in err, err
    assert not (tmp_path / "run").exists()
    assert "--images needs --classes" in coft_error(capsys, "--images", str(root / "flat"), "--out",
                                                    str(tmp_path / "r"))
    assert "--check goes with --images" in coft_error(capsys, "--check", str(root / "check"), "--out",
                                                      str(tmp_path / "r"))


class Decoded:
    """The train images as research code would hand them to coft.adapt: a sequence of images,
    each decoded from its file on demand as the CLI decodes it."""

    def __init__(self, task):
        self.task = task

    def __len__(self):
        return len(self.task.train)

    def __getitem__(self, i):
        return imagefiles.load_image(self.task.train[i][0], exif_orientation=self.task.exif_orientation)


@pytest.mark.parametrize("variant", [("--fft-init", "phase1"), ("--plus", "--rounds", "2", "--queue", "100")],
                         ids=["coft-vpt-carried", "coft+"])
def test_adapt_in_one_call_with_its_plain_loop_trains_what_the_cli_trains(tmp_path, pretrained_tiny, variant):
    """coft.adapt (the whole algorithm as one function, with its own training loop) and the CLI on
    the same settings and seed: the same seed sets, clean sets, Phase-I models, branch weights and
    ensemble predictions, bit for bit. CoFT with the Phase-I VPT carried into Phase II, and CoFT+
    (two rounds, the momentum queue, the template ensemble)."""
    ckpt = pretrained_tiny[0]
    argv = coft_args(tmp_path, *variant, "--p1-epochs", "1", "--fft-epochs", "1", ckpt=ckpt)
    coft.main(argv)
    args = coft.resolve_defaults(coft.parser().parse_args(argv))
    s = coft.settings_of(args)
    task = data.task_of(args)
    clip = checkpoints.load(str(ckpt), act="quick_gelu")[0].requires_grad_(False)
    transforms = {kind: data.make_transform(kind, clip.visual, task) for kind in ("test", "weak", "strong")}
    prompts = coft.zero_shot_prompts(task, None, args.template_ensemble, args.plus)
    adapted = coft.adapt(clip, coft.tokenize_for(clip), Decoded(task), task.classnames, prompts, transforms, s)

    run = tmp_path / "run"
    saved = torch.load(run / "pseudo_labels.pt")
    for theirs, ours in zip(saved["seed_sets"], adapted.seed_sets, strict=True):
        for (ia, ya), (ib, yb) in zip(theirs, ours, strict=True):
            assert torch.equal(ia, ib) and torch.equal(ya, yb)
    for a, d in enumerate(adapted.validated):
        idx, y = d.clean_set()
        assert torch.equal(saved["clean"][a], idx) and torch.equal(saved["clean_labels"][a], y)
    R = s.rounds
    trained = {f"phase1_round{R}_model{m + 1}": model for m, model in enumerate(adapted.phase1)}
    trained.update({f"branch{a + 1}": b for a, b in enumerate(adapted.classifier.branches)})
    for tag, model in trained.items():
        theirs, ours = stage_state(run, tag), model.state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours), tag
    evaluated = data.ImageDataset(data.eval_items(task, "test"), transforms["test"], exif_orientation=task.exif_orientation)
    fp32 = {"device_type": "cpu", "enabled": False}
    scores = train.predict(adapted.classifier, train.loader(evaluated, s.eval_batch, 0), "cpu", fp32)[0]
    assert torch.equal(scores.argmax(1), torch.load(run / "predictions.pt")["ensemble"])
    assert 0 < len(saved["clean"][0]) < len(task.train)  # the filter decided something


def test_adapt_runs_on_open_clip_as_on_this_projects_clip_with_the_same_weights():
    """coft.adapt on open_clip's CLIP (and its tokenizer) and on this project's CLIP loaded with
    the same weights, CoFT+ with VPT: the same seed sets and clean sets, and Phase-I and branch
    weights equal to float rounding (two implementations of the towers)."""
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image
    from torchvision.transforms import v2
    theirs = tiny_open_clip(open_clip, resnet=False, quick_gelu=False).requires_grad_(False)
    ours = cm.build_model(theirs.state_dict(), act="gelu", vision_heads=4).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(24)]
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cm.CLIP_MEAN, cm.CLIP_STD)]
    transforms = {"test": v2.Compose(tail), "weak": v2.Compose([v2.RandomCrop(32, padding=2)] + tail),
                  "strong": v2.Compose([v2.RandomResizedCrop(32, (0.5, 1.0)), v2.RandomHorizontalFlip()] + tail)}
    names = ["cat", "dog", "bird"]
    prompts = [[f"a photo of a {c}.", f"a {c}."] for c in names]
    s = coft.Settings(K=3, rounds=2, M=4, vpt_tokens=2, p1_epochs=2, fft_epochs=1, fft_lr=1e-3, contrast=True,
                      queue=16, batch=8, eval_batch=10)
    a = coft.adapt(theirs, lambda texts: open_clip.tokenize(texts, context_length=16), images, names, prompts,
                   transforms, s)
    b = coft.adapt(ours, coft.tokenize_for(ours), images, names, prompts, transforms, s)
    for sets_a, sets_b in zip(a.seed_sets, b.seed_sets, strict=True):
        for (ia, ya), (ib, yb) in zip(sets_a, sets_b, strict=True):
            assert torch.equal(ia, ib) and torch.equal(ya, yb)
    for da, db in zip(a.validated, b.validated):
        assert torch.equal(da.keep, db.keep) and torch.equal(da.labels, db.labels)
    for ma, mb in [*zip(a.phase1, b.phase1), *zip(a.classifier.branches, b.classifier.branches)]:
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert (sa[k].float() - sb[k].float()).abs().max() <= 1e-4 * max(sa[k].float().abs().max(), 1e-6), k
    trained = [k for k, d in enumerate(a.validated) if d.keep.any()]  # a branch with an empty clean set stays
    moved = a.classifier.branches[trained[0]].visual.conv1.weight if trained else theirs.visual.conv1.weight
    assert not torch.equal(moved, theirs.visual.conv1.weight)
