"""Tests of deploy.py: a finished run's classifier loaded in one call and run on image files gives
the predictions and accuracy the run recorded, for every CLI; the one-line refusals."""
import csv
import json
import shutil

import pytest
import torch
from torchvision.transforms.v2.functional import to_pil_image

import clip_model
import coft
import craft
import data
import deploy
import standin
import vecaf
from conftest import one_line_error


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """The real digits as PNG files in an image folder (8 train and 4 test images per class), so
    the stand-in has something to recognise and a run's test images exist as files."""
    root = tmp_path_factory.mktemp("digits")
    task = data.digits_task()
    for split, items, n in (("train", task.train, 8), ("test", task.test, 4)):
        count = {}
        for image, label in items:
            name = data.DIGIT_NAMES[label]
            if count.get(name, 0) < n:
                (root / split / name).mkdir(parents=True, exist_ok=True)
                to_pil_image(data.load_image(image) if not torch.is_tensor(image) else image).save(
                    root / split / name / f"{count.get(name, 0)}.png")
                count[name] = count.get(name, 0) + 1
    return root


@pytest.fixture(scope="module")
def finished(digit_folder, tmp_path_factory):
    """One finished run per CLI (and CoFT+), on the stand-in and the digit folder."""
    out = tmp_path_factory.mktemp("runs")
    common = ["--dataset", "imagefolder", "--data-root", str(digit_folder), "--clip", "demo", "--log-every", "0"]
    coft.main(common + ["--K", "4", "--p1-epochs", "2", "--fft-epochs", "2", "--batch", "32", "--fft-lr", "2e-2",
                        "--out", str(out / "coft")])
    coft.main(common + ["--plus", "--rounds", "2", "--K", "4", "--p1-epochs", "1", "--fft-epochs", "1", "--batch",
                        "32", "--queue", "16", "--out", str(out / "coftplus")])
    coft.main(common + ["--K", "4", "--p1-epochs", "1", "--fft-epochs", "1", "--batch", "32", "--vpt-tokens", "2",
                        "--fft-init", "phase1", "--branches", "1", "--out", str(out / "coft-vpt")])
    coft.main(common + ["--method", "topk", "--K", "4", "--fft-epochs", "1", "--batch", "32", "--out",
                        str(out / "topk")])
    coft.main(common + ["--method", "selftrain", "--rounds", "2", "--fft-epochs", "1", "--batch", "32", "--out",
                        str(out / "selftrain")])
    craft.main(common + ["--shots", "2", "--budget", "80", "--out", str(out / "craft")])
    craft.main(common + ["--method", "coop", "--shots", "2", "--out", str(out / "coop")])
    vecaf.main(common + ["--budget", "10", "--loops", "2", "--epochs", "2", "--batch", "8", "--iters", "20",
                         "--out", str(out / "vecaf")])
    return out


@pytest.mark.parametrize("run, key", [("coft", "ensemble"), ("coftplus", "ensemble"), ("coft-vpt", "ensemble"),
                                      ("topk", "topk"), ("selftrain", "selftrain"), ("craft", "craft"),
                                      ("coop", "coop"), ("vecaf", "final")])
def test_predicting_a_runs_own_test_images_gives_what_the_run_recorded(finished, digit_folder, run, key, tmp_path,
                                                                        capsys):
    """deploy.py RUN test/ --topk 3: each image's top class is the run's recorded prediction for
    it, so the accuracy read off the CSV is the run's; the top-3 probabilities are the softmax of
    deploy.load's logits, sorted; the images of the task appear once each."""
    deploy.main([str(finished / run), str(digit_folder / "test"), "--topk", "3", "--csv", str(tmp_path / "p.csv")])
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    task = data.load_task("imagefolder", str(digit_folder))
    recorded = torch.load(finished / run / "predictions.pt", weights_only=False)[key]
    assert sorted(rows) == sorted(str(p) for p, _ in task.test)
    predicted = [task.classnames.index(rows[str(p)]["class"]) for p, _ in task.test]
    assert predicted == recorded.tolist()
    metrics = json.loads((finished / run / "metrics.json").read_text())
    acc = 100.0 * sum(p == y for p, (_, y) in zip(predicted, task.test)) / len(task.test)
    assert acc == pytest.approx(metrics[f"{key}_acc" if key not in ("final",) else "final_acc"])
    assert len(set(predicted)) > 1  # the stand-in tells digits apart: a real check of the classifier
    model, classnames, transform = deploy.load(finished / run)
    path = str(task.test[0][0])
    with torch.no_grad():
        p = model(transform(data.load_image(path))[None]).softmax(-1)[0]
    top = [(classnames[k], f"{v:.4f}") for v, k in zip(*p.topk(3))]
    r = rows[path]
    assert top == [(r["class"], r["probability"]), (r["class_2"], r["probability_2"]),
                   (r["class_3"], r["probability_3"])]
    assert "image(s) classified" in capsys.readouterr().err


def test_coft_is_the_mean_of_its_branches_probabilities(finished, digit_folder):
    """CoFT's loaded classifier: softmax of its output = the mean of the two branches' softmax
    outputs (Sec. 3.2.2), each branch computed by hand from its stage file."""
    model, classnames, transform = deploy.load(finished / "coft")
    x = torch.stack([transform(data.load_image(p)) for p, _ in data.load_task("imagefolder", str(digit_folder)).test])
    clip, _ = standin.load("--clip", "demo", None, "cpu")
    probs = []
    for tag in ("branch1", "branch2"):
        state = torch.load(finished / "coft" / "stages" / f"{tag}.pt", weights_only=True)["model"]
        branch = clip_model.ImageClassifier(clip.visual, len(classnames))
        branch.load_state_dict(state)
        with torch.no_grad():
            probs.append(branch.eval()(x).softmax(-1))
    with torch.no_grad():
        assert torch.allclose(model(x).softmax(-1), (probs[0] + probs[1]) / 2, atol=1e-6)


def test_unreadable_images_are_named_and_the_others_classified(finished, digit_folder, tmp_path, capsys):
    folder = tmp_path / "new"
    shutil.copytree(digit_folder / "test" / "three", folder)
    (folder / "broken.png").write_text("not a png")
    (folder / "notes.txt").write_text("not an image, not looked at")
    deploy.main([str(finished / "vecaf"), str(folder), str(digit_folder / "test" / "five" / "0.png")])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "path,class,probability" and len(lines) == 1 + 4 + 1
    assert "broken.png" not in captured.out and all(len(line.split(",")) == 3 for line in lines)
    err = captured.err.splitlines()
    assert sum("broken.png" in e for e in err) == 1 and err[-1] == "5 image(s) classified; 1 could not be read " \
                                                                  "(named above)"


def test_a_run_it_cannot_use_is_one_line(finished, digit_folder, tmp_path, capsys):
    images = str(digit_folder / "test")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text(json.dumps({"config": {}, "how": {}}))
    assert "holds no finished run" in one_line_error(deploy.main, capsys, str(tmp_path / "unfinished"), images)
    assert "not a run folder" in one_line_error(deploy.main, capsys, str(tmp_path), images)
    (tmp_path / "unfinished" / "metrics.json").write_text("[1]")
    assert "is damaged or not from a finished run" in one_line_error(deploy.main, capsys, str(tmp_path / "unfinished"),
                                                                     images)
    (tmp_path / "empty").mkdir()
    assert "holds no images" in one_line_error(deploy.main, capsys, str(finished / "coft"), str(tmp_path / "empty"))
    assert "no such file" in one_line_error(deploy.main, capsys, str(finished / "coft"), str(tmp_path / "nope"))
    err = one_line_error(deploy.main, capsys, str(finished / "coft"), images, "--csv", str(tmp_path / "nope" / "p.csv"))
    assert "its folder does not exist" in err
    other = tmp_path / "other.pt"
    torch.save(clip_model.tiny_clip("tiny-vit").state_dict(), other)
    err = one_line_error(deploy.main, capsys, str(finished / "coft"), images, "--clip", str(other), "--clip-act",
                         "quick_gelu")
    assert "is not the backbone" in err and "demo (sha256:" in err
    coft.main(["--dataset", "imagefolder", "--data-root", str(digit_folder), "--clip", "demo", "--log-every", "0",
               "--method", "probe", "--out", str(tmp_path / "probe")])
    assert "keeps no weights" in one_line_error(deploy.main, capsys, str(tmp_path / "probe"), images)


def test_the_export_gives_the_runs_image_features_in_open_clip_and_here(finished, digit_folder, tmp_path, capsys):
    """deploy.py RUN --export: one OpenAI-layout checkpoint per CoFT branch and a head file each.
    open-clip-torch (an independent CLIP) builds each checkpoint and its normalised image
    features equal the branch's to float tolerance, and its head on them gives the branch's
    logits; `--clip FILE` here loads it with the text tower unchanged. VeCAF: one checkpoint;
    CraFT: its classifier, and one line saying no CLIP weight was tuned."""
    open_clip = pytest.importorskip("open_clip")
    import checkpoints
    deploy.main([str(finished / "coft"), "--export", str(tmp_path / "coft")])
    assert "ensemble of its 2 branches" in capsys.readouterr().out
    model, classnames, transform = deploy.load(finished / "coft")
    x = torch.stack([transform(data.load_image(p)) for p, _ in data.load_task("imagefolder", str(digit_folder)).test])
    demo, _ = standin.load("--clip", "demo", None, "cpu")
    for a, branch in enumerate(model.branches, 1):
        state = torch.load(tmp_path / "coft" / f"branch{a}.pt", weights_only=True)
        ref = open_clip.model.build_model_from_openai_state_dict({k: v.clone() for k, v in state.items()},
                                                                 cast_dtype=torch.float32).float().eval()
        ref.load_state_dict(state)
        head = torch.load(tmp_path / "coft" / f"branch{a}_head.pt", weights_only=True)
        with torch.no_grad():
            theirs = torch.nn.functional.normalize(ref.encode_image(x), dim=-1)
            ours = branch.features(x)
            with capsys.disabled():
                print(f"branch{a}: max |feature difference| vs open_clip {(theirs - ours).abs().max().item():.2e}")
            assert (theirs - ours).abs().max() < 1e-5 and (theirs - demo.encode_image(x)).abs().max() > 1e-3
            assert torch.allclose(theirs @ head["weight"].T + head["bias"], branch(x), atol=1e-4)
        assert head["classnames"] == classnames
    here, _ = checkpoints.load(str(tmp_path / "coft" / "branch1.pt"), act="quick_gelu")
    with torch.no_grad():
        assert torch.allclose(clip_model.unit(here.encode_image(x)), model.branches[0].features(x), atol=1e-5)
    text = {k: v for k, v in here.state_dict().items() if not k.startswith("visual.")}
    assert all(torch.equal(v, demo.state_dict()[k]) for k, v in text.items())  # the text tower as it was
    assert [p.name for p in deploy.export(finished / "vecaf", tmp_path / "vecaf")] == ["model.pt", "model_head.pt"]
    capsys.readouterr()
    assert [p.name for p in deploy.export(finished / "craft", tmp_path / "craft")] == ["craft_classifier.pt"]
    assert "tunes no CLIP weight" in capsys.readouterr().out
    names = [p.name for p in deploy.export(finished / "coft-vpt", tmp_path / "vpt")]
    assert names == ["model.pt", "model_head.pt", "model_vpt.pt"] and "no place for" in capsys.readouterr().out
    assert torch.load(tmp_path / "vpt" / "model_vpt.pt", weights_only=True)["vpt"].shape[-2] == 2
