"""Run folders, the CLIs and the training loop's promises, through coft.py (runs.py, train.py): one-line
errors checked before any work, a folder continued only under its own config and records, exact
resume, per-epoch randomness, results that do not depend on the worker count, the results table."""
import csv
import json
import os
import re
import signal
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

import coft
import runs
import train
from conftest import (coft_args, coft_error, craft_args, fit_arguments, make_dtd, make_imagefolder, numbers,
                      one_line_error, randomized, run_coft, run_sh, run_vecaf, stage_of, stage_state, tiny_hf,
                      vecaf_args, write_digit_layouts, write_image, write_labels)


def test_resume_after_interruption_gives_the_same_result(tmp_path, monkeypatch, pretrained_tiny):
    ckpt = pretrained_tiny[0]
    full = run_coft(tmp_path, out="full", ckpt=ckpt)
    real_save, calls = runs.atomic_save, []

    def dying_save(obj, path):
        calls.append(Path(path).name)
        real_save(obj, path)
        if Path(path).name == "branch1.ckpt":  # killed (Ctrl-C) right after branch 1's first epoch checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "atomic_save", dying_save)
    with pytest.raises(SystemExit) as e:
        run_coft(tmp_path, out="killed", ckpt=ckpt)
    monkeypatch.setattr(runs, "atomic_save", real_save)
    assert e.value.code == 130 and not (tmp_path / "killed" / "stages" / "branch1.pt").exists()
    resumed = run_coft(tmp_path, "--resume", out="killed", ckpt=ckpt)
    assert numbers(resumed) == numbers(full)


TRAIN_FIT = train.fit


def record_draws(monkeypatch):
    """Patches train.fit to record, per stage, what every step drew: its batch's image indices
    in order, the augmented images, and the state of the step's generator (complement labels)
    and of torch's global generator as the step starts."""
    seen = {}

    def recording_fit(*a, **kw):
        fit_args = fit_arguments(*a, **kw)
        steps, step_fn = seen.setdefault(stage_of(fit_args), []), fit_args["loss"]

        def step(model, b, draws):
            steps.append({"idx": b[2].clone(), "x": b[0].clone(), "gen": draws.generator.get_state(),
                          "rng": torch.get_rng_state()})
            return step_fn(model, b, draws)
        fit_args["loss"] = step
        return TRAIN_FIT(**fit_args)  # a later call replaces an earlier recording
    monkeypatch.setattr(train, "fit", recording_fit)
    return seen


def same_draws(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("idx", "x", "gen", "rng"))


def test_every_epoch_draws_anew_and_a_resumed_epoch_draws_as_uninterrupted(tmp_path, monkeypatch, pretrained_tiny):
    """Per-epoch randomness of the training loop, in Phase I and Phase II: epoch 1 of a stage
    draws another batch order, other augmentations of the same images and other step and global
    random streams than epoch 0; a run killed after epoch 0 and resumed draws in epoch 1 exactly
    what the uninterrupted run drew there (and not what it drew in epoch 0)."""
    ckpt, stages = pretrained_tiny[0], ("phase1_round1_model1", "branch1")
    argv = ("--branches", "1", "--fft-aug", "strong")
    full = record_draws(monkeypatch)
    run_coft(tmp_path, *argv, out="full", ckpt=ckpt)
    for tag in stages:
        steps = full[tag]
        n = len(steps) // 2  # steps per epoch (2 epochs)
        first, second = steps[:n], steps[n:]
        assert n >= 1 and len(steps) == 2 * n, tag
        order = [torch.cat([s["idx"] for s in e]) for e in (first, second)]
        assert not torch.equal(order[0], order[1]), tag  # another order
        x = [{int(i): s["x"][j] for s in e for j, i in enumerate(s["idx"])} for e in (first, second)]
        common = x[0].keys() & x[1].keys()
        # other augmentations (Phase I's weak crop has 36 offsets, so a few images draw the same one)
        assert sum(not torch.equal(x[0][i], x[1][i]) for i in common) > 0.8 * len(common), tag
        assert not torch.equal(first[0]["gen"], second[0]["gen"]), tag
        assert not torch.equal(first[0]["rng"], second[0]["rng"]), tag
    real_save = runs.atomic_save

    def dying_save(obj, path):
        real_save(obj, path)
        if Path(path).name == "branch1.ckpt":  # Ctrl-C right after branch 1's first epoch checkpoint
            raise KeyboardInterrupt
    monkeypatch.setattr(runs, "atomic_save", dying_save)
    killed = record_draws(monkeypatch)
    with pytest.raises(SystemExit):
        run_coft(tmp_path, *argv, out="killed", ckpt=ckpt)
    monkeypatch.setattr(runs, "atomic_save", real_save)
    resumed = record_draws(monkeypatch)
    run_coft(tmp_path, *argv, "--resume", out="killed", ckpt=ckpt)
    n = len(full["branch1"]) // 2
    assert len(killed["branch1"]) == n and all(map(same_draws, killed["branch1"], full["branch1"][:n]))
    assert list(resumed) == ["branch1"] and len(resumed["branch1"]) == n  # Phase I was not trained again
    assert all(map(same_draws, resumed["branch1"], full["branch1"][n:]))


@pytest.mark.parametrize("head", ["text", "random"])
def test_phase_flag_runs_phases_separately(tmp_path, pretrained_tiny, head):
    """--phase 1 then --phase 2 gives the whole run's numbers, also with a random Phase-II head:
    each branch is drawn from (seed, branch), whatever ran in the process before it."""
    ckpt = pretrained_tiny[0]
    full = run_coft(tmp_path, "--head-init", head, out="full", ckpt=ckpt)
    p1 = run_coft(tmp_path, "--head-init", head, "--phase", "1", out="split", ckpt=ckpt)
    assert "branch1_acc" not in p1 and p1["phase1_model1_acc"] == full["phase1_model1_acc"]
    p2 = run_coft(tmp_path, "--head-init", head, "--phase", "2", out="split", ckpt=ckpt)
    assert numbers(p2) == numbers(full)


def test_every_stage_reaches_its_loss_through_run_stage_and_train_fit_alone(tmp_path, monkeypatch):
    """The reader's path (docs/files.md): from the stage function that defines a loss (CoFT's: that
    takes it from the step it shares with coft.adapt) to that loss being called, the only frames are
    Run.stage and train.fit (CoFT's Phase I, Phase II with Eq. 7 and with Eq. 10, VeCAF's
    fine-tuning) or train.fit alone (CraFT's refiner epoch, CoOp): nothing else wraps a plain run's
    step. Seen from inside every loss of tiny runs of each stage."""
    import craft
    chains, losses, real_fit = {}, set(), train.fit
    stage_of = {"phase1_loss": "phase1", "branch_training": "fine_tune"}  # CoFT's CLI stage of each shared step

    def watching_fit(model, loss, *a, **k):
        definer = loss.__qualname__.split(".<locals>.")[0]  # the function that defined the loss
        stage = stage_of.get(definer, definer)

        def watched(*la, **lk):
            frame, chain = sys._getframe(1), []
            while frame is not None and frame.f_code.co_qualname != stage:  # outward from fit to the stage
                if frame.f_code.co_filename != __file__:  # this test's own wrappers are not on the path
                    chain.append(frame.f_code.co_qualname)
                frame = frame.f_back
            chains.setdefault(f"{loss.__module__}.{loss.__qualname__}", set()).add(
                tuple(reversed(chain)) if frame is not None else "not called from its stage")
            losses.add(loss.__code__)
            return loss(*la, **lk)
        return real_fit(model, watched, *a, **k)
    monkeypatch.setattr(train, "fit", watching_fit)
    short = ("--p1-epochs", "1", "--fft-epochs", "1", "--branches", "1")
    run_coft(tmp_path, *short)
    run_coft(tmp_path, *short, "--contrast", "--queue", "32", out="contrast")
    run_vecaf(tmp_path, "--loops", "1", "--epochs", "1", out="vecaf")
    for method in ("craft", "coop"):
        craft.main(craft_args(tmp_path, "--method", method, "--budget", "16", out=method))
    through_stage, through_fit = {("Run.stage", "fit")}, {("fit",)}
    assert chains == {"coft.phase1_loss.<locals>.loss": through_stage, "coft.branch_training.<locals>.loss": through_stage,
                      "vecaf.fine_tune.<locals>.loss": through_stage,
                      "craft.refiner_epoch.<locals>.loss": through_fit, "craft.coop.<locals>.loss": through_fit}
    assert len(losses) == 6  # fine_tune's two losses: Eq. 7 alone, and Eq. 10


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert "--data-root is required" in coft_error(capsys, "--dataset", "dtd", "--out", str(tmp_path / "a"))
    assert "unknown dataset" in coft_error(capsys, "--dataset", "mnist", "--out", str(tmp_path / "b"))
    # a split file that names missing images
    root = tmp_path / "DATA"
    write_image(str(root / "dtd" / "images" / "banded" / "a.jpg"))
    split = {"train": [["banded/a.jpg", 0, "banded"], ["banded/gone.jpg", 0, "banded"]],
             "val": [], "test": [["banded/a.jpg", 0, "banded"]]}
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    err = coft_error(capsys, "--dataset", "dtd", "--data-root", str(root), "--out", str(tmp_path / "c"))
    assert "do not exist" in err and "gone.jpg" in err
    # a checkpoint path that does not exist
    assert "unknown model" in coft_error(capsys, "--clip", str(tmp_path / "nope.pt"),
                                                       "--out", str(tmp_path / "d"))
    # --eval-only / --phase 2 without the saved state they need
    torch.save(randomized("tiny-vit").state_dict(), tmp_path / "tiny.pt")
    small = ["--clip", str(tmp_path / "tiny.pt"), "--clip-act", "quick_gelu", "--M", "4", "--K", "2", "--vpt-tokens", "2"]
    assert "holds no run for --eval-only" in coft_error(capsys, *small, "--eval-only", "--out", str(tmp_path / "e"))
    assert "holds no run for --phase 2" in coft_error(capsys, *small, "--phase", "2", "--out", str(tmp_path / "f"))
    # ... or a run that lacks one of them
    run_coft(tmp_path, *SHORT, out="g")
    (tmp_path / "g" / "stages" / "phase1_round1_model2.pt").unlink()
    assert "phase1_round1_model2.pt not found: --phase 2 needs Phase I" in coft_error(
        capsys, *coft_args(tmp_path, *SHORT[:-1], "2", out="g"))
    assert "--eval-only needs a finished run" in coft_error(capsys, *coft_args(tmp_path, *SHORT, "--eval-only", out="g"))


def folder_state(out):
    """Every file under a run folder with its bytes: to show a refused run changed nothing."""
    return {p.relative_to(out): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


SHORT = ("--p1-epochs", "1", "--fft-epochs", "1", "--phase", "1")


def test_a_folder_holding_a_run_is_only_continued_with_its_own_config(tmp_path, capsys):
    run_coft(tmp_path, *SHORT)
    out = tmp_path / "run"
    before = folder_state(out)
    assert {str(p) for p in before} >= {"config.json", "metrics.json", "stages/phase1_round1_model1.pt"}
    # without --resume: refused, whatever the flags
    assert "holds a run already" in coft_error(capsys, *coft_args(tmp_path, *SHORT))
    # --resume with other settings (the example): one line naming every difference
    err = coft_error(capsys, *coft_args(tmp_path, *SHORT, "--K", "2", "--p1-lr", "0.05", "--detach-neg", "--resume"))
    assert "other settings" in err and "K: 4 -> 2" in err and "p1_lr: 0.03 -> 0.05" in err and "detach_neg" in err
    # --resume with another --M, --eval-only on another dataset, --phase 2 with another Phase-II lr
    assert "M: 4 -> 6" in coft_error(capsys, *coft_args(tmp_path, *SHORT, "--M", "6", "--resume"))
    make_imagefolder(tmp_path / "IF")
    err = coft_error(capsys, *coft_args(tmp_path, *SHORT, "--eval-only", "--dataset", "imagefolder",
                                      "--data-root", str(tmp_path / "IF")))
    assert "the dataset changed (digits -> imagefolder)" in err
    assert "fft_lr" in coft_error(capsys, *coft_args(tmp_path, "--p1-epochs", "1", "--fft-epochs", "1", "--phase", "2",
                                                   "--fft-lr", "0.05"))
    # bad input on --resume / --restart fails before anything is written or deleted
    assert "data-root" in coft_error(capsys, *coft_args(tmp_path, *SHORT, "--dataset", "dtd", "--data-root",
                                                      str(tmp_path / "typo"), "--restart"))
    assert folder_state(out) == before  # nothing above wrote, deleted or overwrote a file
    # the same flags continue it: every finished stage is reused, every number the same
    again = run_coft(tmp_path, *SHORT, "--resume", "--workers", "1", "--log-every", "5")
    assert numbers(again) == numbers(json.loads(before[Path("metrics.json")]))
    # --restart discards the run and makes it under the new flags
    m = run_coft(tmp_path, *SHORT, "--K", "2", "--restart")
    saved = torch.load(out / "stages" / "phase1_round1_model1.pt", weights_only=True)
    assert m["seed_set"]["size"] <= 20 and saved["record"]["K"] == 2
    assert json.loads((out / "config.json").read_text())["config"]["K"] == 2


def test_a_stage_file_or_checkpoint_is_used_only_under_its_own_record(tmp_path, capsys):
    """Stage files that reach a folder by another way than its own run (copied, or left by an
    older version) are checked against the settings they record, not trusted."""
    run_coft(tmp_path, *SHORT, out="a")
    run_coft(tmp_path, *SHORT, "--p1-lr", "0.05", out="b")
    a, b = tmp_path / "a" / "stages", tmp_path / "b" / "stages"
    (a / "phase1_round1_model2.pt").write_bytes((b / "phase1_round1_model2.pt").read_bytes())
    err = coft_error(capsys, *coft_args(tmp_path, *SHORT, "--resume", out="a"))
    assert "phase1_round1_model2.pt was made with other settings (p1_lr: 0.05 -> 0.03)" in err
    # an epoch checkpoint likewise (as if killed mid-stage)
    (a / "phase1_round1_model2.pt").unlink()
    state = torch.load(b / "phase1_round1_model2.pt", weights_only=True)
    runs.atomic_save({"epoch": 0, "record": state["record"], "model": state["model"]}, a / "phase1_round1_model2.ckpt")
    assert "phase1_round1_model2.ckpt was made with other settings" in coft_error(
        capsys, *coft_args(tmp_path, *SHORT, "--resume", out="a"))
    # a truncated stage file or checkpoint, on --resume and on --eval-only: one line naming the file
    (a / "phase1_round1_model2.ckpt").write_bytes(b"PK\x03\x04 truncated")
    err = coft_error(capsys, *coft_args(tmp_path, *SHORT, "--resume", out="a"))
    assert "cannot read" in err and "phase1_round1_model2.ckpt" in err
    data_ = (a / "phase1_round1_model1.pt").read_bytes()
    (a / "phase1_round1_model1.pt").write_bytes(data_[:len(data_) // 2])
    for flag in ("--resume", "--eval-only"):
        err = coft_error(capsys, *coft_args(tmp_path, *SHORT, flag, out="a"))
        assert "cannot read" in err and "phase1_round1_model1.pt" in err


def test_defaults_follow_the_backbone_and_the_method():
    """The paper's recipe for real backbones, the dev-chosen values for the stand-in (docs/demo.md),
    explicit flags always win; rounds: 1, 3 with --plus or --method selftrain."""
    def resolved(*argv):
        a = coft.resolve_defaults(coft.parser().parse_args(list(argv)))
        return a.M, a.vpt_tokens, a.clip_grad, a.fft_lr, a.rounds
    assert resolved("--clip", "ViT-B/16") == (16, 20, 0.0, 5e-4, 1)
    assert resolved("--clip", "demo") == (4, 0, 1.0, 2e-2, 1)
    assert resolved("--clip", "demo", "--M", "16", "--vpt-tokens", "20", "--clip-grad", "0") == (16, 20, 0.0, 2e-2, 1)
    assert resolved("--clip", "ViT-B/16", "--vpt-tokens", "0", "--plus")[1:] == (0, 0.0, 5e-4, 3)
    assert resolved("--method", "selftrain")[-1] == 3 and resolved("--method", "selftrain", "--rounds", "1")[-1] == 1
    thresholds = [coft.resolve_defaults(coft.parser().parse_args(["--clip", c])).threshold for c in ("demo", "RN50")]
    assert thresholds == [0.7, 0.95]


def test_stage_records_cover_the_settings_each_stage_depends_on():
    """A Phase-I model's record has S*'s and Phase I's settings and none of Phase II's; a branch's
    has all three: so a changed Phase-I flag invalidates the branches too."""
    args = coft.resolve_defaults(coft.parser().parse_args([]))
    config = runs.settings(args, coft.UNRECORDED_FLAGS)[0]
    config.update(data="d", clip="c", fft_backbone=None, zero_shot_prompts="z", rounds=1)
    p1, br = coft.stage_record(config, "phase1_round2_model1"), coft.stage_record(config, "branch1")
    assert {"K", "seed", "data", "clip", "zero_shot_prompts", "p1_lr", "lam", "M", "batch"} <= set(p1)
    assert not {"fft_lr", "gamma", "queue", "workers", "device"} & set(p1)
    assert set(p1) - {"stage"} < set(br) and {"fft_lr", "gamma", "queue", "rounds"} <= set(br)
    no_numbers = set(runs.UNRECORDED_FLAGS) | set(coft.UNRECORDED_FLAGS)
    assert not no_numbers & set(br)
    # every flag is either a setting some stage depends on, or declared as not changing numbers
    # (runs.UNRECORDED_FLAGS, coft.UNRECORDED_FLAGS), or one whose effect only metrics.json shows (method, eval split, ...)
    reported_only = {"eval_split", "branches", "plus", "template_ensemble", "fft_lr", "head_init"}
    flags = set(vars(args)) - {k for k in vars(args) if k.startswith("bench")}
    assert flags <= no_numbers | set(br) | set(coft.stage_record(config, "topk")) | reported_only


def test_results_do_not_depend_on_the_worker_count(tmp_path, pretrained_tiny):
    """The same seed with 0 and 2 DataLoader workers: identical metrics and identical weights of
    every stage (augmentations are seeded per sample, not per worker)."""
    results = [run_coft(tmp_path, "--workers", w, "--fft-aug", "strong", out=f"w{w}", ckpt=pretrained_tiny[0])
            for w in ("0", "2")]
    assert numbers(results[0]) == numbers(results[1])
    for tag in ("phase1_round1_model1", "branch2"):
        s0, s2 = stage_state(tmp_path / "w0", tag), stage_state(tmp_path / "w2", tag)
        assert all(torch.equal(s0[k], s2[k]) for k in s0), tag


def test_a_nan_loss_ends_the_cli_with_one_line(tmp_path, capsys, monkeypatch):
    real = coft.phase1_losses
    monkeypatch.setattr(coft, "phase1_losses", lambda *a, **kw: (lambda l1, l2: (l1 * float("nan"), l2))(*real(*a, **kw)))
    err = coft_error(capsys, *coft_args(tmp_path, *SHORT))
    assert "phase I round 1 model 1: non-finite loss (loss nan" in err and "step 1 of" in err
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert (tmp_path / "run" / "log.txt").read_text().splitlines()[-1] == err  # the log ends with the error


def log_body(path):
    """log.txt's lines, each run's marker line as ("marker", started | continued)."""
    return [("marker", re.search(r" (started|continued): ", line).group(1)) if line.startswith("==== ") else line
            for line in Path(path).read_text().splitlines()]


def test_every_line_a_run_prints_is_in_its_log_and_a_continued_run_appends(tmp_path, capsys, monkeypatch):
    """log.txt holds what the run printed, line for line, after a marker with the time and the
    command; --resume appends after a "continued" marker and keeps what was there; --restart
    starts a new log. The same for VeCAF (one open_run for every CLI). A fault's traceback too."""
    capsys.readouterr()
    run_coft(tmp_path, *SHORT)
    printed = capsys.readouterr()
    first = log_body(tmp_path / "run" / "log.txt")
    assert first[0] == ("marker", "started") and first[1:] == printed.out.splitlines() + printed.err.splitlines()
    assert any(line.startswith("metrics: ") for line in first[1:])
    marker = (tmp_path / "run" / "log.txt").read_text().splitlines()[0]
    assert re.match(r"==== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d .* started: python", marker), marker
    run_coft(tmp_path, *SHORT, "--resume")
    printed = capsys.readouterr()
    both = log_body(tmp_path / "run" / "log.txt")
    assert both[:len(first)] == first and both[len(first)] == ("marker", "continued")
    assert both[len(first) + 1:] == printed.out.splitlines()
    run_coft(tmp_path, *SHORT, "--restart")
    assert log_body(tmp_path / "run" / "log.txt")[0] == ("marker", "started")
    assert log_body(tmp_path / "run" / "log.txt").count(("marker", "started")) == 1
    capsys.readouterr()
    run_vecaf(tmp_path, "--loops", "1", "--epochs", "1", out="v")
    printed = capsys.readouterr()
    assert log_body(tmp_path / "v" / "log.txt")[1:] == printed.out.splitlines()
    # a fault of the code (not a user error): its traceback is in the log too
    monkeypatch.setattr(coft, "phase1_losses", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        run_coft(tmp_path, *SHORT, out="fault")
    log = (tmp_path / "fault" / "log.txt").read_text().splitlines()
    assert log[-1] == "RuntimeError: boom" and "Traceback (most recent call last):" in log


BAD_FLAGS = [("--clip-grad", "-1"), ("--K", "-1"), ("--K", "0"), ("--p1-epochs", "0"), ("--fft-epochs", "0"),
             ("--rounds", "0"), ("--rounds", "-1"), ("--tau-c", "0"), ("--batch", "0"), ("--batch", "-3"),
             ("--eval-batch", "0"), ("--p1-lr", "-0.1"), ("--fft-lr", "0"), ("--weight-decay", "-1"),
             ("--momentum", "-0.5"), ("--momentum", "1"), ("--workers", "-1"), ("--queue", "0"), ("--M", "-2"),
             ("--mu", "1.5"), ("--lam", "nan"), ("--K", "two")]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, flag, value):
    err = coft_error(capsys, "--out", str(tmp_path / "r"), flag, value)
    assert f"argument {flag}:" in err and value in err
    assert not (tmp_path / "r").exists()


def test_more_one_line_errors(tmp_path, capsys):
    # --out naming a file
    (tmp_path / "file").write_text("x")
    assert "is a file" in coft_error(capsys, *coft_args(tmp_path, out="file"))
    # an unknown --fft-backbone / --clip: refused before the data or any model is loaded
    assert "--fft-backbone: unknown model 'ViT-Q/3'" in coft_error(capsys, *coft_args(tmp_path, "--fft-backbone", "ViT-Q/3"))
    assert not (tmp_path / "run").exists()
    # a prompt longer than the context (tiny-vit: 16 tokens): names the flag that shortens it
    err = coft_error(capsys, *coft_args(tmp_path, "--M", "14", out="long"))
    assert "use a smaller --M" in err and "does not fit the text tower's context of 16 tokens" in err
    assert not (tmp_path / "long").exists()  # before the run folder, so before the zero-shot pass
    # --restart with --eval-only; --eval-only in an empty folder
    assert "--restart discards" in coft_error(capsys, *coft_args(tmp_path, "--restart", "--eval-only"))
    assert "holds no run" in coft_error(capsys, *coft_args(tmp_path, "--eval-only", out="empty"))
    # a dataset with one class, and two classes that read the same in a prompt
    make_imagefolder(tmp_path / "one", classes=("cat",))
    assert "classification needs at least two" in coft_error(
        capsys, *coft_args(tmp_path, "--dataset", "imagefolder", "--data-root", str(tmp_path / "one")))
    make_imagefolder(tmp_path / "same", classes=("red_fox", "Red fox"))
    assert "read the same in a prompt ('red fox')" in coft_error(
        capsys, *coft_args(tmp_path, "--dataset", "imagefolder", "--data-root", str(tmp_path / "same")))


def test_table_on_a_damaged_metrics_file_is_one_line(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text('{"method": "coft", "zero_')
    assert "a/metrics.json is damaged" in coft_error(capsys, "--table", str(tmp_path / "a"))
    (tmp_path / "a" / "metrics.json").write_text('{"method": "coft"}')  # partial: no numbers
    assert "KeyError" in coft_error(capsys, "--table", str(tmp_path / "a"))
    (tmp_path / "a" / "metrics.json").write_text('{"method": "coft", "zero_shot_acc": NaN}')  # no strict JSON
    assert "NaN is not a number of strict JSON" in coft_error(capsys, "--table", str(tmp_path / "a"))
    # a path that does not exist, a run of another CLI, folders without a finished run
    err = coft_error(capsys, "--table", str(tmp_path / "nope"))
    assert f"--table {tmp_path / 'nope'}: no such folder" in err
    (tmp_path / "a" / "metrics.json").write_text('{"method": "craft", "shots": 1}')
    assert "holds a 'craft' run, not one of coft, coft+" in coft_error(capsys, "--table", str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    err = coft_error(capsys, "--table", str(tmp_path / "b"))
    assert f"the --table folder {tmp_path / 'b'} holds no finished run" in err
    (tmp_path / "c").mkdir()
    assert "none of the 2 --table folders holds a finished run" in coft_error(capsys, "--table", str(tmp_path / "b"),
                                                                             str(tmp_path / "c"))


def test_ctrl_c_is_one_line_saying_where_the_checkpoint_is(tmp_path, capsys, monkeypatch):
    """Before anything is saved: that nothing is; after the first stage: where it is, and --resume."""
    real, calls = train.fit, []

    def interrupted_at(n):
        def fit(*a, **kw):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*a, **kw)
        return fit
    for n, expected in ((1, "nothing was saved yet"), (2, "--resume continues")):
        calls.clear()
        monkeypatch.setattr(train, "fit", interrupted_at(n))
        with pytest.raises(SystemExit) as e:
            coft.main(coft_args(tmp_path, *SHORT, "--restart"))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 130 and "\n" not in err and expected in err, err
    assert str(tmp_path / "run" / "stages") in err


@pytest.mark.parametrize("demo,paper,n,expected", [("demo", "paper", 9, ("caltech101", "ucf101")),
                                                    ("craft", "craft-paper", 11, ("imagenet", "sun397")),
                                                    ("vecaf", None, 0, ()), ("bold", None, 0, ())])
def test_run_sh_refuses_unknown_arguments_and_lists_missing_datasets_up_front(tmp_path, demo, paper, n, expected):
    r = run_sh(demo, "--bogus")
    assert r.returncode == 2 and "--bogus" in r.stderr and "pretraining" not in r.stdout
    if paper is None:
        return
    make_dtd(tmp_path / "DATA")
    r = run_sh(paper, str(tmp_path / "DATA"), env={"OUT": str(tmp_path / "runs")})
    assert r.returncode == 2 and not (tmp_path / "runs").exists() and f"of {n} datasets" in r.stderr
    missing = r.stderr.split("missing")[1]
    assert all(name in missing for name in expected) and "dtd" not in missing


def test_table_groups_seeds(tmp_path, capsys):
    base = {"method": "coft", "zero_shot_acc": 50.0, "seed_set": {"size": 10, "precision": 90.0},
            "clean_set_1": {"kept_fraction": 80.0, "precision": 70.0},
            "clean_set_2": {"kept_fraction": 90.0, "precision": 72.0}, "phase1_agreement": 95.0,
            "phase1_model1_acc": 60.0, "phase1_model2_acc": 62.0, "branch1_acc": 64.0, "branch2_acc": 66.0,
            "time_s": {"total": 10.0}}
    for s, acc in ((0, 70.0), (1, 74.0)):
        (tmp_path / f"coft-s{s}").mkdir()
        (tmp_path / f"coft-s{s}" / "metrics.json").write_text(json.dumps(dict(base, ensemble_acc=acc)))
    (tmp_path / "missing").mkdir()  # an unfinished run: named, left out
    coft.main(["--table", str(tmp_path / "coft-s0"), str(tmp_path / "coft-s1"), str(tmp_path / "missing")])
    out = capsys.readouterr().out
    assert "missing: no metrics.json" in out
    lines = out.splitlines()
    header = re.split(r"\s{2,}", next(line for line in lines if line.startswith("mean±sd over seeds")))
    mean = dict(zip(header, re.split(r"\s{2,}", next(line for line in lines if line.startswith("coft ")))))
    assert mean["n"] == "2" and mean["kept %"] == "85.0±0.0" and mean["clean prec"] == "71.0±0.0"
    assert mean["removed prec"] == mean["AUROC margin"] == mean["AUROC conf"] == "-"
    assert mean["final acc"] == "72.0±2.8"  # the mean ± sd of 70 and 74


def test_table_shows_what_each_method_trained_on_and_the_filter_diagnosis():
    seed_set = {"size": 160, "kept_fraction": 17.8, "precision": 90.0}
    common = {"zero_shot_acc": 50.0, "seed_set": seed_set, "time_s": {"total": 1.0}}
    rounds = [{"kept_fraction": 60.0, "precision": 70.0, "acc": 51.0}, {"kept_fraction": 65.0, "precision": 72.0,
                                                                         "acc": 52.0}]
    st = coft.run_summary(dict(common, method="selftrain", selftrain_rounds=rounds, selftrain_acc=52.0))
    assert (st["kept %"], st["clean prec"], st["final acc"]) == ([65.0], [72.0], 52.0)  # the last round's set
    tk = coft.run_summary(dict(common, method="topk", topk_acc=55.0))
    assert (tk["kept %"], tk["clean prec"], tk["removed prec"], tk["final acc"]) == ([17.8], [90.0], [], 55.0)
    clean = [{"kept_fraction": 99.0 + a, "precision": 60.0 + a, "removed_precision": 10.0 * a,
              "auroc_peer_margin": 70.0 + a, "auroc_peer_confidence": 75.0 + a} for a in (0, 1)]
    cf = coft.run_summary(dict(common, method="coft", clean_set_1=clean[0], clean_set_2=clean[1], ensemble_acc=58.0))
    assert (cf["kept %"], cf["removed prec"], cf["AUROC margin"], cf["AUROC conf"]) == \
        ([99.0, 100.0], [0.0, 10.0], [70.0, 71.0], [75.0, 76.0])


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_names_the_file(tmp_path, capsys, workers):
    root = tmp_path / "DATA"
    for c in ("banded", "dotted"):
        write_image(str(root / "train" / c / "a.png"))
        write_image(str(root / "test" / c / "a.png"))
    (root / "train" / "dotted" / "broken.png").write_bytes(b"not a png")
    torch.save(randomized("tiny-vit").state_dict(), tmp_path / "tiny.pt")
    err = coft_error(capsys, "--dataset", "imagefolder", "--data-root", str(root), "--clip", str(tmp_path / "tiny.pt"),
                    "--clip-act", "quick_gelu", "--M", "4", "--out", str(tmp_path / "run"), "--workers", str(workers))
    assert "imagefolder: 1 of 5 images cannot be read (train/dotted/broken.png: not an image" in err
    assert not runs.holds_run(tmp_path / "run")  # found before any work


def test_precision_is_part_of_a_runs_config(tmp_path, capsys):
    """--precision auto on a CPU runs (and records) fp32; bf16 is recorded as such, and a run
    folder made at one precision is not continued at another."""
    m = run_coft(tmp_path, *SHORT)
    assert m["precision"] == "fp32" and json.loads((tmp_path / "run" / "config.json").read_text())["config"][
        "precision"] == "fp32"
    b = run_coft(tmp_path, *SHORT, "--precision", "bf16", out="bf16")
    assert b["precision"] == "bf16"
    err = coft_error(capsys, *coft_args(tmp_path, *SHORT, "--precision", "bf16", "--resume"))
    assert "precision: 'fp32' -> 'bf16'" in err
    assert "fp16 needs a GPU" in coft_error(capsys, *coft_args(tmp_path, *SHORT, "--precision", "fp16", out="x"))



def test_every_method_runs_on_a_hugging_face_folder_with_its_activation_and_recorded_identity(tmp_path, capsys):
    """A Hugging Face CLIPModel folder (GELU, its own mean/std) as --clip for VeCAF, CraFT and
    CoFT (with a file as --fft-backbone, the distillation path): each run's config records the
    folder with its weights' sha256 and activation; an --clip-act against the folder's config is
    refused in one line, before any work."""
    transformers = pytest.importorskip("transformers")
    import craft
    import vecaf
    folder = tmp_path / "hf"
    tiny_hf(transformers, "gelu").save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    torch.save(randomized("tiny-vit").state_dict(), tmp_path / "student.pt")
    v = ["--clip", str(folder), "--out", str(tmp_path / "v"), "--method", "random", "--budget", "6", "--loops", "1",
         "--epochs", "1", "--batch", "4", "--log-every", "0"]
    c = ["--clip", str(folder), "--out", str(tmp_path / "c"), "--shots", "1", "--budget", "16", "--popsize", "8",
         "--intrinsic-dim", "8", "--log-every", "0", "--eval-split", "dev"]
    k = ["--clip", str(folder), "--fft-backbone", str(tmp_path / "student.pt"), "--clip-act", "gelu", "--out",
         str(tmp_path / "k"), "--M", "4", "--K", "2", "--vpt-tokens", "2", "--p1-epochs", "1", "--fft-epochs", "1",
         "--batch", "64", "--log-every", "0", "--branches", "1"]
    for main, argv, out in ((vecaf.main, v, "v"), (craft.main, c, "c"), (coft.main, k, "k")):
        main(argv)
        config = json.loads((tmp_path / out / "config.json").read_text())["config"]
        assert re.fullmatch(rf"{re.escape(str(folder))} sha256:[0-9a-f]{{16}} gelu", config["clip"]), config["clip"]
    assert re.fullmatch(r".*student.pt sha256:[0-9a-f]{16} gelu", config["fft_backbone"])
    capsys.readouterr()
    err = coft_error(capsys, *[a if a != "gelu" else "quick_gelu" for a in k], "--resume")
    assert "whose config.json says gelu, not quick_gelu" in err


def test_restart_keeps_the_run_until_every_check_passed(tmp_path, capsys):
    """--restart with a backbone file that is not a checkpoint, a GPU this machine lacks, a
    device that does not exist, or together with --resume: one line each, and the finished run in
    --out is still there (VeCAF, CraFT and CoFT alike); a seed beyond 64 bits is refused too."""
    import craft
    import vecaf
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save(randomized("tiny-vit").state_dict(), tmp_path / "w.pt")
    base = {"v": (vecaf.main, ["--method", "random", "--budget", "6", "--loops", "1", "--epochs", "1", "--batch", "4"]),
            "c": (craft.main, ["--shots", "1", "--budget", "16", "--popsize", "8", "--intrinsic-dim", "8",
                               "--eval-split", "dev"]),
            "k": (coft.main, ["--M", "4", "--K", "2", "--vpt-tokens", "2", "--p1-epochs", "1", "--fft-epochs", "1",
                              "--batch", "64", "--branches", "1"])}
    for out, (main, flags) in base.items():
        argv = [*flags, "--out", str(tmp_path / out), "--log-every", "0", "--clip-act", "quick_gelu"]
        main([*argv, "--clip", str(tmp_path / "w.pt")])
        for bad, message in ((["--clip", str(tmp_path / "junk.pt")], "neither a TorchScript archive nor a state dict"),
                             (["--clip", str(tmp_path / "w.pt"), "--device", "foo"], "--device 'foo' is not a device"),
                             (["--clip", str(tmp_path / "w.pt"), "--resume"], "--resume continues the run")):
            err = one_line_error(main, capsys, *argv, *bad, "--restart")
            assert message in err and (tmp_path / out / "metrics.json").exists(), (out, bad, err)
        if not torch.cuda.is_available():
            err = one_line_error(main, capsys, *argv, "--clip", str(tmp_path / "w.pt"), "--device", "cuda",
                                 "--restart")
            assert "torch sees no GPU" in err and (tmp_path / out / "metrics.json").exists()
        assert "<= 9223372036854775807, got 18446744073709551616" in one_line_error(main, capsys, *argv, "--seed",
                                                                                    str(2 ** 64))


def test_a_file_given_is_never_one_a_run_writes_or_deletes_and_restart_deletes_only_unchanged_forms(tmp_path, capsys):
    """A file given as input that is one the run writes or deletes in --out (its log, config, a stage)
    is one line, before any work, as is an output flag naming an input (deploy.py's --csv an image).
    --restart deletes a form written for a person only while it is as the run wrote it: one a person
    changed is kept (said), and the new form goes to the next free name (said)."""
    import deploy
    import vecaf
    argv = vecaf_args(tmp_path, "--method", "random", "--loops", "1", "--labels", str(tmp_path / "labels.csv"))
    with pytest.raises(SystemExit) as e:
        vecaf.main(argv)
    run = tmp_path / "run"
    listed = run / "to_label_loop1.csv"
    first = listed.read_bytes()
    assert e.value.code == runs.WAITING and json.loads((run / runs.PERSON_FILES).read_text())["waiting"] == 1
    capsys.readouterr()
    (tmp_path / "classes.txt").write_text("zero\none\n")
    os.link(tmp_path / "classes.txt", run / "stages" / "linked.txt")
    for flag, given, said in (("--labels", run / "log.txt", f"--labels {run / 'log.txt'} is {run / 'log.txt'}"),
                              ("--labels", run / "config.json", "config.json, a file the run in --out"),
                              ("--captions", tmp_path / "classes.txt", f"is {run / 'stages' / 'linked.txt'}, a file"),
                              ("--labels", run / "stages" / "x.csv", f"is inside {run / 'stages'}")):
        kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        err = one_line_error(vecaf.main, capsys, *argv, flag, str(given), "--restart")
        assert said in err and "writes or --restart deletes: give a copy kept elsewhere" in err, err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept
    (run / "stages" / "linked.txt").unlink()
    write_image(tmp_path / "a.png")
    err = one_line_error(deploy.main, capsys, str(run), str(tmp_path / "a.png"), "--csv", str(tmp_path / "a.png"))
    assert "--csv" in err and "is one of the images to classify" in err and (tmp_path / "a.png").stat().st_size > 0
    # --restart: the list as the run wrote it is deleted (another seed picks other images: a new list, same name)
    with pytest.raises(SystemExit):
        vecaf.main(argv + ["--restart", "--seed", "1"])
    second = listed.read_bytes()
    assert second != first and not (run / "to_label_loop1-2.csv").exists()
    # ... a list a person changed is kept, and the new one goes to the next free name
    listed.write_bytes(second.replace(b",,1,", b",zero,1,", 1))
    changed = listed.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        vecaf.main(argv + ["--restart", "--seed", "2"])
    out = capsys.readouterr().out
    assert listed.read_bytes() == changed and (run / "to_label_loop1-2.csv").exists()
    assert f"note: --restart kept {listed} (changed since the run wrote it)" in out
    assert f"note: {listed} (not a file this run wrote) stays as it is: loop 1's list of images to label is in " \
           f"{run / 'to_label_loop1-2.csv'}" in out
    assert json.loads((run / runs.PERSON_FILES).read_text())["files"].keys() == {"to_label_loop1-2.csv"}
    # a list given back half filled in is the list the run asks about again, as it is
    newest = run / "to_label_loop1-2.csv"
    newest.write_bytes(newest.read_bytes().replace(b",,1,", b",zero,1,", 1))
    half = newest.read_bytes()
    with pytest.raises(SystemExit) as e:
        vecaf.main(argv + ["--seed", "2", "--labels", str(newest)])
    assert e.value.code == runs.WAITING and newest.read_bytes() == half and not (run / "to_label_loop1-3.csv").exists()
    assert f"5 of them not labelled yet in {newest} (--labels): fill in their class cells there" in \
        capsys.readouterr().err


def test_a_run_continued_with_another_cpu_thread_count_is_warned_about(tmp_path, capsys):
    """config.json keeps the CPU thread count (with the settings that change no number): a
    --resume under another count says that the numbers may then differ, and how to match it."""
    run_coft(tmp_path, *SHORT)
    threads = torch.get_num_threads()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["how"]["cpu_threads"] == threads
    capsys.readouterr()
    torch.set_num_threads(threads + 1)
    try:
        run_coft(tmp_path, *SHORT, "--resume")
        out = capsys.readouterr().out
        assert f"started with {threads} CPU threads, continued with {threads + 1}" in out
        assert f"OMP_NUM_THREADS={threads} to continue it exactly" in out
        run_coft(tmp_path, *SHORT, "--resume")  # the count it was last continued with: no warning
        assert "CPU threads" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


# ---- the own-images walk-through (docs/own-images.md), run as written

def the_person_in_the_browser(browser, url, what, answers, review_of=None):
    """The walk-through's person on the page at `url`, with the true classes `answers` {name: class}
    (NFC names): what = "label": every image a VeCAF loop asks for, by clicks; "review": on each of
    branch 1's views (review_of: its run folder's page.Review), the first five tiles, confirmed where
    the run's label is right and corrected where not, then the done button."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def wait(condition):
        return WebDriverWait(browser, 60).until(condition)

    def progress():
        return browser.find_element(By.ID, "progress").text.split(" / ")
    browser.get(url)
    wait(lambda d: progress()[1] != "0")
    if what == "label":
        while not browser.find_element(By.ID, "done").is_displayed():
            n = int(progress()[0])
            key = unicodedata.normalize("NFC", browser.find_element(By.ID, "caption").get_attribute("data-key"))
            browser.find_element(By.CSS_SELECTOR, f'#classes button[data-class="{answers[key]}"]').click()
            wait(lambda d, n=n: int(progress()[0]) == n + 1)
        return
    answered = 0
    for view in sorted(v for v in review_of.views if v.startswith("b1:")):
        Select(browser.find_element(By.ID, "views")).select_by_value(view)
        keys = [review_of.key(i) for i in review_of.order(view, 0, 5)]
        wait(lambda d: d.execute_script("return [...document.querySelectorAll('#grid .tile')].map(t => t.dataset.key)")[
            :5] == keys)  # read at once: the grid is drawn anew after each answer
        for k in range(len(keys)):
            tile = browser.find_elements(By.CSS_SELECTOR, "#grid .tile")[k]
            truth = answers[unicodedata.normalize("NFC", keys[k])]
            if tile.find_element(By.CSS_SELECTOR, "button.confirm").text == "\u2713 " + truth:
                tile.find_element(By.CSS_SELECTOR, "button.confirm").click()
            else:
                Select(tile.find_element(By.CSS_SELECTOR, "select.correct")).select_by_visible_text(truth)
            answered += 1
            wait(lambda d: int(progress()[0]) == answered)
    browser.find_element(By.ID, "review-done").click()


@pytest.mark.walkthrough
def test_the_own_images_walkthrough_runs_as_written(tmp_path, browser):
    """Every ```bash block of docs/own-images.md, in order, as one bash script that stops at the first
    failing command, in a folder that holds the repository's code (and nothing else of it): the
    generated folder, CoFT without labels, the pseudo-labels checked and given back, then reviewed
    in the browser, CraFT on them, VeCAF with the person answering each stop, then in the browser,
    the table and deploy.py. A headless browser plays the person wherever a command prints a page's
    address (the_person_in_the_browser). Then what each step says it writes is there, and VeCAF's
    two routes give the same run."""
    import subprocess
    import sys
    import page
    repo = Path(__file__).parent
    for f in [*repo.glob("*.py"), repo / "assets"]:
        (tmp_path / f.name).symlink_to(f)
    blocks = re.findall(r"```bash\n(.*?)```", (repo / "docs" / "own-images.md").read_text(), re.S)
    assert len(blocks) >= 8
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}
    mine = tmp_path / "runs" / "mine"
    pages, stdout = [], []
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        script = subprocess.Popen(["bash", "-c", "set -e\n" + "\n".join(blocks)], cwd=tmp_path, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        try:
            for line in script.stdout:
                stdout.append(line)
                address = re.search(r"open (http://\S+) to (label|review)", line)
                if address:
                    pages.append(address[2])
                    with open(tmp_path / "my_digits" / "answers.csv", newline="", encoding="utf-8") as f:
                        answers = {unicodedata.normalize("NFC", row["path"]): row["class"] for row in csv.DictReader(f)}
                    the_person_in_the_browser(browser, address[1], address[2], answers,
                                              page.Review(mine / "coft") if address[2] == "review" else None)
        except BaseException:  # the script and the command it runs (a page waiting for its person) end with the test
            os.killpg(script.pid, signal.SIGKILL)
            raise
        finally:
            script.wait()
        stderr.seek(0)
        r = subprocess.CompletedProcess(script.args, script.returncode, "".join(stdout), stderr.read())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert pages == ["review", "label", "label"]
    rows = list(csv.DictReader(open(mine / "coft" / "pseudo_labels.csv")))
    assert len(rows) == 300 and json.loads((mine / "coft" / "metrics.json").read_text())["ensemble_acc"] > 0
    checked = [row for row in rows if row["class"]]  # filled in by the person, in place
    assert len(checked) == 50 and len({row["branch1_class"] for row in checked}) == 10
    assert json.loads((mine / "coft-checked" / "metrics.json").read_text())["labels"]["size"] == 50
    reviewed = list(csv.DictReader(open(mine / "reviewed.csv", newline="", encoding="utf-8")))
    views = [v for v in page.Review(mine / "coft").views.items() if v[0].startswith("b1:")]
    assert len(reviewed) == sum(min(5, n) for _, n in views) == \
        json.loads((mine / "coft-reviewed" / "metrics.json").read_text())["labels"]["size"]
    assert json.loads((mine / "craft" / "metrics.json").read_text())["shots"] == 5.0
    vecaf_run = json.loads((mine / "vecaf" / "metrics.json").read_text())
    assert vecaf_run["selected"] == 20 and not (tmp_path / "my_digits" / "labels.csv").exists()
    for loop in (1, 2):  # each list filled in and kept, the record of what was asked
        asked = list(csv.DictReader(open(mine / "vecaf" / f"to_label_loop{loop}.csv")))
        assert len(asked) == 10 and all(row["class"] and row["loop"] == str(loop) for row in asked)
    # the browser route: the same picks, the same accuracies, the same weights as the scriptable one
    def without_times(x):  # metrics.json without times and memory
        if isinstance(x, dict):
            return {k: without_times(v) for k, v in x.items() if not k.endswith(("_s", "_mib"))}
        return [without_times(v) for v in x] if isinstance(x, list) else x
    browser_run = json.loads((mine / "vecaf-browser" / "metrics.json").read_text())
    assert without_times(browser_run) == without_times(vecaf_run) and browser_run["loops"][1]["acc"] > 0
    assert len(list(csv.DictReader(open(mine / "vecaf-labels.csv")))) == 20

    def tensors(x, at=""):  # every tensor of a stage file, by where it is
        if torch.is_tensor(x):
            return {at: x}
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
        return {k: v for key, value in items for k, v in tensors(value, f"{at}/{key}").items()}
    stages = sorted(os.listdir(mine / "vecaf" / "stages"))
    assert stages == sorted(os.listdir(mine / "vecaf-browser" / "stages")) and len(stages) >= 4
    for stage in stages:
        a, b = (tensors(torch.load(mine / run / "stages" / stage, weights_only=True))
                for run in ("vecaf", "vecaf-browser"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    assert r.stderr.count("waiting: loop") == 2 and "stays as it is" not in r.stdout  # the scriptable route's stops
    assert len((mine / "sevens.csv").read_text().splitlines()) == 1 + len(list((tmp_path / "my_digits" / "check" /
                                                                                "seven").iterdir()))


# names a spreadsheet reads as formulas, with spaces around them, a comma, a quote, a line break, a tab, an
# apostrophe before a formula character, and café as macOS writes it (NFD; answers.csv types it NFC)
HARD_NAMES = [" lead.png", "trail .png", "=cmd.png", "+SUM(1).png", "-x.png", "@a.png", "'q.png", "'=q.png", "a,b.png",
              'quo"te.png', "new\nline.png", "\ttab.png", "cafe\u0301.png"]


def the_persons_programs():
    """The Python programs of docs/own-images.md that play the person: step 3's (fills in the most
    doubtful rows of pseudo_labels.csv) and step 5's (fills in a VeCAF list, its path the argument)."""
    text = (Path(__file__).parent / "docs" / "own-images.md").read_text()
    step3, step5 = re.findall(r"python - (?:\"\$1\" )?<<'EOF'\n(.*?)\nEOF\n", text, re.S)
    return step3, step5


def test_the_walkthroughs_person_and_every_file_for_a_person_work_on_any_name(tmp_path, monkeypatch, capsys):
    """On a folder of hard names (HARD_NAMES and plain ones): pseudo_labels.csv, VeCAF's list and deploy.py's
    CSV name every image as a labels file does, a text cell starting with a formula character guarded with
    a leading '; the walk-through's person programs fill in the forms in place; and each file reads back as
    --labels to exactly the images and classes it names (the NFD file from an NFC row too)."""
    import subprocess
    import unicodedata
    import data
    import deploy
    import vecaf
    from test_coft import without_dataset
    monkeypatch.chdir(tmp_path)
    def nfc(text):
        return unicodedata.normalize("NFC", text)
    images, classes = Path("my_digits/images"), ["zero", "one"]
    names = HARD_NAMES + [f"{n:04d}.png" for n in range(20 - len(HARD_NAMES))]
    for k, name in enumerate(names):
        write_image(images / name, color=[(200, 30, 30), (30, 30, 200)][k % 2])
    Path("my_digits/classes.txt").write_text("zero\none\n")
    truth = {nfc(name): classes[k % 2] for k, name in enumerate(names)}
    with open("my_digits/answers.csv", "w", newline="", encoding="utf-8") as f:  # as data.write_example writes it
        csv.writer(f).writerows([("path", "class")] + [(data.csv_text(n), c) for n, c in truth.items()])
    task = data.images_task(images, "my_digits/classes.txt")
    keys = [data.item_key(source, i, task.root) for i, (source, _) in enumerate(task.train)]
    assert sorted(keys) == sorted(names)
    guarded = sorted("'" + n for n in names if n[0] in "=+-@\t'")
    assert len(guarded) == 7

    def cells(path, column=0):  # a CSV file's column, as written (guards and all)
        with open(path, newline="", encoding="utf-8") as f:
            return [row[column] for row in csv.reader(f)][1:]

    def read_back(path):  # the file as --labels: {pool name: class}
        labels = data.read_labels(path, task)
        return {keys[i]: classes[y] for i, y in zip(labels.index.tolist(), labels.y.tolist())}

    assert read_back("my_digits/answers.csv") == {k: truth[nfc(k)] for k in keys}  # NFC rows, an NFD file
    step3, step5 = the_persons_programs()
    own = ["--images", str(images), "--classes", "my_digits/classes.txt"]
    # CoFT's form: written guarded, filled in by step 3's person in place, read back
    coft.main(without_dataset(coft_args(tmp_path, *own, "--phase", "1", "--K", "2", out="runs/mine/coft")))
    form = Path("runs/mine/coft/pseudo_labels.csv")
    assert cells(form) == [data.csv_text(k) for k in keys] and sorted(c for c in cells(form) if c[0] == "'") == guarded
    subprocess.run([sys.executable, "-"], input=step3, text=True, check=True)
    checked = read_back(form)
    per_class = [cells(form, 2).count(c) for c in classes]  # model 1's classes: five rows of each filled in
    assert len(checked) == sum(min(5, n) for n in per_class) >= 5 and all(truth[nfc(k)] == c for k, c in checked.items())
    # VeCAF's list: written guarded, filled in by step 5's person in place, given back: the loop trains on it
    argv = without_dataset(vecaf_args(tmp_path, *own, "--budget", "20", "--loops", "1", out="runs/mine/vecaf"))
    with pytest.raises(SystemExit) as e:
        vecaf.main(argv + ["--labels", "my_digits/labels.csv"])
    listed = Path("runs/mine/vecaf/to_label_loop1.csv")
    assert e.value.code == runs.WAITING and str(listed) in capsys.readouterr().err
    assert sorted(cells(listed)) == sorted(data.csv_text(k) for k in keys)
    assert sorted(c for c in cells(listed) if c[0] == "'") == guarded
    subprocess.run([sys.executable, "-", str(listed)], input=step5, text=True, check=True)
    assert read_back(listed) == {k: truth[nfc(k)] for k in keys}
    vecaf.main(argv + ["--labels", str(listed)])
    loop = torch.load("runs/mine/vecaf/stages/loop1.pt", weights_only=True)
    assert {keys[i]: classes[y] for i, y in zip(loop["selected"].tolist(), loop["labels"].tolist())} == read_back(listed)
    # deploy.py's CSV, the images named relative to where it runs: guarded, and it reads back as --labels
    monkeypatch.chdir(images)
    deploy.predict(str(tmp_path / "runs/mine/vecaf"), ["."], csv_path=str(tmp_path / "predicted.csv"))
    monkeypatch.chdir(tmp_path)
    assert sorted(cells("predicted.csv")) == sorted(data.csv_text(k) for k in keys)
    predicted = dict(zip(map(data.csv_untext, cells("predicted.csv")), map(data.csv_untext, cells("predicted.csv", 1))))
    assert read_back("predicted.csv") == predicted


def test_a_run_whose_numbers_are_not_finite_writes_no_result(tmp_path, capsys, monkeypatch):
    """runs.finish_run: a NaN or infinite number anywhere in a run's metrics is one line naming it,
    and neither metrics.json (strict JSON has no NaN) nor predictions.pt is written."""
    real = coft.ensemble

    def nan_ensemble(run, probs):
        real(run, probs)
        run.metrics["ensemble_acc"] = float("nan")
    monkeypatch.setattr(coft, "ensemble", nan_ensemble)
    err = coft_error(capsys, *coft_args(tmp_path))
    assert "the run's ensemble_acc is not a finite number (nan)" in err
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "predictions.pt").exists()
    assert runs.non_finite({"a": [1.0, {"b": float("inf")}]}) == "a.1.b" and runs.non_finite({"a": 1}) is None


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_a_device_this_machine_lacks_is_one_line_in_every_cli(tmp_path, capsys, device):
    import craft
    import vecaf
    for main in (coft.main, craft.main, vecaf.main):
        err = one_line_error(main, capsys, "--device", device, "--out", str(tmp_path / "run"))
        assert f"--device {device}: this torch sees no {device} device" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["coft.py", "craft.py", "vecaf.py", "deploy.py"])
def test_ctrl_c_while_the_libraries_load_exits_130_without_a_traceback(tmp_path, script):
    """SIGINT delivered while the script imports torch (an import hook sends it to the process at that
    moment, after the script's first lines and before any of its own work): no traceback, exit 130."""
    import signal
    import subprocess
    import sys
    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and sys.argv and sys.argv[0].endswith('" + script + "'):\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Interrupt())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(Path(__file__).parent / script), "--help"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 128 + signal.SIGINT and "Traceback" not in r.stderr, r.stderr


# ---- a run knows its images by content (issue 45: real image folders, trusted)

def on_own_images(argv, root, check=True):
    """A CLI's arguments on the digits turned into a run on your own images (conftest.write_digit_layouts)."""
    i = argv.index("--dataset") if "--dataset" in argv else len(argv)
    return argv[:i] + argv[i + 2:] + ["--images", str(root / "flat"), "--classes", str(root / "classes.txt")] + \
        (["--check", str(root / "check")] if check else [])


def mirrored(path):
    """The image at path replaced by its mirror image, under the same name (a camera's IMG_0001.JPG reused)."""
    from PIL import Image
    with Image.open(path) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).load()
        flipped = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(path)


def test_every_command_that_continues_a_run_refuses_other_images_in_words(tmp_path, capsys):
    """--resume, --phase 2 and --eval-only (CoFT), --resume (CraFT) and a VeCAF step after a person's
    labels refuse images that are not those the run was made with: the same names with other
    images, one added, a check image changed. One line says what changed; nothing in the run folder
    is touched; with the images put back, the run goes on. A folder made before runs recorded their
    images is refused, saying why and what to do."""
    from conftest import write_digit_layouts
    root, pool, _ = write_digit_layouts(tmp_path / "own", n_train=30, n_test=10)
    flat, out = root / "flat", tmp_path / "run"
    coft_own = on_own_images(coft_args(tmp_path, *SHORT), root)
    coft.main(coft_own)
    before, original = folder_state(out), (flat / "0003.png").read_bytes()
    mirrored(flat / "0003.png")
    continuing = {"--resume": coft_own + ["--resume"], "--eval-only": coft_own + ["--eval-only"],
                  "--phase 2": [a if a != "1" or coft_own[i - 1] != "--phase" else "2" for i, a in enumerate(coft_own)]}
    for flag, argv in continuing.items():
        err = coft_error(capsys, *argv)
        assert f"the data differ from those the run in {out} was made with (pool: 1 image changed (first: 0003.png " \
               f"changed))" in err, (flag, err)
    (flat / "0003.png").write_bytes(original)
    write_image(flat / "0100.png", color=(1, 2, 3))
    assert "(pool: 1 image added (first: 0100.png added))" in coft_error(capsys, *continuing["--phase 2"])
    (flat / "0100.png").unlink()
    mirrored(root / "check" / "one" / "0005.png")
    assert "(check set: 1 image changed (first: one/0005.png changed))" in coft_error(capsys, *continuing["--eval-only"])
    assert folder_state(out) == before
    mirrored(root / "check" / "one" / "0005.png")  # a mirror image mirrored: the file as it was
    assert coft.main(continuing["--phase 2"])["ensemble_acc"] is not None
    # CraFT, a finished run continued
    labels = tmp_path / "labels.csv"
    labels.write_text("path,class\n" + "".join(f"{n:04d}.png,{c}\n" for n, c in enumerate(pool[:12])))
    craft_own = on_own_images(craft_args(tmp_path, "--labels", str(labels), "--eval-split", "test", out="craft"), root)
    craft_own.remove("--shots"), craft_own.remove("2")
    import craft
    craft.main(craft_own)
    mirrored(flat / "0005.png")
    err = one_line_error(craft.main, capsys, *craft_own, "--resume")
    assert "(pool: 1 image changed (first: 0005.png changed))" in err
    mirrored(flat / "0005.png")
    # VeCAF with a person: a step after the labels came, on other images
    import vecaf
    from conftest import vecaf_args
    person = tmp_path / "person.csv"
    vecaf_own = on_own_images(vecaf_args(tmp_path, "--labels", str(person), out="vecaf"), root)
    with pytest.raises(SystemExit) as e:
        vecaf.main(vecaf_own)
    assert e.value.code == runs.WAITING
    capsys.readouterr()
    mirrored(flat / "0007.png")
    assert "(pool: 1 image changed (first: 0007.png changed))" in one_line_error(vecaf.main, capsys, *vecaf_own)
    # a run folder made before images.pt: refused, saying why and what to do
    (out / "images.pt").unlink()
    err = coft_error(capsys, *coft_own, "--resume")
    assert "made before runs recorded their images by content" in err and "--restart" in err


def test_an_unreadable_image_stops_a_run_before_its_folder_holds_one_and_the_same_command_then_works(tmp_path, capsys):
    """A truncated image and a link to nothing are named in one line before anything is loaded or
    written; once the files are fixed, the same command runs (no 'holds a run already')."""
    from conftest import write_digit_layouts
    root, _, _ = write_digit_layouts(tmp_path / "own", n_train=20, n_test=0)
    good = (root / "flat" / "0004.png").read_bytes()
    (root / "flat" / "0004.png").write_bytes(good[:len(good) // 2])
    os.symlink(tmp_path / "nowhere.png", root / "flat" / "0100.png")
    argv = on_own_images(coft_args(tmp_path, *SHORT), root, check=False)
    err = coft_error(capsys, *argv)
    assert "2 of 21 images cannot be read (" in err and "0004.png: " in err and "0100.png: a link to nothing" in err
    assert not runs.holds_run(tmp_path / "run")
    (root / "flat" / "0004.png").write_bytes(good)
    (root / "flat" / "0100.png").unlink()
    assert coft.main(argv)["phase1_agreement"] is not None


@pytest.mark.parametrize("cli", ["coft", "craft", "vecaf"])
def test_every_image_a_run_reads_is_decoded_with_its_datasets_orientation_rule(tmp_path, monkeypatch, cli):
    """Every image file a CLI reads goes through imagefiles.decode_image, without the EXIF orientation for
    a benchmark dataset (DTD: the papers' decode) and with it for an image folder: a place that
    built its ImageDataset without the task's rule would read a benchmark's files turned."""
    import craft
    import imagefiles
    import vecaf
    from conftest import vecaf_args
    make_dtd(str(tmp_path / "DATA"))
    make_imagefolder(str(tmp_path / "folder"), splits=("train", "test", "val"))
    seen, decode = [], imagefiles.decode_image

    def recording(path, exif_orientation=True):
        seen.append((os.path.relpath(path, tmp_path).split(os.sep)[0], exif_orientation))
        return decode(path, exif_orientation)
    monkeypatch.setattr(imagefiles, "decode_image", recording)
    for dataset, root in (("dtd", "DATA"), ("imagefolder", "folder")):
        data_flags = ["--dataset", dataset, "--data-root", str(tmp_path / root), "--out", str(tmp_path / dataset)]
        if cli == "coft":
            coft.main(coft_args(tmp_path, "--K", "1", *data_flags))
        elif cli == "craft":
            craft.main(craft_args(tmp_path, "--shots", "1", *data_flags))
        else:
            vecaf.main(vecaf_args(tmp_path, "--budget", "2", *data_flags))
    assert {rule for where, rule in seen if where == "DATA"} == {False}
    assert {rule for where, rule in seen if where == "folder"} == {True}
# ---- what a person reads: every line of an own-images run of each CLI

def without(argv, *flags):
    """argv without these flags and their values."""
    drop = {i + d for i, a in enumerate(argv) if a in flags for d in (0, 1)}
    return [a for i, a in enumerate(argv) if i not in drop]


# (what reads wrong, the pattern that finds it in a line a person sees)
GARBLING = [("a variable's name where a word was: 'image(run)'", r"\(run\)"),
            ("a possessive 's after a plural: 'images's'", r"\b\w+s's\b"),
            ("a doubled word: 'the the'", r"(?i)\b([a-z]+) \1\b"),
            ("unformatted braces: a {name} or {{ left in", r"[{}]"),
            ("Python's None", r"\bNone\b"),
            ("a number that is none: nan, inf", r"\b(nan|NaN|inf)\b"),
            ("a plural left open where the count is known: 'image(s)'", r"\w\((s|es)\)")]


def misread(line, tmp):
    """What reads wrong in one line a person sees ([] where nothing does): GARBLING, and a line over
    300 characters once the test's folder is spelt DIR (paths are the person's, the words are ours).
    A template shown as such keeps its {} and the metrics line its JSON (parsed: it must be JSON)."""
    line = line.replace(str(tmp), "DIR")
    if line.startswith("metrics: "):
        json.loads(line[len("metrics: "):])
        line = "metrics: JSON"
    text = re.sub(r"'[^']*\{\}[^']*'", "'TEMPLATE'", line)
    return [what for what, pattern in GARBLING if re.search(pattern, text)] + \
        ([f"{len(line)} characters"] if len(line) > 300 else [])


def test_every_line_a_person_reads_of_an_own_images_run_reads_right(tmp_path, capsys):
    """Own images (a flat folder, classes.txt, a check set) through every CLI as a person meets them:
    CoFT with the labels they gave and without labels or check set, CraFT with labels (and without:
    its one-line refusal), VeCAF with a person (the stop, the stop after loop 1, the end), deploy.py
    classifying and exporting. Every line they print (stdout, stderr) and every line of each run's
    log.txt reads right (misread), and the lines say what the run has: the labels file given, the
    check set or its absence, the images VeCAF waits for and where they are listed."""
    import craft
    import deploy
    import vecaf
    root, pool, _ = write_digit_layouts(tmp_path / "own", n_train=40, n_test=20)
    own = ["--images", str(root / "flat"), "--classes", str(root / "classes.txt"), "--no-flip"]
    check = ["--check", str(root / "check")]
    given = write_labels(tmp_path / "labels.csv", [(f"{i:04d}.png", c) for i, c in enumerate(pool) if i % 3 == 0])
    person = tmp_path / "person.csv"
    read = {}  # what each step showed: stdout and stderr lines

    def step(name, main, argv, code=None):
        if code is None:
            main(argv)
        else:
            with pytest.raises(SystemExit) as e:
                main(argv)
            assert e.value.code == code
        shown = capsys.readouterr()
        read[name] = shown.out.splitlines() + shown.err.splitlines()
        return read[name]

    capsys.readouterr()
    coft_labels = step("coft --labels", coft.main, without(coft_args(tmp_path, out="coft"), "--dataset") + own + check
                       + ["--labels", str(given)])
    coft_bare = step("coft", coft.main, without(coft_args(tmp_path, out="bare"), "--dataset") + own)
    craft_argv = without(craft_args(tmp_path, out="craft"), "--shots", "--eval-split") + own + check
    craft_labels = step("craft --labels", craft.main, craft_argv + ["--labels", str(given)])
    craft_none = step("craft", craft.main, craft_argv + ["--out", str(tmp_path / "none")], code=2)
    vecaf_argv = without(vecaf_args(tmp_path, out="vecaf"), "--dataset") + own + check + ["--labels", str(person)]
    stops = [step("vecaf, the first stop", vecaf.main, vecaf_argv, code=runs.WAITING)]
    asked = []
    for loop, name in enumerate(("vecaf, the stop after loop 1", "vecaf, the end"), 1):
        asked += [r["path"] for r in csv.DictReader(open(tmp_path / "vecaf" / f"to_label_loop{loop}.csv"))]
        write_labels(person, [(p, pool[int(p[:4])]) for p in asked])
        stops.append(step(name, vecaf.main, vecaf_argv, code=runs.WAITING if "stop" in name else None))
    classified = step("deploy", deploy.main, [str(tmp_path / "coft"), str(root / "check"), "--csv",
                                             str(tmp_path / "p.csv")])
    exported = step("deploy --export", deploy.main, [str(tmp_path / "coft"), "--export", str(tmp_path / "export")])
    for run in ("coft", "bare", "craft", "vecaf"):
        read[f"{run}/log.txt"] = [line for line in (tmp_path / run / "log.txt").read_text().splitlines()
                                  if not line.startswith("==== ")]  # the marker: the time and the command
    bad = [f"{name}: {line!r}: {', '.join(misread(line, tmp_path))}" for name, lines in read.items() for line in lines
           if misread(line, tmp_path)]
    assert not bad, "\n".join(bad)
    # what the run has, said
    assert any(f"labels you gave: 14 images in {given}" in line for line in coft_labels)
    assert any("carry no labels beyond the ones you gave" in line for line in coft_labels)
    assert not any("no labelled check set" in line for line in coft_labels + craft_labels + sum(stops, []))
    assert coft_labels[0].startswith("your images: 10 classes, 40 unlabelled train images, 20 test images")
    assert any(line.startswith("no labelled check set (--check): no accuracy is reported") for line in coft_bare)
    assert not any("you gave" in line for line in coft_bare)
    assert craft_labels[0].startswith(f"your images: 10 classes, 14 labelled images from {given}")
    assert craft_none == ["error: --shots draws labelled images per class, and your images carry no labels: give the "
                          "labels you have in a labels file (--labels)"]
    assert any(f"--labels {person} does not exist yet: no label so far" in line for line in stops[0])
    for n, lines in enumerate(stops[:2]):
        assert lines[-1] == f"waiting: loop {n + 1} selected 6 images, 6 of them not labelled yet: fill in the class " \
                            f"column of {tmp_path / 'vecaf' / f'to_label_loop{n + 1}.csv'} and give that file as " \
                            f"--labels (or add rows path,class for them to {person}), then run again"
    assert any(f"--labels {person}: 6 labelled rows read (6 images), 0 rows with an empty class cell" in line
               for line in stops[1])
    assert f"loop 1: loaded from {tmp_path / 'vecaf'}/stages" in stops[2]
    assert classified == [f"20 images classified to {tmp_path / 'p.csv'}"]
    assert "(and export.json: the run they came from)" in exported[-1]


@pytest.mark.parametrize("cli", ["coft", "craft", "vecaf"])
def test_a_template_beside_a_prompts_file_is_one_line_in_every_cli(tmp_path, capsys, cli):
    """--template with a {class: [prompts]} --classes file would be recorded in the run's data
    fingerprint and never read: each CLI refuses it in one line before any work."""
    import craft
    import vecaf
    root, _, classes = write_digit_layouts(tmp_path / "own", n_train=12, n_test=0)
    (tmp_path / "c.json").write_text(json.dumps({c: [f"a photo of the digit {c}."] for c in classes}))
    main, argv = {"coft": (coft.main, without(coft_args(tmp_path), "--dataset")),
                  "craft": (craft.main, without(craft_args(tmp_path), "--shots", "--eval-split")),
                  "vecaf": (vecaf.main, without(vecaf_args(tmp_path), "--dataset"))}[cli]
    labels = write_labels(tmp_path / "labels.csv", [("0000.png", classes[0]), ("0001.png", classes[1])])
    err = one_line_error(main, capsys, *argv, "--images", str(root / "flat"), "--classes", str(tmp_path / "c.json"),
                         "--labels", str(labels), "--template", "a photo of the number {}.")
    assert f"--template and the prompts of --classes {tmp_path / 'c.json'} both say how to prompt" in err
    assert not (tmp_path / "run").exists()
