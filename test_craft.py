"""CraFT (craft.py): the black box, the losses, the run, resume and the CLI's errors."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import clip_model as cm
import craft
import data
import train
from conftest import (craft_args, make_dtd, make_imagefolder, numbers, one_line_error, randomized, tower,
                      write_digit_layouts, write_image, write_labels)

CLASSES = ["zero", "one", "two", "sea lion", "three"]  # one two-token name


def tiny_box(name="tiny-vit", classes=CLASSES):
    clip = randomized(name)
    return clip, craft.BlackBox(clip, classes, torch.device("cpu"), dict(device_type="cpu", enabled=False))


def images(clip, n, seed=0):
    R = clip.visual.resolution
    return torch.randn(n, 3, R, R, generator=torch.Generator().manual_seed(seed))


def as_dataset(x):
    """Ready image tensors [N, 3, R, R] as an (image, label, index) dataset (tensor sources pass as they are)."""
    return data.ImageDataset([(xi, 0) for xi in x], lambda t: t)


# ---- the black box

def test_the_box_with_p0_equals_clip_on_the_written_prompt():
    """The box's prompt assembly ([SOS] + context embeddings + "{class}." ids, shared-prefix
    encoding) equals plain CLIP on the tokenized text "a photo of a {class}.", computed here by hand."""
    for name in ("tiny-vit", "tiny-rn"):
        clip, box = tiny_box(name)
        x = images(clip, 4)
        p0 = box.word_embeddings("a photo of a")
        assert p0.shape == (4, clip.cfg.transformer_width)
        l = box.logits(p0[None], x)[0]  # [4, C]
        t = F.normalize(clip.encode_text(cm.tokenize([f"a photo of a {c}." for c in CLASSES])), dim=-1)
        ref = 100 * F.normalize(clip.encode_image(x), dim=-1) @ t.T
        assert (l - ref).abs().max() < 1e-3
        # and the hard-prompt path (the zero-shot reference) gives the same on an uploaded set
        box.upload("x", as_dataset(x))
        assert (box.hard_prompt_logits([[f"a photo of a {c}."] for c in CLASSES], "x") - ref).abs().max() < 1e-3


def test_the_box_hands_out_no_gradients_and_counts_exactly():
    clip, box = tiny_box()
    ctx = (0.02 * torch.randn(3, 4, clip.cfg.transformer_width)).requires_grad_()
    x = images(clip, 5)
    out = box.logits(ctx, x)
    assert out.shape == (3, 5, len(CLASSES)) and not out.requires_grad and out.grad_fn is None
    assert box.queries == {"prompts": 3, "images": 5}
    assert not any(isinstance(v, torch.nn.Parameter) or (torch.is_tensor(v) and v.requires_grad)
                   for v in vars(box).values())
    box.upload("set", as_dataset(images(clip, 7)))
    assert box.queries == {"prompts": 3, "images": 12}
    box.logits(ctx, "set")  # the same contexts: remembered, not queried again; uploaded images: not re-encoded
    assert box.queries == {"prompts": 3, "images": 12}
    box.logits(ctx[:1], "set")
    box.forget()
    box.logits(ctx[:1], "set")
    assert box.queries == {"prompts": 5, "images": 12}
    # raw=True (the official MLP-step quirk): logits scaled by each image's feature norm
    v = clip.encode_image(x)
    raw, cos = box.logits(ctx[:1], x, raw=True)[0], box.logits(ctx[:1], x)[0]
    assert torch.allclose(raw, cos * v.norm(dim=-1, keepdim=True), rtol=1e-4, atol=1e-4)


def test_prompt_generator_is_p0_plus_a_fixed_random_projection():
    p0 = torch.randn(4, 8)
    gen = craft.PromptGenerator(p0, d=6, std=0.5, seed=3)
    assert torch.equal(gen(torch.zeros(2, 6)), p0.expand(2, 4, 8))
    z = torch.randn(3, 6)
    assert torch.allclose(gen(z), p0 + (z @ gen.A.T).view(3, 4, 8))
    assert torch.allclose(gen(z)[1] - p0, (gen.A @ z[1]).view(4, 8), atol=1e-6)  # reshape row-major, per candidate
    assert torch.equal(craft.PromptGenerator(p0, 6, 0.5, 3).A, gen.A)
    assert abs(gen.A.std().item() - 0.5) < 0.15


# ---- the losses

def test_both_kl_terms_equal_direct_recomputations_in_their_directions():
    torch.manual_seed(0)
    P, N, C = 3, 7, 5
    l, y = 3 * torch.randn(P, N, C), torch.randint(0, C, (N,))
    refiner = craft.Refiner(C, hidden=16)
    with torch.no_grad():
        refiner.g[2].weight *= 30  # a refiner that moves the prediction well away from P_I
    lam = 0.3
    f = craft.fitness(l, y, refiner, lam)
    for p in range(P):  # L_I = CE(l, y) + lam KL(P_O || P_I), F.kl_div(input=log P_I, target=P_O)
        ref = F.cross_entropy(l[p], y) + lam * F.kl_div(F.log_softmax(l[p], -1), F.softmax(refiner(l[p]), -1),
                                                          reduction="batchmean")
        assert torch.allclose(f[p], ref, atol=1e-6)
        wrong = F.cross_entropy(l[p], y) + lam * F.kl_div(F.log_softmax(refiner(l[p]), -1), F.softmax(l[p], -1),
                                                            reduction="batchmean")
        assert not torch.allclose(f[p], wrong, atol=1e-4)  # KL is not symmetric: the direction is pinned
    # L_O = CE(l + g(l), y) + lam_O KL(P_I || P_O)
    lo = craft.refinement_loss(l[0], y, refiner, lam)
    y_hat = refiner(l[0])
    ref = F.cross_entropy(y_hat, y) + lam * F.kl_div(F.log_softmax(y_hat, -1), F.softmax(l[0], -1),
                                                     reduction="batchmean")
    assert torch.allclose(lo, ref, atol=1e-6)
    wrong = F.cross_entropy(y_hat, y) + lam * F.kl_div(F.log_softmax(l[0], -1), F.softmax(y_hat, -1),
                                                       reduction="batchmean")
    assert not torch.allclose(lo, wrong, atol=1e-4)
    lo.backward()  # the refiner learns from L_O
    assert refiner.g[0].weight.grad.abs().sum() > 0


def test_fitness_is_plain_ce_without_the_kl_or_with_a_silent_refiner():
    torch.manual_seed(1)
    l, y = 2 * torch.randn(4, 9, 6), torch.randint(0, 6, (9,))
    ce = torch.stack([F.cross_entropy(l[p], y) for p in range(4)])
    refiner = craft.Refiner(6, hidden=8)
    assert torch.allclose(craft.fitness(l, y, refiner, 0.0), ce, atol=1e-6)
    assert torch.allclose(craft.fitness(l, y, None, 1.0), ce, atol=1e-6)  # BBT
    torch.nn.init.zeros_(refiner.g[2].weight)
    torch.nn.init.zeros_(refiner.g[2].bias)  # g(l) = 0: P_O = P_I, KL = 0
    assert torch.allclose(craft.fitness(l, y, refiner, 5.0), ce, atol=1e-6)
    assert not torch.allclose(craft.fitness(l, y, craft.Refiner(6, 8), 5.0), ce, atol=1e-3)


def test_the_refiners_kl_term_switches_off_after_budget_over_n_queries():
    assert [craft.consistency_weight(t, 8000, 4, 0.1) for t in (40, 2000, 2040, 8000)] == [0.1, 0.1, 0.0, 0.0]
    assert craft.consistency_weight(8000, 8000, 1, 0.1) == 0.1


def test_budgets_epochs_and_dataset_settings_follow_the_official_scripts():
    """The official configs per dataset; budgets by shots (the ImageNet script's 4000 at 8-16
    shots, not the other scripts' 8000) and its 8-100% crop; CoOp's epochs by shots (ImageNet:
    50 at every shot count)."""
    assert [craft.budget_for(k) for k in (1, 2, 4, 8, 16)] == [2000, 4000, 4000, 8000, 8000]
    assert [craft.budget_for(k, "ImageNet") for k in (1, 2, 4, 8, 16)] == [2000, 4000, 4000, 4000, 4000]
    assert [craft.coop_epochs_for(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert [craft.coop_epochs_for(k, "imagenet") for k in (1, 2, 4, 8, 16)] == [50] * 5

    def resolved(*argv):
        args = craft.resolve_defaults(craft.parser().parse_args(list(argv)))
        return args, craft.settings_of(args)
    args, hp = resolved("--dataset", "dtd", "--shots", "4")
    assert (args.budget, args.sigma0, args.bound, args.a_std, args.n, args.batch, args.lam, args.hidden) == \
        (4000, 0.02, 5, 1.0, 1, 256, 0.001, 256)
    assert (hp.aug, hp.coop_epochs) == ("crop", 100)
    args, hp = resolved("--dataset", "imagenet", "--sigma0", "0.5")
    assert (args.budget, args.sigma0, args.bound, args.lam, args.hidden) == (4000, 0.5, 0.0, 0.0, 512)
    assert (hp.aug, hp.coop_epochs) == ("inception", 50)
    assert resolved("--dataset", "imagenet", "--budget", "8000", "--coop-epochs", "200")[1].coop_epochs == 200
    args, _ = resolved("--dataset", "oxford_pets", "--shots", "1")
    assert (args.budget, args.batch, args.n) == (2000, 64, 1)
    task = data.load_task("digits")
    crops = {kind: data.make_transform(kind, tower(224), task).transforms[1] for kind in ("crop", "inception")}
    assert crops["crop"].scale == (0.5, 1.0) and crops["inception"].scale == (0.08, 1.0)


def test_the_fitness_view_is_drawn_from_the_runs_seed(tmp_path, monkeypatch):
    """The augmented view the fitness scores (uploaded once) is drawn from --seed, as the official
    code's view comes from its seed: the same shots under seeds 0 and 1 get other crops, and seed 0
    again the same ones."""
    views = []
    upload = craft.BlackBox.upload

    def recording(box, name, *a, **k):
        upload(box, name, *a, **k)
        if name == "view":
            views.append(box._images["view"].clone())
    monkeypatch.setattr(craft.BlackBox, "upload", recording)
    shots = data.few_shot(data.load_task("digits"), 2, 0)
    monkeypatch.setattr(craft.data, "few_shot", lambda *a, **k: shots)  # the same images under every seed
    for seed, out in ((0, "a"), (1, "b"), (0, "c")):
        craft.main(craft_args(tmp_path, "--method", "bbt", "--aug", "crop", "--budget", "8", "--seed", str(seed),
                              out=out))
    assert torch.equal(views[0], views[2]) and not torch.allclose(views[0], views[1], atol=1e-3)


def test_few_shot_sampling():
    task = data.load_task("digits")
    a, b = data.few_shot(task, 4, 0), data.few_shot(task, 4, 1)
    y = torch.tensor([label for _, label in task.train])
    assert len(a) == 40 and torch.equal(y[a], torch.arange(10).repeat_interleave(4))
    assert len(set(a.tolist())) == 40 and torch.equal(a, data.few_shot(task, 4, 0)) and not torch.equal(a, b)
    assert torch.equal(data.few_shot(task, 2, 0), a.view(10, 4)[:, :2].flatten())  # shots nest within a seed
    with pytest.raises(data.DataError, match="class 'zero' of digits has only 89 train images; use --shots 87 or fewer"):
        data.few_shot(task, 90, 0)
    # CoFT's labelled shots: a smaller class is taken whole, the others drawn as before
    whole = data.few_shot(task, 90, 0, all_of_smaller_classes=True)
    sizes = torch.bincount(y, minlength=10)
    assert torch.equal(torch.bincount(y[whole], minlength=10), sizes.clamp(max=90)) and len(set(whole.tolist())) == len(whole)
    assert torch.equal(data.few_shot(task, 4, 0, all_of_smaller_classes=True), a)


# ---- a run, end to end (tiny)

def test_a_run_counts_its_queries_and_records_its_result(tmp_path, pretrained_tiny):
    G, P, K, C, N_dev = 6, 8, 2, 10, 179
    m = craft.main(craft_args(tmp_path, ckpt=pretrained_tiny[0]))
    # 2 zero-shot prompts, per generation popsize candidates + the refiner epoch's prompt, the final prompt;
    # images: the eval split and the shots once (digits: no augmentation, the refiner reuses the upload)
    assert m["queries"] == {"prompts": 2 + G * (P + 1) + 1, "images": N_dev + K * C, "search": 48}
    assert len(m["history"]["best_fitness"]) == G and len(m["history"]["refine_loss"]) == G
    assert m["deploy_params"]["refiner"] == (C * 256 + 256) + (256 * C + C)
    preds = torch.load(tmp_path / "run" / "predictions.pt")
    y_dev = torch.tensor([label for _, label in data.load_task("digits").dev])
    assert m["craft_acc"] == pytest.approx(train.accuracy(F.one_hot(preds["craft"], C).float(), y_dev))
    for method, prompts in (("bbt", 2 + G * (P + 1) + 1), ("mlp", 2 + G + 1)):
        mm = craft.main(craft_args(tmp_path, "--method", method, out=method, ckpt=pretrained_tiny[0]))
        assert mm["queries"]["prompts"] == prompts and f"{method}_acc" in mm
        assert mm["zero_shot_acc"] == m["zero_shot_acc"] and mm["p0_acc"] == m["p0_acc"]
    for method in ("coop", "probe"):
        mm = craft.main(craft_args(tmp_path, "--method", method, "--coop-epochs", "2", out=method,
                                   ckpt=pretrained_tiny[0]))
        assert mm["queries"]["search"] == 0 and 0 <= mm[f"{method}_acc"] <= 100


def test_without_augmentation_the_refiner_reuses_the_uploaded_view(tmp_path, monkeypatch):
    """--aug none trains the refiner on the uploaded view's logits (no image re-encoded); the same
    run with --aug crop, its crop replaced by the plain test transform, re-encodes every batch and
    must train the same refiner."""
    reused = craft.main(craft_args(tmp_path, "--method", "mlp", "--aug", "none", out="reused"))
    make_transform = data.make_transform
    monkeypatch.setattr(craft.data, "make_transform", lambda kind, *a: make_transform("test", *a))
    encoded = craft.main(craft_args(tmp_path, "--method", "mlp", "--aug", "crop", out="encoded"))
    G, K, C, N_dev = 6, 2, 10, 179
    assert reused["queries"]["images"] == N_dev + K * C
    assert encoded["queries"]["images"] == N_dev + K * C + G * K * C
    assert reused["queries"]["prompts"] == encoded["queries"]["prompts"] == 2 + G + 1
    a, b = (torch.load(tmp_path / d / "stages" / "collaborate.ckpt", weights_only=True)["refiner"]
            for d in ("reused", "encoded"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert reused["history"]["refine_loss"] == pytest.approx(encoded["history"]["refine_loss"], rel=1e-5)


def test_a_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    whole = craft.main(craft_args(tmp_path, out="whole"))
    fit, calls = train.fit, []

    def dies_in_generation_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return fit(*a, **k)
    monkeypatch.setattr(craft.train, "fit", dies_in_generation_4)
    with pytest.raises(SystemExit):
        craft.main(craft_args(tmp_path, out="killed"))
    assert torch.load(tmp_path / "killed" / "stages" / "collaborate.ckpt", weights_only=True)["generation"] == 2
    monkeypatch.setattr(craft.train, "fit", fit)
    resumed = craft.main(craft_args(tmp_path, "--resume", out="killed"))
    assert numbers(resumed) == numbers(whole)
    a, b = (torch.load(tmp_path / d / "stages" / "collaborate.ckpt", weights_only=True) for d in ("whole", "killed"))
    assert all(torch.equal(a["refiner"][k], b["refiner"][k]) for k in a["refiner"]) and torch.equal(a["z"], b["z"])


def cli_error(capsys, *argv):
    return one_line_error(craft.main, capsys, *argv)


def test_bad_input_gets_one_line(tmp_path, capsys):
    err = cli_error(capsys, *craft_args(tmp_path, "--shots", "100"))
    assert "--shots 100: class" in err and "use --shots 87 or fewer" in err
    assert "smaller than one CMA-ES generation" in cli_error(capsys, *craft_args(tmp_path, "--budget", "7"))
    # popsize 8: a budget the search would not spend whole, an empty context
    assert "not a whole number of CMA-ES generations of --popsize 8 queries: give 16 or 24" in cli_error(
        capsys, *craft_args(tmp_path, "--budget", "19"))
    assert "--ctx-init is empty" in cli_error(capsys, *craft_args(tmp_path, "--ctx-init", " "))
    # a search that leaves the text tower's range, a refiner that diverges: one line naming where
    err = cli_error(capsys, *craft_args(tmp_path, "--sigma0", "1e30", "--bound", "0", out="far"))
    assert "generation 1: non-finite prompt fitness" in err and "no checkpoint was written yet" in err
    err = cli_error(capsys, *craft_args(tmp_path, "--lr", "1e30", out="diverged"))
    assert "generation 1: the refiner diverged in its epoch" in err and "--lr 1e+30" in err
    # a refiner that diverges in the last (here the only) generation: one line, no result written (its
    # outputs non-finite behind a finite loss would name one class for every image)
    for method in ("craft", "mlp"):
        err = cli_error(capsys, *craft_args(tmp_path, "--lr", "1e30", "--budget", "8", "--method", method,
                                            out=f"last-{method}"))
        assert "generation 1: the refiner diverged in its epoch" in err
        assert not (tmp_path / f"last-{method}" / "metrics.json").exists()
    err = cli_error(capsys, *craft_args(tmp_path, "--lr", "1e17", "--method", "mlp", "--ckpt-every", "1",
                                        out="diverged-mlp"))
    assert "the refiner's epoch in generation 2: non-finite loss" in err and "this loop keeps no checkpoint" in err
    assert "CraFT's run: its last checkpoint is" in err and "(generation 1)" in err
    assert "unknown dataset" in cli_error(capsys, *craft_args(tmp_path, "--dataset", "mnist"))
    assert "data-root" in cli_error(capsys, *craft_args(tmp_path, "--dataset", "dtd"))
    make_dtd(tmp_path / "DATA")
    assert "--shots 3: class" in cli_error(capsys, *craft_args(tmp_path, "--dataset", "dtd", "--data-root",
                                                                str(tmp_path / "DATA"), "--shots", "3"))
    assert "unknown model 'ViT-X'" in cli_error(capsys, "--clip", "ViT-X", "--out", str(tmp_path / "x"))
    # an unreadable image: named before any work (nothing is written)
    make_imagefolder(tmp_path / "IF")
    (tmp_path / "IF" / "train" / "cat" / "0.png").write_bytes(b"not a png")
    err = cli_error(capsys, *craft_args(tmp_path, "--dataset", "imagefolder", "--data-root", str(tmp_path / "IF"),
                                        "--eval-split", "test", "--shots", "2", out="if"))
    assert "imagefolder: 1 of 8 images cannot be read (train/cat/0.png: not an image" in err
    assert not (tmp_path / "if").exists()
    assert not (tmp_path / "run").exists()  # nothing was written by a refused run
    craft.main(craft_args(tmp_path, "--budget", "16"))
    err = cli_error(capsys, *craft_args(tmp_path, "--budget", "24", "--resume"))
    assert "other settings" in err and "budget: 16 -> 24" in err
    assert "holds a run already" in cli_error(capsys, *craft_args(tmp_path, "--budget", "16"))
    # --restart discards the run only once every check passed: a context too long for the backbone
    err = cli_error(capsys, *craft_args(tmp_path, "--budget", "16", "--restart", "--ctx-init", "a " * 20))
    assert "use a shorter --ctx-init" in err and (tmp_path / "run" / "metrics.json").exists()
    ckpt = tmp_path / "run" / "stages" / "collaborate.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["record"] = {**state["record"], "lam": 9.0}  # a checkpoint made by another run
    torch.save(state, ckpt)
    assert "made with other settings" in cli_error(capsys, *craft_args(tmp_path, "--budget", "16", "--resume"))
    for other in ({"generation": 1}, [1, 2]):  # torch files, but no checkpoint of this code
        torch.save(other, ckpt)
        assert "is not a stage file or checkpoint of this code" in cli_error(capsys, *craft_args(
            tmp_path, "--budget", "16", "--resume"))


def test_table(tmp_path, capsys):
    craft.main(craft_args(tmp_path, "--budget", "16", out="craft-s0"))
    craft.main(craft_args(tmp_path, "--budget", "16", "--seed", "1", out="craft-s1"))
    capsys.readouterr()
    craft.main(["--table", str(tmp_path / "craft-s0"), str(tmp_path / "craft-s1")])
    out = capsys.readouterr().out
    assert "prompt queries" in out and "mean±sd over seeds" in out
    m = json.loads((Path(tmp_path) / "craft-s0" / "metrics.json").read_text())
    assert str(m["queries"]["prompts"]) in out



def test_torchrun_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun gives each process (rank 0 prints)
    err = one_line_error(craft.main, capsys, "--out", str(tmp_path / "run"))
    assert "runs in one process" in err and not (tmp_path / "run").exists()


# ---- the collaborative loop's wiring, pinned against independent computations

@pytest.mark.parametrize("prompt", ["mean", "best"])
def test_each_refiner_epoch_sees_the_prompt_the_search_just_named(tmp_path, monkeypatch, prompt):
    """Per generation, the refiner's epoch (and the prompt-fitness record after it) queries the
    black box with p0 + A z for the z --prompt names after that generation's tell (the CMA-ES
    mean, or the best point so far), and lambda_O follows the official schedule: lambda while
    the queries so far t = (g + 1) popsize <= budget / n, then 0."""
    named, seen, weights, generators = [], [], [], []
    tell, logits, refinement_loss = craft.CMAES.tell, craft.BlackBox.logits, craft.refinement_loss

    def recording_tell(es, f):
        tell(es, f)
        named.append((es.mean if prompt == "mean" else es.best_x).clone())

    def recording_logits(box, contexts, images, raw=False):
        if images == "view" and len(contexts) == 1:
            seen.append(contexts.clone())
        return logits(box, contexts, images, raw)

    def recording_loss(l, y, refiner, lam_o):
        weights.append(lam_o)
        return refinement_loss(l, y, refiner, lam_o)

    class RecordingGenerator(craft.PromptGenerator):
        def __init__(self, *a):
            super().__init__(*a)
            generators.append(self)
    monkeypatch.setattr(craft.CMAES, "tell", recording_tell)
    monkeypatch.setattr(craft.BlackBox, "logits", recording_logits)
    monkeypatch.setattr(craft, "refinement_loss", recording_loss)
    monkeypatch.setattr(craft, "PromptGenerator", RecordingGenerator)
    craft.main(craft_args(tmp_path, "--prompt", prompt, "--n", "4", "--lam", "0.3", "--batch", "64"))
    G = 48 // 8
    assert len(named) == G and len(seen) == 2 * G  # the refiner's query and the prompt-fitness record
    A, p0 = generators[0].A, generators[0].p0
    for g in range(G):
        expected = p0 + (named[g].float() @ A.T).view(1, *p0.shape)  # p = p0 + A z, written out
        assert torch.allclose(seen[2 * g], expected, atol=1e-6) and torch.allclose(seen[2 * g + 1], expected, atol=1e-6)
    assert not torch.allclose(seen[0], seen[-1], atol=1e-4)  # the search moved
    # 20 shots, batch 64: one refiner step per generation; on while t <= 48 // 4 = 12, i.e. generation 1 only
    assert weights == [0.3] + [0.0] * (G - 1)


def test_inference_is_the_final_prompt_then_the_refiner_recomputed_from_the_checkpoint(tmp_path):
    """The run's recorded predictions equal argmax of l + g(l), recomputed here from the final
    checkpoint's z and refiner through a fresh black box: l the dev images' logits under
    p0 + A z (A rebuilt from the run's seed)."""
    craft.main(craft_args(tmp_path))
    saved = torch.load(tmp_path / "run" / "stages" / "collaborate.ckpt", weights_only=False)  # z, refiner, ...
    task = data.load_task("digits")
    clip, _ = checkpoints.load(str(tmp_path / "tiny-vit.pt"), act="quick_gelu")
    box = craft.BlackBox(clip, task.classnames, torch.device("cpu"), {"device_type": "cpu", "enabled": False},
                         clip.logit_scale.exp().item())
    box.upload("dev", data.ImageDataset(task.dev, data.make_transform("test", clip.visual, task)))
    A_seed = train.seed_of(0, "A")
    generator = craft.PromptGenerator(box.word_embeddings("a photo of a"), 16, craft.DEFAULT_SETTINGS[2], A_seed)
    refiner = craft.Refiner(len(task.classnames))
    refiner.load_state_dict(saved["refiner"])
    with torch.no_grad():
        expected = refiner(box.logits(generator(saved["z"]), "dev")[0]).argmax(1)
    preds = torch.load(tmp_path / "run" / "predictions.pt")
    assert torch.equal(preds["craft"], expected)
    with torch.no_grad():  # and the refiner changes some prediction, so skipping it would show
        assert not torch.equal(box.logits(generator(saved["z"]), "dev")[0].argmax(1), expected)


def test_the_dev_trace_records_the_deployed_classifier_and_changes_no_number(tmp_path):
    """--trace-every G records the dev accuracy of the current prompt + refiner every G
    generations and after the last; the run's numbers are those of the same run untraced, and
    the last point (eval split dev) is the run's own accuracy."""
    plain = craft.main(craft_args(tmp_path, out="plain"))
    traced = craft.main(craft_args(tmp_path, "--trace-every", "4", out="traced"))
    trace = traced["history"].pop("dev_trace")
    assert [(g, t) for g, t, _ in trace] == [(4, 32), (6, 48)] and trace[-1][2] == traced["craft_acc"]
    assert traced["history"] == {k: v for k, v in plain["history"].items() if k != "dev_trace"}
    assert traced["craft_acc"] == plain["craft_acc"] and traced["queries"]["prompts"] == plain["queries"]["prompts"]


def make_imagenet(root, wnids=("n01", "n02", "n03"), shifted=(("imagenetv2", "imagenetv2-matched-frequency-format-val",
                                                              ("0", "1", "2")),
                                                             ("imagenet-adversarial", "imagenet-a", ("n02", "n03")))):
    """A fake DATA/imagenet in CoOp's layout, 2 images per class and split, and shifted test sets."""
    (Path(root) / "imagenet").mkdir(parents=True, exist_ok=True)
    with open(Path(root) / "imagenet" / "classnames.txt", "w") as f:
        f.write("".join(f"{w} {name}\n" for w, name in zip(wnids, ("cat", "dog", "tree"))))
    for split in ("train", "val"):
        for k, w in enumerate(wnids):
            for i in range(2):
                write_image(str(Path(root) / "imagenet" / "images" / split / w / f"{i}.JPEG"), color=(90 * k, 40 * i, 0))
    for folder, images, classes in shifted:
        for k, c in enumerate(classes):
            for i in range(3):
                write_image(str(Path(root) / folder / images / c / f"{i}.jpg"), color=(0, 90 * k, 30 * i))


def test_imagenet_shifts_are_scored_by_the_final_classifier_on_their_classes(tmp_path, capsys):
    """--eval-datasets with --dataset imagenet: each shifted set's predictions are argmax of
    l + g(l) over the classes it covers (ImageNet-A: 2 of the 3 here), recomputed from the final
    checkpoint through a fresh black box, with labels from its class folders (ImageNet-V2: the
    class index; the others: the wnid); and misuse is one line before any work."""
    root = tmp_path / "DATA"
    make_imagenet(root)
    argv = craft_args(tmp_path, "--dataset", "imagenet", "--data-root", str(root), "--shots", "1", "--budget", "16",
                      "--eval-split", "test", "--eval-datasets", "imagenet_v2", "imagenet_a")
    m = craft.main(argv)
    preds = torch.load(tmp_path / "run" / "predictions.pt")
    saved = torch.load(tmp_path / "run" / "stages" / "collaborate.ckpt", weights_only=False)
    clip, _ = checkpoints.load(str(tmp_path / "tiny-vit.pt"), act="quick_gelu")
    task = data.load_task("imagenet", str(root))
    box = craft.BlackBox(clip, task.classnames, torch.device("cpu"), {"device_type": "cpu", "enabled": False},
                         clip.logit_scale.exp().item())
    generator = craft.PromptGenerator(box.word_embeddings("a photo of a"), 16, (3 * 512) ** -0.5,
                                      train.seed_of(0, "A"))
    refiner = craft.Refiner(3, 512)
    refiner.load_state_dict(saved["refiner"])
    test = data.make_transform("test", clip.visual, task)
    for name, folder, classes in (("imagenet_v2", "imagenetv2/imagenetv2-matched-frequency-format-val", [0, 1, 2]),
                                  ("imagenet_a", "imagenet-adversarial/imagenet-a", [1, 2])):
        files = sorted((root / folder).rglob("*.jpg"))
        labels = torch.tensor([int(p.parent.name) if name == "imagenet_v2" else ["n01", "n02", "n03"].index(
            p.parent.name) for p in files])
        box.upload(name, data.ImageDataset([(str(p), 0) for p in files], test))
        with torch.no_grad():
            l = refiner(box.logits(generator(saved["z"]), name)[0])
        expected = torch.tensor(classes)[l[:, classes].argmax(1)]
        assert torch.equal(preds[name], expected)
        if name == "imagenet_a":  # the restriction matters here: over all classes some image goes to class 0
            assert (l.argmax(1) == 0).any()
        assert m["shift_acc"][name] == pytest.approx(100.0 * (expected == labels).float().mean().item())
    for extra, message in ((("--dataset", "digits"), "use it with --dataset imagenet, not digits"),
                           (("--method", "coop"), "--eval-datasets evaluates CraFT's classifier"),
                           (("--eval-datasets", "imagenet_r"), "imagenet-rendition/imagenet-r not found")):
        assert message in one_line_error(craft.main, capsys, *argv, *extra, "--out", str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


# ---- your own images: the shots from a labels file

def without(argv, *flags):
    """argv without these flags and their values."""
    drop = {i + d for i, a in enumerate(argv) if a in flags for d in (0, 1)}
    return [a for i, a in enumerate(argv) if i not in drop]


def test_shots_from_a_labels_file_equal_the_same_shots_drawn_from_class_folders(tmp_path, pretrained_tiny, capsys):
    """CraFT on your own images with --labels naming the images --shots 2 draws from the labelled
    layout (class by class, in its order) runs exactly as CraFT on that layout: the same search, refiner
    and predictions. Uneven counts are taken as they are (the mean per class is the run's shots)."""
    root, _, _ = write_digit_layouts(tmp_path / "data", n_train=300, n_test=100)
    argv = without(craft_args(tmp_path, ckpt=pretrained_tiny[0]), "--shots", "--eval-split")
    common = argv + ["--aug", "crop"]  # the shots re-read and augmented every refiner epoch
    drawn = craft.main(common + ["--dataset", "imagefolder", "--data-root", str(root / "labelled"), "--shots", "2",
                                 "--out", str(tmp_path / "drawn")])
    task = data.load_task("imagefolder", root / "labelled")
    picked = data.few_shot(task, 2, craft.seed_of(0, "shots"))
    rows = [(f"{i:04d}.png", task.classnames[task.train[i][1]]) for i in picked.tolist()]
    own = ["--images", str(root / "flat"), "--classes", str(root / "classes.txt"), "--check", str(root / "check")]
    # interleaved classes: read back class by class, each in the file's order, the order drawn
    labels = write_labels(tmp_path / "labels.csv", rows[0::2] + rows[1::2])
    given = craft.main(common + own + ["--labels", str(labels), "--out", str(tmp_path / "given")])
    pa, pb = torch.load(tmp_path / "drawn" / "predictions.pt"), torch.load(tmp_path / "given" / "predictions.pt")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    a, b = numbers(drawn), numbers(given)
    assert a.pop("dataset") == "imagefolder" and b.pop("dataset") == "images" and a.pop("shots") == 2 == b.pop("shots")
    assert {k: v for k, v in a.items() if k != "time_s"} == {k: v for k, v in b.items() if k != "time_s"}
    # uneven counts: 17 images, 1 or 2 per class, and one class without any (said so)
    capsys.readouterr()
    rows = [r for r in rows if r[1] != "zero"]
    uneven = write_labels(tmp_path / "uneven.csv", rows[:1] + rows[2:])
    m = craft.main(common + own + ["--labels", str(uneven), "--budget", "16", "--out", str(tmp_path / "uneven")])
    out = capsys.readouterr().out
    assert m["shots"] == pytest.approx(17 / 10) and "1 class has no labelled image (zero)" in out
    assert "17 labelled images" in out and "(0-2 per class)" in out


def test_own_images_without_labels_or_a_check_set(tmp_path, capsys, pretrained_tiny):
    """CraFT needs labelled shots: your images without --labels are one line; without --check it trains
    and reports no accuracy (null), and --method probe, which keeps nothing, is refused."""
    root, _, _ = write_digit_layouts(tmp_path / "data", n_train=60, n_test=0)
    own = ["--images", str(root / "flat"), "--classes", str(root / "classes.txt")]
    argv = without(craft_args(tmp_path, ckpt=pretrained_tiny[0]), "--shots", "--eval-split")
    assert "carry no labels" in one_line_error(craft.main, capsys, *argv, *own)
    labels = write_labels(tmp_path / "l.csv", [(f"{i:04d}.png", "zero") for i in range(3)] + [("0059.png", "one")])
    assert "--method probe keeps no weights" in one_line_error(craft.main, capsys, *argv, *own, "--labels",
                                                               str(labels), "--method", "probe")
    assert "give one of the two" in one_line_error(craft.main, capsys, *argv, *own, "--labels", str(labels),
                                                   "--shots", "2")
    m = craft.main(argv + own + ["--labels", str(labels), "--out", str(tmp_path / "bare")])
    assert m["craft_acc"] is None and m["zero_shot_acc"] is None and m["history"]["best_fitness"]


def test_the_zero_shot_reference_reads_a_prompts_file_given_as_classes(tmp_path, capsys):
    """With a {class: [prompts]} --classes file, CraFT's zero-shot reference is that file's classifier
    (as CoFT's and VeCAF's are): one prompt per class spelt as a template would spell it gives the
    template's predictions and accuracy, other prompts other predictions; a class's several prompts
    are averaged and cost as many prompt queries as the most a class has."""
    root, pool, classes = write_digit_layouts(tmp_path / "data", n_train=30, n_test=40)
    labels = write_labels(tmp_path / "l.csv", [(f"{i:04d}.png", c) for i, c in enumerate(pool)][:4])
    argv = without(craft_args(tmp_path), "--shots", "--eval-split") + [
        "--images", str(root / "flat"), "--check", str(root / "check"), "--labels", str(labels), "--method", "probe"]
    (tmp_path / "same.json").write_text(json.dumps({c: [f"a photo of the number {c}."] for c in classes}))
    (tmp_path / "other.json").write_text(json.dumps({c: [f"{c}", f"a blurry {c}."] for c in classes}))
    m = {}
    template = ["--classes", str(root / "classes.txt"), "--template", "a photo of the number {}."]
    for name, flags in (("template", template),
                        ("same", ["--classes", str(tmp_path / "same.json")]),
                        ("other", ["--classes", str(tmp_path / "other.json")])):
        capsys.readouterr()
        m[name] = craft.main(argv + flags + ["--out", str(tmp_path / name)])
        m[name]["zero_shot"] = torch.load(tmp_path / name / "predictions.pt")["zero_shot"]
        m[name]["out"] = capsys.readouterr().out
    assert torch.equal(m["same"]["zero_shot"], m["template"]["zero_shot"])
    assert m["same"]["zero_shot_acc"] == m["template"]["zero_shot_acc"]
    assert not torch.equal(m["other"]["zero_shot"], m["template"]["zero_shot"])
    assert m["other"]["queries"]["prompts"] == m["template"]["queries"]["prompts"] + 1
    assert "zero-shot ('a photo of the number {}.')" in m["template"]["out"]
    assert "zero-shot (the prompts of --classes)" in m["same"]["out"]
