"""VeCAF (vecaf.py): the selection objective, nearest-unique selection, ODS, the ensemble's
matching and CEA, against direct recomputations and hand-made cases."""
import csv
import itertools
import json
import math
import shutil
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

import checkpoints
import clip_model as cm
import data
import runs
import vecaf
from clip_model import unit
from conftest import numbers, one_line_error, run_vecaf, vecaf_args, vecaf_stage, write_digit_layouts, write_labels


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


def test_margins_and_the_official_weight_transforms_by_hand():
    """margins: top-1 minus top-2 logit, at least 1e-4 (the official `margin_false`); the weight
    transforms against their formulas; a transform giving a weight <= 0 is refused."""
    logits = torch.tensor([[3.0, 1.0, 0.5], [2.0, 2.0, -1.0], [0.0, 4.0, 3.5]])
    assert torch.allclose(vecaf.margins(logits), torch.tensor([2.0, 1e-4, 0.5]))
    v = torch.tensor([0.5, 2.0, 3.0])
    assert torch.allclose(vecaf.objective_weights(v, "exp"), v.exp())
    assert torch.allclose(vecaf.objective_weights(v, "sigmoid"), v.sigmoid())
    assert torch.allclose(vecaf.objective_weights(v, "mean"), v / v.mean() + 1e-6)
    assert torch.allclose(vecaf.objective_weights(v, "normalize"), (v + 1e-6) / (v + 1e-6).norm())
    assert torch.allclose(vecaf.objective_weights(v + 1, "log"), (v + 1).log())
    with pytest.raises(ValueError, match="not all positive"):
        vecaf.objective_weights(v, "log")  # log 0.5 < 0


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


# ---- a run end to end (tiny backbone, digits)


def test_run_grows_the_selection_and_cea_moves_exactly_the_picks(tmp_path):
    m = run_vecaf(tmp_path, "--eval-grid", "3")
    run = tmp_path / "run"
    s1, s2 = vecaf_stage(run, "select1")["new"], vecaf_stage(run, "select2")["new"]
    selected = torch.load(run / "predictions.pt", weights_only=True)["selected"]
    # 6 new per loop, earlier picks kept first, never picked twice
    assert selected.tolist() == s1.tolist() + s2.tolist() and len(set(selected.tolist())) == 12
    assert [(loop["selected"], loop["new"]) for loop in m["loops"]] == [(6, 6), (12, 6)]
    # batch 4 with drop_last: 1 step per epoch on 6 images, 3 on 12 -> batches 2 then 2 + 6
    assert [loop["batches"] for loop in m["loops"]] == [2, 8] and m["batches"] == 8
    # evaluated every 3 batches counted over both loops, and at each loop's end
    assert [b for b, _ in m["curve"]] == [0, 2, 3, 6, 8] and m["final_acc"] == m["curve"][-1][1]
    # the loop-2 file's moved rows are CEA of the pretrained features towards the class-keyword
    # captions (the batch's distinct captions as keys), recomputed here from their definitions
    f = vecaf_stage(run, "features")["f"]
    task = data.load_task("digits")
    clip, _ = checkpoints.load(str(tmp_path / "tiny-vit.pt"), act="quick_gelu")
    t = cm.text_classifier(clip, cm.class_prompts(task.classnames, [task.templates[0]]), "cpu")
    rows = vecaf_stage(run, "loop2")["bank_rows"]
    y = torch.tensor([label for _, label in task.train])
    for k, new in enumerate((s1, s2)):
        keys, row = y[new].unique(return_inverse=True)
        expected = vecaf.cea(f[new], t[keys], row, 1.2, clip.logit_scale.exp().item())
        assert torch.allclose(rows[6 * k:6 * (k + 1)], expected, atol=1e-5)
    assert not torch.allclose(rows, f[selected], atol=1e-3)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    full = run_vecaf(tmp_path, out="full")
    # killed after loop 1 (loop 2 selects on the restored, CEA-moved features), after loop 2's
    # selection, after loop 2's first epoch
    for dies_at in ("loop1.pt", "select2.pt", "loop2.ckpt"):
        real_save = runs.atomic_save

        def dying_save(obj, path):
            real_save(obj, path)
            if Path(path).name == dies_at:
                raise KeyboardInterrupt
        monkeypatch.setattr(runs, "atomic_save", dying_save)
        with pytest.raises(SystemExit) as e:
            run_vecaf(tmp_path, out=f"killed-{dies_at}")
        monkeypatch.undo()
        assert e.value.code == 130 and not (tmp_path / f"killed-{dies_at}" / "stages" / "loop2.pt").exists()
        resumed = run_vecaf(tmp_path, "--resume", out=f"killed-{dies_at}")
        assert numbers(resumed) == numbers(full)
        for tag in ("loop2", "select2"):
            a, b = vecaf_stage(tmp_path / "full", tag), vecaf_stage(tmp_path / f"killed-{dies_at}", tag)
            if "model" in a:
                assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            else:
                assert torch.equal(a["new"], b["new"])


@pytest.mark.parametrize("method", ["random", "activeft"])
def test_a_pool_selected_to_its_last_image_has_no_repeat(tmp_path, method):
    """2 x 449 of 899 images: a loop that could pick an earlier loop's image would repeat some."""
    run_vecaf(tmp_path, "--method", method, "--budget", "449", "--epochs", "1", "--batch", "128")
    selected = torch.load(tmp_path / "run" / "predictions.pt", weights_only=True)["selected"]
    assert len(selected) == 898 and len(set(selected.tolist())) == 898


@pytest.mark.parametrize("method", ["random", "activeft", "ods", "cea", "full"])
def test_every_method_runs(tmp_path, method):
    m = run_vecaf(tmp_path, "--method", method, "--epochs", "1", "--eval-grid", "100")
    assert m["method"] == method
    assert m["selected"] == (899 if method == "full" else 12) and len(m["loops"]) == (1 if method == "full" else 2)


def test_bad_input_gets_one_line(tmp_path, capsys):
    err = one_line_error(vecaf.main, capsys, *vecaf_args(tmp_path, "--budget", "500"))
    assert "select 1000 but the pool" in err and "899" in err
    assert "unknown dataset 'mnist'" in one_line_error(vecaf.main, capsys, *vecaf_args(tmp_path, "--dataset", "mnist"))
    captions = {f"#{i}": f"a digit, number {i}" for i in range(899)}
    for change, message in ((lambda c: c.pop("#5"), "1 of 899 train images have no caption, e.g. '#5'"),
                            (lambda c: c.update({"#899": "x"}), "1 caption key not in the train pool, e.g. '#899'"),
                            (lambda c: c.update({" #3": "y"}), "gives one image two captions, as '#3' and ' #3'")):
        bad = dict(captions)
        change(bad)
        (tmp_path / "c.json").write_text(json.dumps(bad))
        assert message in one_line_error(vecaf.main, capsys, *vecaf_args(tmp_path, "--captions",
                                                                         str(tmp_path / "c.json")))
    # a key twice: JSON would keep its last caption without a word
    (tmp_path / "c.json").write_text(json.dumps(captions)[:-1] + ', "#7": "another"}')
    assert "gives '#7' two captions (JSON would keep only the last)" in one_line_error(
        vecaf.main, capsys, *vecaf_args(tmp_path, "--captions", str(tmp_path / "c.json")))
    # flags of a part the method does not use: refused, not recorded in config.json and ignored
    for method, flag, value in (("activeft", "--ood-captions", "a bold {}."), ("full", "--captions", "c.json"),
                                ("cea", "--ods-weights", "sigmoid"), ("random", "--ods-objective", "margin"),
                                ("ensemble", "--ods-weighting", "official")):
        err = one_line_error(vecaf.main, capsys, *vecaf_args(tmp_path, "--method", method, flag, value))
        assert f"{flag} " in err and f"--method {method} does not use" in err
    # a centroid lr that overflows the centroids: stopped, not picked in index order
    err = one_line_error(vecaf.main, capsys, *vecaf_args(tmp_path, "--method", "activeft", "--select-lr", "1e30",
                                                       out="diverged"))
    assert "loop 1: the centroid optimisation diverged" in err and "--select-lr 1e+30: lower it" in err
    # templates the class name cannot be put into once
    for flag, t in (("--ood-captions", "a {} bold {}."), ("--caption-template", "a {name} digit {}"),
                    ("--ood-captions", "bold"), ("--caption-template", "a {0} {}")):
        err = one_line_error(vecaf.main, capsys, *vecaf_args(tmp_path, flag, t))
        assert f"{flag} {t!r} needs exactly one {{}}" in err
    # --max-batches: the full-data reference only, and within its --epochs (899 // 4 = 224 per epoch)
    err = one_line_error(vecaf.main, capsys, *vecaf_args(tmp_path, "--max-batches", "5"))
    assert "--max-batches trains the full-data reference" in err and "--method vecaf's batches" in err
    err = one_line_error(vecaf.main, capsys, *vecaf_args(tmp_path, "--method", "full", "--max-batches", "449"))
    assert "more than --epochs 2 x 224 batches per epoch: raise --epochs to at least 3" in err
    assert not (tmp_path / "run").exists()  # nothing written before the checks
    # a run folder of another run: refused on --resume with what differs
    run_vecaf(tmp_path, "--method", "random", "--epochs", "1")
    err = one_line_error(vecaf.main, capsys, *vecaf_args(tmp_path, "--method", "activeft", "--epochs", "1",
                                                       "--resume"))
    assert "holds a run with other settings" in err and "method: 'random' -> 'activeft'" in err
    # a stage file of another run copied in: refused by its record
    run_vecaf(tmp_path, "--method", "activeft", "--epochs", "1", out="other")
    shutil.copy(tmp_path / "other" / "stages" / "select1.pt", tmp_path / "run" / "stages" / "select1.pt")
    (tmp_path / "run" / "stages" / "loop1.pt").unlink()
    (tmp_path / "run" / "stages" / "loop2.pt").unlink()
    err = one_line_error(vecaf.main, capsys, *vecaf_args(tmp_path, "--method", "random", "--epochs", "1", "--resume"))
    assert "select1.pt was made with other settings" in err


def test_captions_file_keys(tmp_path):
    pool = [(str(tmp_path / "a" / "x.jpg"), 0), (torch.zeros(3, 2, 2, dtype=torch.uint8), 1),
            (str(tmp_path / "b.png"), 1)]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"a/x.jpg": "a cat", "#1": " a dog ", str(tmp_path / "b.png"): "a dog again"}))
    assert vecaf.read_captions(path, pool, str(tmp_path)) == ["a cat", "a dog", "a dog again"]


def test_captions_from_an_image_capable_model_resume_where_they_stopped(tmp_path, monkeypatch):
    asked = []

    def caption(source, api_base, model, api_key=None, hint=None, exif_orientation=True):
        asked.append(hint)
        if len(asked) == 3:
            raise data.DataError("endpoint down")
        return f"a picture of {hint}"
    monkeypatch.setattr(vecaf.llm, "caption_image", caption)
    pool = [(torch.zeros(3, 2, 2, dtype=torch.uint8), k % 2) for k in range(4)]
    hints = ["cat", "dog"] * 2  # each image's class name where its label is known
    path = tmp_path / "c.json"
    with pytest.raises(data.DataError):  # failing before the first periodic save: what came back is kept
        vecaf.write_captions(path, pool, hints, None, "http://x", "m", save_every=50)
    assert json.loads(path.read_text()) == {"#0": "a picture of cat", "#1": "a picture of dog"}
    vecaf.write_captions(path, pool, hints, None, "http://x", "m", save_every=2)
    assert len(asked) == 5 and vecaf.read_captions(path, pool, None)[3] == "a picture of dog"
    for content in ("{not json", "[1, 2]", '{"#0": 3}'):  # refused before a single (paid) request
        path.write_text(content)
        with pytest.raises(vecaf.RunError, match="exists but is not"):
            vecaf.write_captions(path, pool, hints, None, "http://x", "m")
        assert len(asked) == 5 and path.read_text() == content


# ---- results: B2A, accuracy at equal batches, the plot

def test_b2a_and_accuracy_at_batches_on_a_known_curve():
    curve = [[0, 50.0], [10, 70.0], [20, 69.0], [30, 90.0]]
    assert vecaf.batches_to(curve, 70.0) == 10 and vecaf.batches_to(curve, 80.0) == 30
    assert vecaf.batches_to(curve, 95.0) is None
    assert vecaf.accuracy_at(curve, 25) == 69.0 and vecaf.accuracy_at(curve, 30) == 90.0
    assert vecaf.accuracy_at([[5, 1.0]], 4) is None


def test_full_data_to_a_budget_is_a_schedule_ending_there_measured_on_the_grid(tmp_path):
    """899 images in batches of 128: 7 per epoch. --max-batches 7 of 3 epochs is the 1-epoch run
    batch for batch (the schedule's total is 7, not 21), and both are evaluated every 3 batches
    (mid-epoch: a full-data epoch is no point of the grid) and at the end."""
    common = ("--method", "full", "--batch", "128", "--warmup-epochs", "0", "--eval-grid", "3")
    cut = run_vecaf(tmp_path, *common, "--epochs", "3", "--max-batches", "7", out="cut")
    one = run_vecaf(tmp_path, *common, "--epochs", "1", out="one")
    assert cut["batches"] == 7 and [b for b, _ in cut["curve"]] == [0, 3, 6, 7]
    assert cut["curve"] == one["curve"]
    a, b = vecaf_stage(tmp_path / "cut", "loop1")["model"], vecaf_stage(tmp_path / "one", "loop1")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def write_run(tmp_path, name, method, curve, grid=5, max_batches=None):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({
        "method": method, "curve": curve, "final_acc": curve[-1][1], "batches": curve[-1][0], "eval_grid": grid,
        "max_batches": max_batches, "selected": 10, "loops": [{"acc": curve[1][1]}], "time_s": {"total": 1.0}}))
    return str(d)


def test_table_reads_b2a_on_the_common_grid_and_full_data_at_its_own_budget(tmp_path, capsys):
    """The target comes from the full-data runs trained to their whole schedule (85 -> 80.75),
    not the one cut at 20 batches; B2A skips a loop end off the grid (81 at batch 7); acc@20 of a
    full-data run is the one whose schedule ends at 20, never a longer run read mid-schedule; a
    run on a grid of 2 makes the common grid 10; an unfinished run is named once and left out."""
    w = lambda *a, **k: write_run(tmp_path, *a, **k)  # noqa: E731
    folders = [w("full-s0", "full", [[0, 50.0], [5, 60.0], [10, 70.0], [100, 80.0]]),
               w("full-s1", "full", [[0, 50.0], [5, 60.0], [10, 85.0], [100, 90.0]]),
               w("full20-s0", "full", [[0, 50.0], [5, 65.0], [10, 70.0], [15, 75.0], [20, 82.0]], max_batches=20),
               w("vecaf-s0", "vecaf", [[0, 50.0], [4, 70.0], [7, 81.0], [10, 78.0], [15, 83.0], [20, 85.0]]),
               w("vecaf-s1", "vecaf", [[0, 50.0], [10, 70.0], [20, 79.0]])]

    def table(*extra):
        vecaf.main(["--table", *folders, *extra])
        out = capsys.readouterr().out
        # columns: run method selected batches loop1 final B2A reached acc@20
        return out, {line.split()[0]: line.split()[6:] for line in out.splitlines() if line.startswith(("vecaf-s",
                                                                                                          "full"))}
    (tmp_path / "unfinished-s0").mkdir()
    folders.append(str(tmp_path / "unfinished-s0"))
    out, rows = table("--plot", str(tmp_path / "c.svg"))
    assert out.count("unfinished-s0: no metrics.json (unfinished run)") == 1 and "unfinished-s0" not in rows
    folders.pop()
    assert "0.95 x full-data final accuracy 85.00 = 80.75" in out
    assert rows["vecaf-s0"] == ["15", "1.0", "85.0"] and rows["vecaf-s1"] == ["-", "0.0", "79.0"]
    assert rows["full-s0"] == ["-", "0.0", "-"] and rows["full-s1"] == ["10", "1.0", "-"]
    assert rows["full20-s0"] == ["20", "1.0", "82.0"]
    svg = ElementTree.parse(tmp_path / "c.svg").getroot()
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 3  # one mean curve per group
    assert len(lines[2].get("points").split()) == 6  # vecaf: every batch count measured
    folders.append(w("vecaf-s2", "vecaf", [[0, 50.0], [2, 60.0], [20, 79.0]], grid=2))
    out, rows = table()
    assert "common grid, every 10 batches" in out and rows["vecaf-s0"][0] == "20"
    del folders[2]
    out, rows = table()
    assert "there is none: add one with --method full --max-batches 20" in out


def test_table_refuses_runs_it_cannot_compare(tmp_path, capsys):
    good = write_run(tmp_path, "vecaf-s0", "vecaf", [[0, 50.0], [10, 70.0]])
    for name, content, message in (("craft", {"method": "craft", "shots": 1}, "holds a 'craft' run, not one of vecaf"),
                                   ("list", [1], "holds no run's metrics"),
                                   ("bare", {"method": "vecaf"}, "is not from a finished VeCAF run")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(content))
        err = one_line_error(vecaf.main, capsys, "--table", good, str(tmp_path / name))
        assert f"{name}/metrics.json" in err and message in err, err
    err = one_line_error(vecaf.main, capsys, "--table", str(tmp_path / "nope"), "--plot", str(tmp_path / "x.svg"))
    assert "no such folder" in err and not (tmp_path / "x.svg").exists()
    for plot, what in ((tmp_path / "nowhere" / "x.svg", "its folder does not exist"), (tmp_path, "is a folder")):
        err = one_line_error(vecaf.main, capsys, "--table", good, "--plot", str(plot))
        assert f"--plot {plot}: {what}" in err and not list(tmp_path.rglob("*.tmp"))
    # an existing file that is not an SVG (a mistyped name) is refused, an earlier plot overwritten
    (tmp_path / "notes.txt").write_text("mine")
    err = one_line_error(vecaf.main, capsys, "--table", good, "--plot", str(tmp_path / "notes.txt"))
    assert f"--plot {tmp_path / 'notes.txt'} exists and is not an SVG file" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "old.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"></svg>')
    vecaf.main(["--table", good, "--plot", str(tmp_path / "old.svg")])
    assert "polyline" in (tmp_path / "old.svg").read_text()
    old = json.loads((Path(good) / "metrics.json").read_text())
    del old["eval_grid"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps(old))
    assert "evaluated at epoch ends only" in one_line_error(vecaf.main, capsys, "--table", good, str(tmp_path / "old"))


# ---- the loop's wiring, pinned against independent computations

def test_ods_picks_the_images_its_objective_calls_hard_more_than_activeft(tmp_path, monkeypatch):
    """A stubbed per-sample objective calls a random fifth of the pool hard (loss 5, others 0.05):
    ODS (weighted-KL reading) must pick clearly more of them than ActiveFT on the same features
    and seeds, and with margins (small = hard under the official weighting, which moves centroids
    away from large weights) likewise. The features are stubbed too, spread over 8 dimensions (a
    random tiny CLIP's are nearly parallel, so any selection picks alike)."""
    N = 899
    monkeypatch.setattr(vecaf, "pool_features", lambda s: pool(N, d=8, seed=1))
    hard = torch.zeros(N, dtype=torch.bool)
    hard[torch.randperm(N, generator=torch.Generator().manual_seed(0))[:N // 5]] = True
    loss = torch.where(hard, 5.0, 0.05)
    margin = torch.where(hard, 0.05, 5.0)
    monkeypatch.setattr(vecaf, "per_sample_objective", lambda s, model: (loss, margin))
    counts = {}
    for method, extra in (("activeft", ()), ("ods", ()),
                          ("ods-margin", ("--ods-objective", "margin", "--ods-weighting", "official"))):
        run_vecaf(tmp_path, "--method", method.split("-")[0], *extra, "--loops", "1", "--budget", "40", "--iters",
                  "150", "--select-lr", "0.05", "--epochs", "1", out=method)
        counts[method] = int(hard[vecaf_stage(tmp_path / method, "select1")["new"]].sum())
    assert counts["ods"] >= counts["activeft"] + 15 and counts["ods-margin"] >= counts["activeft"] + 4, counts


def test_selection_reads_the_current_model_the_cea_moved_features_and_a_seed_per_selector(tmp_path, monkeypatch):
    """Loop l's ODS objective is computed with the model loop l - 1 fine-tuned (loop 1: the
    initial one); loop 2's centroids are optimised on the features with loop 1's picks moved by
    CEA; the ensemble's selectors each draw from a seed of their own."""
    seen_models, seen_features, seen_seeds = [], [], []
    objective, optimise = vecaf.per_sample_objective, vecaf.optimise_centroids

    def recording_objective(s, model):
        seen_models.append({k: v.clone() for k, v in model.state_dict().items()})
        return objective(s, model)

    def recording_optimise(features, K, seed, *a, **k):
        seen_features.append(features.clone())
        seen_seeds.append(seed)
        return optimise(features, K, seed, *a, **k)
    monkeypatch.setattr(vecaf, "per_sample_objective", recording_objective)
    monkeypatch.setattr(vecaf, "optimise_centroids", recording_optimise)
    run_vecaf(tmp_path, "--method", "vecaf")
    run = tmp_path / "run"
    loop1, loop2 = vecaf_stage(run, "loop1"), vecaf_stage(run, "loop2")
    assert len(seen_models) == 2 and all(torch.equal(seen_models[1][k], loop1["model"][k]) for k in loop1["model"])
    assert not all(torch.equal(seen_models[0][k], loop1["model"][k]) for k in loop1["model"])
    clip, _ = checkpoints.load(str(tmp_path / "tiny-vit.pt"), act="quick_gelu")
    task = data.load_task("digits")
    W = cm.text_classifier(clip, cm.class_prompts(task.classnames, [task.templates[0]]), "cpu")
    head = seen_models[0]["head.weight"]  # loop 1: the zero-shot head (ImageClassifier: logit_scale * W)
    assert torch.allclose(head, clip.logit_scale.exp() * W, atol=1e-5)
    # 2 selectors per loop: loop 1's read the pretrained features, loop 2's the CEA-moved ones
    assert len(seen_features) == 4 and len(set(seen_seeds)) == 4
    f = vecaf_stage(run, "features")["f"]
    s1 = vecaf_stage(run, "select1")["new"]
    assert torch.allclose(seen_features[0], unit(f)) and torch.equal(seen_features[2], seen_features[3])
    moved = unit(loop2["bank_rows"][:len(s1)])  # loop 1's picks after CEA
    assert torch.allclose(seen_features[2][s1], moved, atol=1e-6) and not torch.allclose(seen_features[2][s1],
                                                                                           unit(f[s1]), atol=1e-3)


def test_the_fine_tuning_recipe_is_every_term_of_its_flags(tmp_path, monkeypatch):
    """Loop 1's first logged loss recomputed by hand (cross-entropy with label smoothing of the
    initial model on the first batch), and the optimiser and schedule train.fit is given: SGD
    with the flags' momentum and weight decay, lr warm-up then cosine."""
    import conftest
    import train
    calls = []
    real_fit = train.fit

    def recording_fit(*a, **k):
        args = conftest.fit_arguments(*a, **k)
        model, loader = args["model"], args["batches"](0)
        x, y, _ = next(iter(loader))
        with torch.no_grad():
            by_hand = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.2).item()
        history = real_fit(**args)
        calls.append((by_hand, history, args["opt"], args["schedule"]))
        return history
    monkeypatch.setattr(train, "fit", recording_fit)
    run_vecaf(tmp_path, "--method", "random", "--label-smoothing", "0.2", "--momentum", "0.7", "--weight-decay",
              "0.003", "--lr", "0.02", "--warmup-epochs", "2", "--epochs", "4", "--loops", "1")
    by_hand, history, opt, schedule = calls[0]
    assert history["loss"][0] == pytest.approx(by_hand, rel=1e-5)
    group = opt.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["initial_lr"]) == (0.7, 0.003, 0.02)
    # 6 images, batch 4, the last one dropped: one step per epoch; two warm-up steps, then a cosine over the rest
    assert [schedule(i, 4, 1) for i in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.5])


# ---- a person in the loop (--labels)

def play_the_person(tmp_path, argv, labels, truth, edit=None):
    """Run the CLI until it finishes, labelling between stops exactly the images it asks for (their
    true classes appended to the labels file, a file of the person's own). Returns (metrics, the
    requests: [(loop, [path])])."""
    requests = []
    labels.write_text("path,class\n")
    while True:
        try:
            return vecaf.main(argv), requests
        except SystemExit as e:
            assert e.code == runs.WAITING
        loop = len(requests) + 1
        asked = list(csv.DictReader(open(tmp_path / "run" / f"to_label_loop{loop}.csv")))
        assert {r["loop"] for r in asked} == {str(loop)} and all(r["suggestion"] for r in asked)
        assert all(r["class"] == "" for r in asked)  # a form: the class is the person's to fill in
        requests.append((loop, [r["path"] for r in asked]))
        with open(labels, "a") as f:
            f.writelines(f"{r['path']},{truth[r['path']]}\n" for r in asked)


def test_a_person_in_the_loop_trains_what_the_simulation_trains(tmp_path, capsys):
    """VeCAF with --labels stops at each loop with the images to label; a person who writes exactly
    those rows (here: their true classes) and reruns the same command gets the picks and weights of
    the simulated run with the same label-free selection (ODS by margin), which reads the dataset's
    labels instead. Every stop is one line on what to do next, the run is exact across stops, and
    each loop's list stays, as the run wrote it (the record of what was asked)."""
    task = data.load_task("digits")
    truth = {f"#{i}": task.classnames[y] for i, (_, y) in enumerate(task.train)}
    simulated = run_vecaf(tmp_path, "--ods-objective", "margin", out="simulated")
    labels = tmp_path / "labels.csv"
    person, requests = play_the_person(tmp_path, vecaf_args(tmp_path, "--labels", str(labels)), labels, truth)
    picks = [vecaf_stage(tmp_path / "simulated", f"select{l}")["new"].tolist() for l in (1, 2)]
    assert requests == [(1, [f"#{i}" for i in picks[0]]), (2, [f"#{i}" for i in picks[1]])]
    for tag in ("loop1", "loop2"):
        a, b = vecaf_stage(tmp_path / "simulated", tag), vecaf_stage(tmp_path / "run", tag)
        assert torch.equal(a["selected"], b["selected"]) and all(torch.equal(a["model"][k], b["model"][k])
                                                                 for k in a["model"])
    assert person["curve"] == simulated["curve"] and person["ods_objective"] == "margin"
    assert all(loop["loss_new"] is None for loop in person["loops"])  # the person never labelled the pool
    record = json.loads((tmp_path / "run" / runs.PERSON_FILES).read_text())
    assert record["waiting"] is None and sorted(record["files"]) == ["to_label_loop1.csv", "to_label_loop2.csv"]
    assert all(runs.sha256_file(tmp_path / "run" / name) == sha for name, sha in record["files"].items())
    err = capsys.readouterr().err
    assert err.count("waiting: loop") == 2 and "fill in the class column of" in err and "then run again" in err
    assert f"or add rows path,class for them to {labels}" in err


def test_a_labels_file_that_changes_what_a_finished_loop_trained_on_is_one_line_and_nothing_is_lost(tmp_path,
                                                                                                   capsys):
    """After loop 1 trained: a row changed is refused, naming it; put back, the run goes on from loop 2
    (loop 1 is not redone); a row removed is no change (the run keeps the labels each finished loop
    trained on). A labels file with a bad row is one line before any work."""
    task = data.load_task("digits")
    truth = {f"#{i}": task.classnames[y] for i, (_, y) in enumerate(task.train)}
    labels = tmp_path / "labels.csv"
    argv = vecaf_args(tmp_path, "--labels", str(labels))
    labels.write_text("path,class\n")
    with pytest.raises(SystemExit):
        vecaf.main(argv)
    asked = [r["path"] for r in csv.DictReader(open(tmp_path / "run" / "to_label_loop1.csv"))]
    good = "path,class\n" + "".join(f"{p},{truth[p]}\n" for p in asked)
    labels.write_text(good)
    with pytest.raises(SystemExit):  # loop 1 trains, loop 2 asks
        vecaf.main(argv)
    capsys.readouterr()
    loop1 = (tmp_path / "run" / "stages" / "loop1.pt").stat().st_mtime_ns
    wrong = "nine" if truth[asked[2]] != "nine" else "one"
    labels.write_text(good.replace(f"{asked[2]},{truth[asked[2]]}", f"{asked[2]},{wrong}"))
    err = one_line_error(vecaf.main, capsys, *argv)
    assert f"line 4 gives '{asked[2]}' the class '{wrong}', but loop 1 trained on '{truth[asked[2]]}'" in err
    other = wrong if truth[asked[0]] != wrong else "one"
    for row, expect in ((f"{asked[0]},cow\n", "class 'cow' is not one of"),
                        ("#99999,one\n", "is not an image of the pool"),
                        (f"{asked[0]},{other}\n", "but line 2 labelled it")):
        labels.write_text(good + row)
        assert expect in one_line_error(vecaf.main, capsys, *argv)
    for content in (good, good.replace(f"{asked[2]},{truth[asked[2]]}\n", ""), "path,class\n"):
        labels.write_text(content)  # put back, or rows of loop 1 removed: loop 2 asks again, loop 1 untouched
        with pytest.raises(SystemExit) as e:
            vecaf.main(argv)
        assert e.value.code == runs.WAITING and (tmp_path / "run" / "stages" / "loop1.pt").stat().st_mtime_ns == loop1
    capsys.readouterr()
    # what needs labels a person has not given: refused, or only the labels given are used
    assert "use --ods-objective margin" in one_line_error(vecaf.main, capsys, *vecaf_args(
        tmp_path, "--labels", str(labels), "--ods-objective", "loss", out="loss"))
    root, _, _ = write_digit_layouts(tmp_path / "own", n_train=40, n_test=0)
    own = ["--images", str(root / "flat"), "--classes", str(root / "classes.txt")]
    assert "give --labels FILE" in one_line_error(vecaf.main, capsys, *without_dataset(vecaf_args(tmp_path, *own,
                                                                                                  out="own")))


def fill_in_the_list_it_names(err, truth):
    """The person at a stop: reads the waiting line, opens the list it names, fills in the class of
    every row without one (adding the column where the list has none) and saves it in place, as a
    spreadsheet or a script does. Returns (the list's path, its bytes as the person left it)."""
    import re
    line = [l for l in err.splitlines() if l.startswith("waiting: ")][-1]
    listed = Path(re.search(r"(?:class column of|not labelled yet in|listed in) (\S+?\.csv)", line).group(1))
    with open(listed, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames), list(reader)
    if "class" not in header:
        header.insert(1, "class")
    for r in rows:
        r["class"] = r.get("class") or truth[data.csv_untext(r["path"])]
    with open(listed, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return listed, listed.read_bytes()


def test_a_person_who_fills_in_each_list_in_place_and_gives_it_back_loses_nothing(tmp_path, capsys):
    """The natural action (issue 45) on your own images: at each stop the person fills in the class
    column of the list the run names, in place, and gives that very file as --labels (the first run's
    labels file does not exist). Three loops later: every list the person wrote is byte for byte as
    they left it, no file was deleted, and the weights, picks and predictions are those of the
    simulated person (--dataset imagefolder on the same images in the same order, reading their labels:
    the same label-free selection)."""
    root, classes_of, _ = write_digit_layouts(tmp_path / "own", n_train=60, n_test=20)
    truth = {f"{n:04d}.png": name for n, name in enumerate(classes_of)}
    flags = ["--budget", "5", "--loops", "3", "--ods-objective", "margin"]
    simulated = vecaf.main(vecaf_args(tmp_path, *flags, "--data-root", str(root / "labelled"), out="simulated")
                           [2:] + ["--dataset", "imagefolder"])
    own = ["--images", str(root / "flat"), "--classes", str(root / "classes.txt"), "--check", str(root / "check")]
    argv = without_dataset(vecaf_args(tmp_path, *flags, *own, out="run"))
    labels, written, asked = tmp_path / "labels.csv", {}, []
    while True:
        try:
            person = vecaf.main(argv + ["--labels", str(labels)])
            break
        except SystemExit as e:
            assert e.code == runs.WAITING
        labels, content = fill_in_the_list_it_names(capsys.readouterr().err, truth)
        written[labels] = content
        asked.append(labels.name)
        assert len(asked) <= 3
    assert asked == ["to_label_loop1.csv", "to_label_loop2.csv", "to_label_loop3.csv"]
    assert all(path.read_bytes() == content for path, content in written.items())
    assert not (tmp_path / "labels.csv").exists()
    for loop in (1, 2, 3):
        a, b = vecaf_stage(tmp_path / "simulated", f"loop{loop}"), vecaf_stage(tmp_path / "run", f"loop{loop}")
        assert torch.equal(a["selected"], b["selected"]) and all(torch.equal(a["model"][k], b["model"][k])
                                                                 for k in a["model"]), loop
        classes = (root / "classes.txt").read_text().split()  # the loop trained on the person's classes
        assert [classes[y] for y in b["labels"].tolist()] == [classes_of[i] for i in b["selected"].tolist()]
    pa, pb = torch.load(tmp_path / "simulated" / "predictions.pt"), torch.load(tmp_path / "run" / "predictions.pt")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert numbers(person)["curve"] == numbers(simulated)["curve"] and person["selected"] == 15


def without_dataset(argv):
    i = argv.index("--dataset")
    return argv[:i] + argv[i + 2:]


def test_write_captions_hints_only_the_classes_a_person_gave(tmp_path, monkeypatch, capsys):
    """--write-captions on your own images: no class hint where no label is known (said how many);
    with --labels, the given classes are the hints."""
    hints = []
    monkeypatch.setattr(vecaf.llm, "caption_image", lambda source, *a, hint=None, **k: hints.append(hint) or "x")
    root, _, _ = write_digit_layouts(tmp_path / "own", n_train=5, n_test=0)
    own = ["--images", str(root / "flat"), "--classes", str(root / "classes.txt")]
    labels = write_labels(tmp_path / "labels.csv", [("0003.png", "seven")])
    vecaf.main(own + ["--labels", str(labels), "--write-captions", str(tmp_path / "c.json")])
    assert hints == [None, None, None, "seven", None] and "4 of 5 images have no label" in capsys.readouterr().out
    hints.clear()
    vecaf.main(["--write-captions", str(tmp_path / "d.json")] + vecaf_args(tmp_path)[:2])  # the digits: all labelled
    assert len(hints) == 899 and None not in hints
