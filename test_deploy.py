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
import imagefiles
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
                to_pil_image(imagefiles.load_image(image) if not torch.is_tensor(image) else image).save(
                    root / split / name / f"{count.get(name, 0)}.png")
                count[name] = count.get(name, 0) + 1
    return root


def commands(digit_folder):
    """The command (its CLI's main, its arguments but --out) of one run per CLI (and CoFT+, and
    variants), on the stand-in and the digit folder."""
    common = ["--dataset", "imagefolder", "--data-root", str(digit_folder), "--clip", "demo", "--log-every", "0"]
    return {
        "coft": (coft.main, common + ["--K", "4", "--p1-epochs", "2", "--fft-epochs", "2", "--batch", "32",
                                      "--fft-lr", "2e-2"]),
        "coftplus": (coft.main, common + ["--plus", "--rounds", "2", "--K", "4", "--p1-epochs", "1", "--fft-epochs",
                                          "1", "--batch", "32", "--queue", "16"]),
        "coft-vpt": (coft.main, common + ["--K", "4", "--p1-epochs", "1", "--fft-epochs", "1", "--batch", "32",
                                          "--vpt-tokens", "2", "--fft-init", "phase1", "--branches", "1"]),
        "topk": (coft.main, common + ["--method", "topk", "--K", "4", "--fft-epochs", "1", "--batch", "32"]),
        "selftrain": (coft.main, common + ["--method", "selftrain", "--rounds", "2", "--fft-epochs", "1", "--batch",
                                           "32"]),
        "craft": (craft.main, common + ["--shots", "2", "--budget", "80"]),
        "coop": (craft.main, common + ["--method", "coop", "--shots", "2"]),
        "vecaf": (vecaf.main, common + ["--budget", "10", "--loops", "2", "--epochs", "2", "--batch", "8", "--iters",
                                        "20"]),
    }


@pytest.fixture(scope="module")
def finished(digit_folder, tmp_path_factory):
    """One finished run per command (commands), in a folder of its name."""
    out = tmp_path_factory.mktemp("runs")
    for name, (main, argv) in commands(digit_folder).items():
        main(argv + ["--out", str(out / name)])
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
        p = model(transform(imagefiles.load_image(path))[None]).softmax(-1)[0]
    top = [(classnames[k], f"{v:.4f}") for v, k in zip(*p.topk(3))]
    r = rows[path]
    assert top == [(r["class"], r["probability"]), (r["class_2"], r["probability_2"]),
                   (r["class_3"], r["probability_3"])]
    assert f"{len(rows)} images classified" in capsys.readouterr().err


def test_coft_is_the_mean_of_its_branches_probabilities(finished, digit_folder):
    """CoFT's loaded classifier: softmax of its output = the mean of the two branches' softmax
    outputs (Sec. 3.2.2), each branch computed by hand from its stage file."""
    model, classnames, transform = deploy.load(finished / "coft")
    x = torch.stack([transform(imagefiles.load_image(p)) for p, _ in data.load_task("imagefolder", str(digit_folder)).test])
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
    assert sum("broken.png" in e for e in err) == 1 and err[-1] == "5 images classified; 1 could not be read " \
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
    x = torch.stack([transform(imagefiles.load_image(p)) for p, _ in data.load_task("imagefolder", str(digit_folder)).test])
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


def test_an_export_folder_takes_only_its_own_runs_export_and_csv_only_overwrites_predictions(
        finished, digit_folder, tmp_path, capsys, monkeypatch):
    """--export FOLDER writes export.json (the run's folder and config digest) beside the files; the
    same run exports there again; another run's export, an export's file without a manifest or a
    damaged manifest is refused in one line before the run is rebuilt, the files left as they were.
    --csv overwrites an earlier predictions CSV, and refuses any other file (a labels file)."""
    folder = tmp_path / "export"
    deploy.main([str(finished / "vecaf"), "--export", str(folder)])
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["run"] == str((finished / "vecaf").resolve()) and manifest["files"] == ["model.pt",
                                                                                          "model_head.pt"]
    assert len(manifest["config"]) == 16 and "export.json" in capsys.readouterr().out
    deploy.main([str(finished / "vecaf"), "--export", str(folder)])  # its own export: written again
    written = {f.name: f.read_bytes() for f in folder.iterdir()}
    monkeypatch.setattr(deploy, "rebuild", lambda *a, **k: pytest.fail("the run was rebuilt before the check"))
    err = one_line_error(deploy.main, capsys, str(finished / "coft"), "--export", str(folder))
    assert f"--export {folder} holds the export of another run ({(finished / 'vecaf').resolve()})" in err
    (folder / "export.json").write_text(json.dumps({**manifest, "config": "0" * 16}))  # the folder's run redone
    err = one_line_error(deploy.main, capsys, str(finished / "vecaf"), "--export", str(folder))
    assert "holds the export of another run (an earlier run in" in err and "of other settings" in err
    (folder / "export.json").write_text("{")
    assert "its export.json is damaged" in one_line_error(deploy.main, capsys, str(finished / "vecaf"), "--export",
                                                         str(folder))
    (folder / "export.json").unlink()
    err = one_line_error(deploy.main, capsys, str(finished / "vecaf"), "--export", str(folder))
    assert "already holds model.pt, and no export.json says which run it is from" in err
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == {k: v for k, v in written.items()
                                                                 if k != "export.json"}
    labels = tmp_path / "labels.csv"
    labels.write_text("path,class\n0.png,three\n")
    images = str(digit_folder / "test" / "three")
    err = one_line_error(deploy.main, capsys, str(finished / "vecaf"), images, "--csv", str(labels))
    assert f"--csv {labels} exists and is not a CSV of this command's predictions" in err
    assert labels.read_text() == "path,class\n0.png,three\n"
    monkeypatch.undo()
    deploy.main([str(finished / "vecaf"), images, "--csv", str(tmp_path / "p.csv")])
    deploy.main([str(finished / "vecaf"), str(digit_folder / "test" / "five"), "--csv", str(tmp_path / "p.csv")])
    assert "/five/" in (tmp_path / "p.csv").read_text() and "/three/" not in (tmp_path / "p.csv").read_text()


# ---- a file a run reads is data: a pickle that would run code is refused

class RunsCode:
    """Unpickling this calls builtins.open(marker, "w"): a file appears if a reader runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins
        return builtins.open, (self.marker, "w")


def crafted(path, marker):
    """A pickle in place of the file at `path`: torch.save'd like the real one (a dict with a record)."""
    torch.save({"record": {"stage": "x"}, "model": RunsCode(marker), "generation": 1}, path)


def test_a_file_a_run_reads_that_would_run_code_is_refused_in_one_line(finished, digit_folder, tmp_path, capsys):
    """In place of each kind of torch file a run reads (a stage file, an epoch checkpoint, CraFT's
    search checkpoint, VeCAF's features and selections, a --clip checkpoint or TorchScript
    archive), a pickle whose unpickling would create a marker file: every command that reads it
    (--resume, --eval-only, --phase 2, deploy.py RUN IMAGES, deploy.py RUN --export, deploy.load)
    refuses it in one line naming the file and what it would call, and the marker never appears.
    --table reads metrics.json, JSON: a pickle there is one line too."""
    marker = tmp_path / "MARKER"
    runs_of = commands(digit_folder)

    def copy(name):
        dst = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(finished / name, dst)
        return dst

    def refused(main, *argv, expect="holds more than tensors and numbers (its pickle calls"):
        err = one_line_error(main, capsys, *argv)
        assert expect in err and not marker.exists(), err

    cases = [  # (run, file put in place, what reads it)
        ("coft", "stages/branch1.pt", ["--eval-only"]),
        ("coft", "stages/phase1_round1_model2.pt", ["--phase", "2"]),
        ("coft", "stages/branch2.ckpt", ["--resume"]),  # the epoch checkpoint of a stage not finished
        ("coftplus", "stages/branch1.ckpt", ["--resume"]),
        ("craft", "stages/collaborate.ckpt", ["--resume"]),
        ("coop", "stages/coop.ckpt", ["--resume"]),
        ("vecaf", "stages/features.pt", ["--resume"]),
        ("vecaf", "stages/select2.pt", ["--resume"]),
    ]
    for name, rel, extra in cases:
        run = copy(name)
        if rel.endswith(".ckpt"):  # an unfinished stage: its stage file gone, its checkpoint there
            (run / rel).with_suffix(".pt").unlink(missing_ok=True)
            (run / "metrics.json").unlink()
        if name == "vecaf" and rel == "stages/select2.pt":
            (run / "stages" / "loop2.pt").unlink()
        crafted(run / rel, marker)
        main, argv = runs_of[name]
        refused(main, *argv, "--out", str(run), *extra)
    # deploy.py and deploy.load read the stage files and checkpoints of a finished run
    for name, rel in (("coft", "stages/branch2.pt"), ("craft", "stages/collaborate.ckpt"),
                      ("coop", "stages/coop.ckpt"), ("vecaf", "stages/loop2.pt")):
        run = copy(name)
        crafted(run / rel, marker)
        refused(deploy.main, str(run), str(digit_folder / "test"))
        refused(deploy.main, str(run), "--export", str(tmp_path / "export"))
        with pytest.raises(deploy.RunError, match="its pickle calls"):
            deploy.load(run)
        assert not marker.exists()
    # --table: metrics.json is read as JSON
    run = copy("coft")
    shutil.copy(run / "stages" / "branch1.pt", run / "metrics.json")
    refused(coft.main, "--table", str(run), expect="metrics.json is damaged")
    # --clip: a checkpoint file, and a TorchScript archive whose data.pkl would run code
    crafted(tmp_path / "clip.pt", marker)
    refused(coft.main, "--clip", str(tmp_path / "clip.pt"), "--clip-act", "quick_gelu", "--out", str(tmp_path / "c"))
    import pickle
    import zipfile
    with zipfile.ZipFile(tmp_path / "scripted.pt", "w") as z:
        z.writestr("m/data.pkl", pickle.dumps(RunsCode(marker), protocol=2))
        z.writestr("m/code/__torch__/m.py", "")
    refused(coft.main, "--clip", str(tmp_path / "scripted.pt"), "--clip-act", "quick_gelu", "--out",
            str(tmp_path / "s"), expect="TorchScript archive holding more than tensors and modules")


def test_what_deploy_cannot_do_is_one_line_before_the_work_and_leaves_nothing_behind(finished, digit_folder, tmp_path,
                                                                                    capsys, monkeypatch):
    """--csv onto a folder and --export onto a file are refused before the run is rebuilt (no .part file
    left); images none of which can be read exit 2, not "0 images classified", and files of other
    extensions are said to be left out; a missing or damaged stage file is named as such, with what
    to do (the run's own command with --resume); a device this machine lacks is one line."""
    images = str(digit_folder / "test")
    monkeypatch.setattr(deploy, "rebuild", lambda *a, **k: pytest.fail("the run was rebuilt before the cheap checks"))
    (tmp_path / "out").mkdir()
    err = one_line_error(deploy.main, capsys, str(finished / "coft"), images, "--csv", str(tmp_path / "out"))
    assert "--csv" in err and "is a folder" in err
    (tmp_path / "file").write_text("")
    err = one_line_error(deploy.main, capsys, str(finished / "coft"), "--export", str(tmp_path / "file"))
    assert "--export" in err and "is a file" in err
    for device in ("mps", "xpu"):
        assert f"sees no {device} device" in one_line_error(deploy.main, capsys, str(finished / "coft"), images,
                                                            "--device", device)
    monkeypatch.undo()
    folder = tmp_path / "unreadable"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("text")
    with pytest.raises(SystemExit) as e:
        deploy.main([str(finished / "coft"), str(folder), "--csv", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: the image file could not be read (named above)" in err
    assert "not images by their extension, so left out: 1 file (.txt) in the folders given" in err
    assert not (tmp_path / "p.csv").exists() and not list(tmp_path.rglob("*.part"))
    run = tmp_path / "run"
    shutil.copytree(finished / "coft", run)
    (run / "stages" / "branch2.pt").unlink()
    err = one_line_error(deploy.main, capsys, str(run), images)
    assert "branch2.pt is missing: the run's own command with --resume redoes that stage" in err
    (run / "stages" / "branch2.pt").write_bytes(b"truncated")
    err = one_line_error(deploy.main, capsys, str(run), images)
    assert "the file is damaged" in err and "--resume" in err and "--restart" not in err
