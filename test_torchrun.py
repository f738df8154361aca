"""torchrun (ddp.py, and DDP inside train.fit): N gloo processes on the CPU give the plain run's
numbers (CoFT+, VeCAF, the evaluation pass), a killed job resumes exactly, BatchNorm statistics
are rank 0's, and an error ends the job with one line, whoever meets it first."""
import shutil

import pytest
import torch

import coft
import ddp
import runs
import train
import vecaf
from conftest import (as_torchrun, assert_one_error_line, cli_as_process, coft_args, make_imagefolder, numbers,
                      run_coft, run_vecaf, same_run, torchrun, vecaf_args, vecaf_stage, write_image)


DDP_RUN = ("--plus", "--rounds", "1", "--queue", "100", "--fft-epochs", "2", "--batch", "50")


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): every pass sharded and gathered, both phases
    under DDP with each global batch split in two (50 = 25 + 25; the seed set's and the
    unlabelled set's short last batches split unevenly), CoFT+'s keys gathered into one queue.
    Same per-step losses of every stage and same metrics as the plain run; both processes end
    with the same queue and momentum model, and with the plain run's. Rank 0 writes log.txt."""
    argv = coft_args(tmp_path, *DDP_RUN, out="one")
    cli_as_process(0, "coft", argv, tmp_path / "one")
    one = torch.load(tmp_path / "one-rank0.pt", weights_only=False)
    as_torchrun(cli_as_process, 2, "coft", coft_args(tmp_path, *DDP_RUN, out="two"), tmp_path / "two")
    ranks = [torch.load(tmp_path / f"two-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert one["metrics"]["processes"] == 1 and ranks[0]["metrics"]["processes"] == 2
    same_run(ranks[0], one)
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["losses"] == ranks[1]["losses"]
    assert one["contrast"].keys() == {"branch1", "branch2"}
    for tag, state in one["contrast"].items():
        assert int(state["count"]) == 100
        for k, v in state.items():
            assert torch.equal(ranks[0]["contrast"][tag][k], ranks[1]["contrast"][tag][k]), (tag, k)
            assert torch.allclose(ranks[0]["contrast"][tag][k].double(), v.double(), atol=1e-5), (tag, k)
    assert not (tmp_path / "two" / "stages" / "branch1.ckpt").exists()  # rank 0 wrote, and cleaned up
    log = (tmp_path / "two" / "log.txt").read_text()  # rank 0's alone: each line once
    assert log.count("==== ") == 1 and log.count("\nmetrics: ") == 1 and log.count("phase I round 1:") == 1


def test_two_processes_killed_and_resumed_equal_an_uninterrupted_run(tmp_path):
    """A 2-process CoFT+ job whose rank 0 is SIGKILLed right after branch 1's first epoch
    checkpoint, resumed by 2 processes: the very numbers of the uninterrupted job; resumed by
    one plain process: the same to float tolerance (the sampler's global batches do not depend on
    the process count)."""
    argv = coft_args(tmp_path, *DDP_RUN, "--branches", "1", out="full")
    as_torchrun(cli_as_process, 2, "coft", argv, tmp_path / "full")
    killed = coft_args(tmp_path, *DDP_RUN, "--branches", "1", out="killed")
    with pytest.raises(torch.multiprocessing.ProcessExitedException):  # rank 0 killed after branch 1's epoch 1
        as_torchrun(cli_as_process, 2, "coft", killed, tmp_path / "killed", "branch1.ckpt")
    assert (tmp_path / "killed" / "stages" / "branch1.ckpt").exists()
    assert not (tmp_path / "killed" / "stages" / "branch1.pt").exists()
    shutil.copytree(tmp_path / "killed", tmp_path / "killed-copy")
    as_torchrun(cli_as_process, 2, "coft", killed + ["--resume"], tmp_path / "resumed")
    full, resumed, resumed_1 = (torch.load(tmp_path / f"{n}.pt", weights_only=False)
                                for n in ("full-rank0", "resumed-rank0", "resumed-rank1"))
    assert resumed["metrics"] == full["metrics"] and resumed["losses"]["branch1"] == full["losses"]["branch1"]
    # the resumed job ran branch 1's second epoch only (both processes read the checkpoint), Phase I not at all
    assert resumed["steps"] == resumed_1["steps"] == {"branch1": full["steps"]["branch1"] // 2}
    # resumed by a plain single process instead: the same global batches, so the same run to float tolerance
    cli_as_process(0, "coft", coft_args(tmp_path, *DDP_RUN, "--branches", "1", "--resume", out="killed-copy"),
                    tmp_path / "plain")
    plain = torch.load(tmp_path / "plain-rank0.pt", weights_only=False)
    assert plain["steps"] == resumed["steps"]
    same_run(plain, {**full, "losses": {"branch1": full["losses"]["branch1"]}})


@pytest.mark.parametrize("late_rank", [None, 0])
def test_under_torchrun_an_error_on_any_process_ends_the_job_with_one_line(tmp_path, late_rank):
    """Every process meets the error (a flag, the run folder, a flag only GPUs take, an unreadable
    image found before any work): rank 0 says it once, also when it meets it last (held back 2 s
    at start-up and after the job forms, so process 1 has long met it). One process meets it (a
    test image in rank 1's shard of the evaluation pass that it alone cannot read): that process
    says it, named, and rank 0, whose gather then breaks, stays silent. No traceback from a
    process, no hang."""
    run_coft(tmp_path, "--p1-epochs", "1", "--fft-epochs", "1", "--branches", "1")
    make_imagefolder(tmp_path / "if")
    write_image(str(tmp_path / "if" / "test" / "dog_big" / "9.png"))  # the last test image
    make_imagefolder(tmp_path / "bad")
    (tmp_path / "bad" / "test" / "dog_big" / "9.png").write_text("not a png")
    folder = ("--batch", "4", "--K", "2", "--dataset", "imagefolder", "--data-root")
    for argv, expected, unreadable in (
            (coft_args(tmp_path, "--K", "0"), "error: argument --K: must be >= 1", None),
            (coft_args(tmp_path), "error: --out {} holds a run already".format(tmp_path / "run"), None),
            *([(coft_args(tmp_path, *folder, str(tmp_path / "bad"), out="bad-run"),
                "error: imagefolder: 1 of 9 images cannot be read (", None)] if late_rank is None else []),
            (coft_args(tmp_path, *folder, str(tmp_path / "if"), out="if-run"),
             "error (process 1 of 2): cannot read image ", "9.png"),
            (coft_args(tmp_path, "--sync-bn", out="bn"), "error: --sync-bn needs GPUs", None)):
        assert_one_error_line(torchrun(coft.__file__, argv, tmp_path, late_rank, unreadable_in_rank1=unreadable),
                              expected)


def test_resnet_processes_evaluate_with_the_batchnorm_statistics_rank0_saves(tmp_path):
    """ResNet without --sync-bn: each process's BatchNorm normalises its own slice of the batch,
    so the running statistics drift apart; before every evaluation and checkpoint all processes
    take rank 0's, the ones saved. So the 2-process job's numbers are its saved model's: a plain
    --eval-only of the folder reproduces every prediction."""
    argv = coft_args(tmp_path, "--method", "topk", name="tiny-rn", out="rn")
    as_torchrun(cli_as_process, 2, "coft", argv, tmp_path / "rn")
    two = torch.load(tmp_path / "rn-rank0.pt", weights_only=False)["metrics"]
    preds = torch.load(tmp_path / "rn" / "predictions.pt")
    again = coft.main(argv + ["--eval-only"])
    assert again["topk_acc"] == two["topk_acc"]
    assert torch.equal(torch.load(tmp_path / "rn" / "predictions.pt")["topk"], preds["topk"])


def test_sync_bn_converts_phase2_batchnorm_and_changes_nothing_in_a_plain_run(tmp_path, monkeypatch):
    towers, real_fit = [], train.fit

    def recording_fit(model, *a, **kw):
        towers.append({type(m).__name__ for m in model.modules()})
        return real_fit(model, *a, **kw)
    monkeypatch.setattr(train, "fit", recording_fit)
    plain = run_coft(tmp_path, "--method", "topk", name="tiny-rn", out="plain")
    synced = run_coft(tmp_path, "--method", "topk", "--sync-bn", name="tiny-rn", out="sync")
    assert "SyncBatchNorm" not in towers[0] and {"SyncBatchNorm", "Phase2Classifier"} <= towers[1]
    assert "BatchNorm2d" not in towers[1]
    assert numbers(synced) == numbers(plain)


def test_vecaf_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): the feature and loss passes sharded and
    gathered, the selection made on rank 0's numbers on both, each loop's fine-tuning under DDP
    with every batch of 5 split 3 + 2: the same per-step losses, selections, curves and final
    accuracy as the plain run."""
    cli_as_process(0, "vecaf", vecaf_args(tmp_path, "--batch", "5", out="one"), tmp_path / "one")
    as_torchrun(cli_as_process, 2, "vecaf", vecaf_args(tmp_path, "--batch", "5", out="two"), tmp_path / "two")
    one, two = (torch.load(tmp_path / f"{n}-rank0.pt", weights_only=False) for n in ("one", "two"))
    assert list(one["losses"]) == ["loop1", "loop2"] and two["metrics"]["processes"] == 2
    same_run(two, one)
    for loop in (1, 2):
        assert torch.equal(vecaf_stage(tmp_path / "one", f"select{loop}")["new"], vecaf_stage(tmp_path / "two", f"select{loop}")["new"])


@pytest.mark.parametrize("late_rank", [None, 0])
def test_vecaf_under_torchrun_an_error_on_any_process_ends_the_job_with_one_line(tmp_path, late_rank):
    """The real launcher, as for coft.py: an error every process meets (a flag, the run folder)
    is said once by rank 0, also when rank 0 meets it last; a test image in rank 1's shard of the
    evaluation pass that it alone cannot read is said once by process 1, named. No process traceback."""
    for split, n in (("train", 4), ("test", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                write_image(str(tmp_path / "if" / split / c / f"{i}.png"), color=(60 * i, 100 * (c == "cat"), 0))
    run_vecaf(tmp_path, "--loops", "1", "--epochs", "1")
    folder = ("--dataset", "imagefolder", "--data-root", str(tmp_path / "if"), "--budget", "2", "--loops", "1",
              "--batch", "2")
    for argv, expected, unreadable in (
            (vecaf_args(tmp_path, "--budget", "0"), "error: argument --budget: must be >= 1", None),
            (vecaf_args(tmp_path, "--loops", "1", "--epochs", "1"), f"error: --out {tmp_path / 'run'} holds a run",
             None),
            (vecaf_args(tmp_path, *folder, out="if-run"), "error (process 1 of 2): cannot read image ",
             "test/dog/1.png")):  # the last test image: rank 1's shard
        assert_one_error_line(torchrun(vecaf.__file__, argv, tmp_path, late_rank, unreadable_in_rank1=unreadable),
                              expected)


class Numbered(torch.utils.data.Dataset):
    """Item i: (x_i, label i % 3, i), x_i a fixed random vector."""

    def __init__(self, n):
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 3, i


def context(tmp):
    return runs.Run(out=tmp, config={}, device=torch.device("cpu"), precision="fp32",
                    amp=train.amp_settings(torch.device("cpu"), "fp32")[0], seed=0, workers=0, eval_batch=2,
                    log_every=0, resume=False, metrics={}, t0=0.0)


def score_in_two_processes(rank, tmp):
    """One of 2 gloo processes: the evaluation pass over 7 items, saved per rank."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    weight = torch.arange(8.0).reshape(4, 2)
    out = context(tmp).outputs(lambda x: x @ weight, Numbered(7))
    torch.save((ddp.world(), out), f"{tmp}/rank{rank}.pt")
    ddp.end_processes()  # as the CLIs end: a barrier first, or torch 2.3's gloo teardown can wait forever


def test_an_evaluation_pass_under_two_processes_equals_one_process(tmp_path):
    """torchrun's data parallel evaluation: 2 gloo processes (7 items: shards of 4 and 3) each
    get all 7 outputs in index order, equal to the single-process pass."""
    torch.multiprocessing.spawn(score_in_two_processes, args=(str(tmp_path),), nprocs=2)
    expected = context(tmp_path).outputs(lambda x: x @ torch.arange(8.0).reshape(4, 2), Numbered(7))
    assert ddp.world() == (0, 1) and expected.shape == (7, 2)
    for rank in (0, 1):
        where, out = torch.load(tmp_path / f"rank{rank}.pt")
        assert where == (rank, 2) and torch.allclose(out, expected)

